"""Spectral Diffusion at digit scale: a slim UNet student from scratch, with wavelet gating, and with
spectrum-aware distillation from the digits teacher (dpmjax/methods/spectral_distill.py). Run once:

    JAX_PLATFORMS=cpu python experiments/spectral.py            # ~15-20 min on 2 shared cores
    SPECTRAL_STEPS=200 SPECTRAL_NUM=200 python experiments/spectral.py   # a quick look

Teacher: the experiments' digits UNet (``_teachers.teacher_workdir("digits")``, 173k params, 2000 steps). Students
(configs/methods/spectral_distill.py, the teacher's layout at half width; same updates, batch, optimizer and seed):
``slim`` (wg=false, distill=false: plain training from scratch), ``slim_wg`` (wavelet gating), ``slim_wg_kd``
(wavelet gating + spectrum-aware distillation, lambda_s = lambda_f = 0.1). Every network samples the same 500
x_T with the teacher's sampler settings (dpmpp_2m, 10 NFE, Karras grid; ``_adaptation.sampler``).

Reported per network: parameters; MACs of one forward at batch 1 = XLA's ``cost_analysis()["flops"] / 2`` of the
jitted apply (counts every multiply-add of convs and dense layers, plus elementwise ops at one flop each: a small
overcount against per-layer MAC tables); FD of the seed-0 digits classifier's features (64-d) of the 500 samples vs
the digits test split; the radially averaged power-spectrum error vs the test split (``dpmjax.metrics.spectrum``:
mean |log10 ratio| over radii 1-6, its high-frequency half, radii 3-6, and the signed mean log ratio there).
A reference row: 500 real training images against the test split (the floor of both metrics at this sample size).

Writes results/spectral/{spectral.csv, spectra.png, samples_<name>.png} and the students' workdirs under
results/spectral/runs/ (a finished run is reused).
"""
from __future__ import annotations

import csv
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
ROOT = os.path.dirname(HERE)
OUT = os.path.join(ROOT, "results", "spectral")
STEPS = int(os.environ.get("SPECTRAL_STEPS", 1000))
NUM = int(os.environ.get("SPECTRAL_NUM", 500))
STUDENTS = {"slim": "wg=false,distill=false", "slim_wg": "wg=true,distill=false", "slim_wg_kd": "wg=true,distill=true"}


def macs(model, variables, image_shape) -> float:
    """MACs of one forward at batch 1: XLA cost analysis flops / 2 (module docstring)."""
    import jax
    import jax.numpy as jnp

    x = jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    compiled = jax.jit(lambda v, x, t: model.apply(v, x, t)).lower(variables, x, t).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) / 2


def main():
    import jax
    import numpy as np

    from _adaptation import grid, sampler
    from _teachers import real_split, teacher_workdir
    from dpmjax.config import configs_dir, load_config
    from dpmjax.methods import finetune, get_method
    from dpmjax.methods.spectral_distill import student_module
    from dpmjax.metrics.features import feature_network
    from dpmjax.metrics.fid import frechet_distance, statistics_from_features
    from dpmjax.metrics.spectrum import spectrum_error
    from dpmjax.nn import count_params
    from dpmjax.workdir import load_teacher

    os.makedirs(os.path.join(OUT, "runs"), exist_ok=True)
    teacher = load_teacher(teacher_workdir("digits"))
    settings = {k: teacher.config.sample[k] for k in ("solver", "nfe", "spacing")}
    test, _ = real_split("digits", "test")
    train, _ = real_split("digits", "train")
    net = feature_network("classifier:digits", image_shape=(8, 8, 1))
    embed = jax.jit(net.apply)
    mu_test, sigma_test = statistics_from_features(np.asarray(embed(net.params, test)))
    x_T = jax.random.normal(jax.random.key(2026), (NUM, 8, 8, 1))

    networks = {"teacher": (teacher.model, teacher.params, None)}
    for name, variant in STUDENTS.items():
        config = load_config(os.path.join(configs_dir(), "methods", "spectral_distill.py") + f":{variant},steps={STEPS}")
        start = time.time()
        state = finetune("spectral_distill", teacher, config, os.path.join(OUT, "runs", name), num_devices=1, quiet=True)
        seconds = time.time() - start
        program = get_method("spectral_distill").build(config, teacher)
        module = student_module(dict(config.method))
        networks[name] = (module, program.student(state.method, True), seconds)
        print(f"{name}: {STEPS} updates in {seconds:.0f} s", flush=True)

    rows, profiles = [], {}
    reference = train[np.random.default_rng(0).permutation(len(train))[:NUM]]
    for name, (module, variables, seconds) in networks.items():
        run = sampler(module, teacher.schedule, teacher.prediction, settings)
        samples = np.asarray(run(variables, x_T))
        grid(samples, os.path.join(OUT, f"samples_{name}.png"))
        rows.append(dict(name=name, params=count_params(variables["params"]),
                         macs=macs(module, variables, (8, 8, 1)), train_s=seconds, images=samples))
    rows.append(dict(name="real_train_500", params=0, macs=0.0, train_s=None, images=reference))
    for row in rows:
        images = row.pop("images")
        mu, sigma = statistics_from_features(np.asarray(embed(net.params, images)))
        report = spectrum_error(images, test)
        profiles[row["name"]] = report["samples"]
        profiles["data (test)"] = report["data"]
        row.update(fd=frechet_distance(mu, sigma, mu_test, sigma_test), spectrum_error=report["spectrum_error"],
                   hf_error=report["hf_error"], hf_log_ratio=report["hf_log_ratio"],
                   hf_share=report["hf_share_samples"], hf_share_data=report["hf_share_data"])
    teacher_macs = rows[0]["macs"]
    for row in rows:
        row["macs_vs_teacher"] = row["macs"] / teacher_macs
    with open(os.path.join(OUT, "spectral.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for row in rows:
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    data_profile = profiles["data (test)"]
    for name, profile in profiles.items():
        style = dict(color="black", linewidth=2) if name == "data (test)" else {}
        axes[0].plot(np.arange(len(profile)), np.log10(profile), marker="o", label=name, **style)
        if name != "data (test)":
            axes[1].plot(np.arange(1, len(profile)), np.log10(profile[1:]) - np.log10(data_profile[1:]), marker="o",
                         label=name)
    axes[0].set(xlabel="radial frequency k (cycles / 8 px)", ylabel="log10 S(k)", title="radially averaged power")
    axes[1].axhline(0, color="black", linewidth=1)
    axes[1].set(xlabel="radial frequency k", ylabel="log10 S_samples / S_data", title="spectrum error vs test split")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, "spectra.png"), dpi=120)
    print(f"wrote {OUT}/spectral.csv, spectra.png, samples_*.png", flush=True)


if __name__ == "__main__":
    main()
