"""Early exit by layer self-distillation (dpmjax/methods/early_exit.py): FD vs total transformer-block evaluations.

    python experiments/early_exit.py            # ~10 min on 2 shared cores (+12 min for the teacher, once);
                                                # CSV + PNG in results/early_exit/; EARLY_EXIT_STEPS=N updates (400)

1. A digits DiT teacher (configs/fashion_mnist_dit.py retargeted to 8x8 digits by ``TEACHER_OVERRIDES``: patch 2,
   width 64, depth 6, unconditional, eps), trained once and cached by ``_teachers.teacher_workdir``.
2. ``--method early_exit`` (configs/methods/early_exit.py:steps=400,exits=2+4, batch 64): heads after blocks 2
   and 4, GO-LSD distillation, every weight trained on the digits training split (results/early_exit/run; a
   finished run is reused).
3. For each NFE, DPM-Solver++(2M) samples (500, fixed noise) of the teacher at full depth, of the early-exit
   model at full depth (its trunk moved during training) and of the early-exit model with schedules "exit at
   block k for t > t_k"; FD in the seed-0 digits classifier's features against the digits test split;
   block evaluations per sample counted exactly from the times the sampler calls the model at
   (``dpmjax.nn.dit.block_evaluations``).
"""
from __future__ import annotations

import csv
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
ROOT = os.path.dirname(HERE)
OUT = os.path.join(ROOT, "results", "early_exit")

DEPTH = 6
TEACHER_OVERRIDES = [
    "--config.model.patch_size=2", "--config.model.hidden_size=64", f"--config.model.depth={DEPTH}",
    "--config.model.num_heads=4", "--config.model.freq_dim=64", "--config.model.num_classes=None",
    "--config.model.label_dropout=0.0", "--config.data.name=digits", "--config.data.image_shape=[8, 8, 1]",
    "--config.data.batch_size=128", "--config.train.num_steps=1200", "--config.train.ema_decay=0.995",
    "--config.optim.learning_rate=2e-3", "--config.optim.warmup_steps=100", "--config.train.checkpoint_every=600",
    "--config.sample.guidance_scale=1.0", "--config.sample.spacing=karras",
]
NUM_SAMPLES = 500
NFES = (6, 10, 16)
# (label, [(continuous-time threshold, exit block), ...]); thresholds in the schedule's t in (0, 1]
SCHEDULES = [
    ("exit4 t>0.6", [(0.6, 4)]),
    ("exit2 t>0.8, exit4 t>0.5", [(0.8, 2), (0.5, 4)]),
    ("exit4 t>0.4", [(0.4, 4)]),
    ("exit2 t>0.6, exit4 t>0.3", [(0.6, 2), (0.3, 4)]),
]


def teacher_dir():
    from _teachers import teacher_workdir

    return teacher_workdir("fashion_mnist_dit", name="digits_dit", overrides=TEACHER_OVERRIDES)


def model_call_times(schedule, solver, nfe, spacing):
    """The continuous times at which ``dpmjax.sample`` calls the model for one sample (recorded by a host callback
    inside the sampler's scan): the block count is then exact, sum_i depth(t_i)."""
    import jax
    import jax.numpy as jnp

    from dpmjax.samplers.driver import sample

    times = []

    def model_fn(x, t):
        jax.debug.callback(lambda value: times.append(float(value)), t[0], ordered=True)
        return jnp.zeros_like(x)

    jax.block_until_ready(sample(model_fn, jnp.zeros((1, 8, 8, 1)), schedule=schedule, solver=solver, nfe=nfe,
                                 spacing=spacing))
    return times


def main():
    import jax
    import jax.numpy as jnp
    import numpy as np

    from _adaptation import grid, sampler
    from _teachers import real_split
    from dpmjax.config import configs_dir, load_config
    from dpmjax.methods import finetune, get_method
    from dpmjax.methods.early_exit import network_schedule
    from dpmjax.metrics.features import feature_network
    from dpmjax.metrics.fid import frechet_distance, statistics_from_features
    from dpmjax.nn import network_time
    from dpmjax.nn.dit import block_evaluations
    from dpmjax.workdir import load_teacher

    steps = int(os.environ.get("EARLY_EXIT_STEPS", "400"))
    os.makedirs(OUT, exist_ok=True)
    started = time.time()
    teacher = load_teacher(teacher_dir())
    print(f"teacher ready ({time.time() - started:.0f}s)", flush=True)
    config = load_config(os.path.join(configs_dir(), "methods", "early_exit.py") + f":steps={steps},exits=2+4")
    with config.unlocked():
        config.data.batch_size = 64
    workdir = os.path.join(OUT, "run")
    begin = time.time()
    state = finetune("early_exit", teacher, config, workdir, num_devices=1, quiet=True)
    train_s = time.time() - begin
    program = get_method("early_exit").build(config, teacher)
    student = jax.device_get(program.student(state.method, use_ema=True))
    print(f"early_exit trained {steps} steps in {train_s:.0f}s", flush=True)

    solver, spacing = "dpmpp_2m", "karras"
    x_T = jax.random.normal(jax.random.key(7), (NUM_SAMPLES,) + teacher.image_shape, jnp.float32)
    test_images, _ = real_split("digits", "test")
    net = feature_network("classifier:digits", image_shape=(8, 8, 1))
    embed = jax.jit(net.apply)
    reference = statistics_from_features(np.asarray(embed(net.params, jnp.asarray(test_images))))
    exit_model = teacher.model.clone(exit_blocks=(2, 4))
    rows = []
    for nfe in NFES:
        times = model_call_times(teacher.schedule, solver, nfe, spacing)
        net_times = [float(network_time(teacher.schedule, jnp.float32(t))) for t in times]
        runs = [("teacher full", teacher.model, teacher.params, ()), ("early_exit full", exit_model, student, ())]
        runs += [(label, exit_model.clone(exit_schedule=tuple(tuple(e) for e in network_schedule(teacher.schedule,
                                                                                              entries))),
                  student, network_schedule(teacher.schedule, entries)) for label, entries in SCHEDULES]
        for label, model, params, net_schedule in runs:
            run = sampler(model, teacher.schedule, teacher.prediction, dict(solver=solver, nfe=nfe, spacing=spacing))
            begin = time.time()
            samples = np.asarray(run(params, x_T))
            seconds = time.time() - begin
            fd = frechet_distance(*statistics_from_features(np.asarray(embed(net.params, jnp.asarray(samples)))),
                                  *reference)
            blocks = block_evaluations(tuple(tuple(e) for e in net_schedule), DEPTH, net_times)
            row = {"run": label, "nfe": nfe, "model_calls": len(times), "block_evals": blocks,
                   "block_fraction": round(blocks / (len(times) * DEPTH), 3), "fd": round(float(fd), 3),
                   "sample_s_incl_compile": round(seconds, 1)}
            print(row, flush=True)
            rows.append(row)
            if nfe == NFES[-1] and label in ("teacher full", SCHEDULES[2][0]):
                grid(samples[:64], os.path.join(OUT, f"grid_nfe{nfe}_{label.split()[0]}.png"), columns=8)
    with open(os.path.join(OUT, "early_exit.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows)
    print(f"done in {time.time() - started:.0f}s; train {train_s:.0f}s", flush=True)


def plot(rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    full = [r for r in rows if r["run"] == "teacher full"]
    ax.plot([r["block_evals"] for r in full], [r["fd"] for r in full], "k-o", label="teacher, full depth")
    ee_full = [r for r in rows if r["run"] == "early_exit full"]
    ax.plot([r["block_evals"] for r in ee_full], [r["fd"] for r in ee_full], "b--s", label="early_exit, full depth")
    for label, _ in SCHEDULES:
        part = [r for r in rows if r["run"] == label]
        ax.plot([r["block_evals"] for r in part], [r["fd"] for r in part], ":^", label=label)
    for r in full:
        ax.annotate(f"NFE {r['nfe']}", (r["block_evals"], r["fd"]), fontsize=7)
    ax.set_xlabel("transformer-block evaluations per sample")
    ax.set_ylabel("FD (digits classifier features)")
    ax.set_yscale("log")
    ax.set_title(f"digits DiT (depth {DEPTH}), DPM-Solver++(2M), karras grid, {NUM_SAMPLES} samples")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, "early_exit.png"), dpi=120)


if __name__ == "__main__":
    if sys.argv[1:] == ["teacher"]:
        print(teacher_dir())
    else:
        main()
