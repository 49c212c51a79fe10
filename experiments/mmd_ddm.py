"""MMD-DDM at CPU scale on digits and Fashion-MNIST: Frechet distance before / after finetuning for T' = 2, 4, 6,
10, beside the best training-free solver at the same NFE; peak memory with and without per-step remat;
throughput on 1 vs 8 (simulated) devices.

    python experiments/mmd_ddm.py                       # quality table (teacher: configs/digits.py, trained once)
    python experiments/mmd_ddm.py --t-primes 2,4 --steps 100
    python experiments/mmd_ddm.py --dataset fashion_mnist --t-primes 2,4 --steps 60 --batch-size 32 --num 500
    python experiments/mmd_ddm.py --memory              # compiled update's temp memory, remat on / off
    python experiments/mmd_ddm.py --throughput          # updates per second on 1 and 8 simulated CPU devices

Quality: the teacher (``_teachers.teacher_workdir("digits")``) is finetuned with ``configs/methods/mmd_ddm.py``
(DDIM, time-uniform grid, batch 64 + 64, features of the digits classifier trained with seed 1) for
``--steps`` updates per T'. Every row scores 1000 samples against the 355 held-out digits in the features of the
seed-0 classifier (``dpmjax.metrics.domain``), a network the finetuning never saw, and also in the seed-1
features it optimised (to show how much of a gain is specific to the optimised space). The training-free
baseline is the best of several solvers and spacings at the same NFE. Writes ``results/mmd_ddm/quality.csv``,
``quality.png`` and sample grids; ``memory.csv``; ``throughput.csv``. ``--dataset fashion_mnist`` does the same
with the Fashion-MNIST teacher (``_teachers.OVERRIDES``), its classifiers and the 10000 test images, under
``results/mmd_ddm/fashion_mnist/``.
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "results", "mmd_ddm")
BASELINES = [(solver, spacing) for solver in ("ddim", "dpmpp_2m", "unipc", "dpmpp_3m")
             for spacing in ("time_uniform", "logSNR", "karras")]


def _append(path, row):
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def _method_config(t_prime: int, steps: int, batch_size: int | None = None, dataset: str = "digits", **method):
    from dpmjax.config import configs_dir, load_config

    config = load_config(os.path.join(configs_dir(), "methods", "mmd_ddm.py")
                         + f":steps={t_prime},features=classifier:{dataset}:1")
    with config.unlocked():
        config.train.update(num_steps=steps, checkpoint_every=steps, log_every=max(1, steps // 10))
        if batch_size:
            config.data.batch_size = batch_size
        config.method.update(method)
    return config


def _generate(apply_fn, params, schedule, prediction, solver, spacing, nfe, num, shape, seed=0):
    import jax

    from dpmjax.samplers import make_param_sampler

    sampler = make_param_sampler(apply_fn, schedule=schedule, solver=solver, nfe=nfe, spacing=spacing,
                                 prediction=prediction, batch_size=500)
    x_T = jax.random.normal(jax.random.key(seed), (num,) + tuple(shape))
    return jax.device_get(sampler(params, x_T, jax.random.key(seed + 1)))


def quality(t_primes, steps, num, out, batch_size=None, skip_baselines=False, dataset="digits"):
    import numpy as np

    from _teachers import real_split, teacher_workdir
    from dpmjax.methods import finetune
    from dpmjax.metrics.domain import domain_metric
    from dpmjax.metrics.report import image_grid
    from dpmjax.workdir import load_params, load_teacher

    teacher_dir = teacher_workdir(dataset)
    teacher = load_teacher(teacher_dir)
    apply_fn = teacher.apply_fn()
    real, _ = real_split(dataset, "test")
    scorer, optimised = domain_metric(dataset, 0), domain_metric(dataset, 1)
    path = os.path.join(out, "quality.csv")

    def score(samples):
        held_out = scorer.evaluate(np.clip(samples, -1, 1), real)
        return dict(frechet=round(held_out["frechet"], 3), confident_share=round(held_out["confident_share"], 3),
                    frechet_optimised_space=round(optimised.frechet(np.clip(samples, -1, 1), real), 3))

    floor = scorer.evaluate(real_split(dataset, "train")[0][:num], real)
    _append(path, dict(t_prime=0, model=f"{num} real training images (floor)", solver="-", spacing="-", nfe=0,
                       finetune_steps=0, seconds=0, frechet=round(floor["frechet"], 3),
                       confident_share=round(floor["confident_share"], 3), frechet_optimised_space="",
                       load="%.1f" % os.getloadavg()[0]))
    for t_prime in t_primes:
        best = None
        for solver, spacing in BASELINES[:1] if skip_baselines else BASELINES:
            try:
                samples = _generate(apply_fn, teacher.params, teacher.schedule, teacher.prediction, solver, spacing,
                                    t_prime, num, teacher.image_shape)
            except ValueError:
                continue
            row = dict(t_prime=t_prime, model="teacher", solver=solver, spacing=spacing, nfe=t_prime,
                       finetune_steps=0, seconds=0, **score(samples), load="%.1f" % os.getloadavg()[0])
            _append(path, row)
            if solver == "ddim" and spacing == "time_uniform":
                image_grid(samples[:128], os.path.join(out, f"samples_teacher_ddim_T{t_prime}.png"))
            if best is None or row["frechet"] < best["frechet"]:
                best = row
        print(f"T'={t_prime}: best training-free {best['solver']}/{best['spacing']} FD {best['frechet']}", flush=True)
        config = _method_config(t_prime, steps, batch_size, dataset)
        workdir = os.path.join(out, "runs", f"mmd_T{t_prime}_{steps}_b{config.data.batch_size}")
        start = time.perf_counter()
        finetune("mmd_ddm", teacher, config, workdir, quiet=True)
        seconds = time.perf_counter() - start
        model, params, schedule, config = load_params(workdir)
        samples = _generate(apply_fn, params, schedule, teacher.prediction, "ddim", "time_uniform", t_prime, num,
                            teacher.image_shape)
        row = dict(t_prime=t_prime, model=f"MMD-DDM (batch {config.data.batch_size})", solver="ddim",
                   spacing="time_uniform", nfe=t_prime, finetune_steps=steps, seconds=round(seconds, 1), **score(samples),
                   load="%.1f" % os.getloadavg()[0])
        _append(path, row)
        image_grid(samples[:128], os.path.join(out, f"samples_mmd_ddim_T{t_prime}.png"))
        print(f"T'={t_prime}: MMD-DDM FD {row['frechet']} (optimised space {row['frechet_optimised_space']}), "
              f"{seconds:.0f} s", flush=True)
    plot(out)


def plot(out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(open(os.path.join(out, "quality.csv"))))
    floor = [float(r["frechet"]) for r in rows if r["t_prime"] == "0"]
    t_primes = sorted({int(r["t_prime"]) for r in rows} - {0})
    series = {"teacher, DDIM": [], "teacher, best training-free": [], "MMD-DDM (DDIM)": []}
    for tp in t_primes:
        at = [r for r in rows if int(r["t_prime"]) == tp]
        ddim = [float(r["frechet"]) for r in at if r["model"] == "teacher" and r["solver"] == "ddim"
                and r["spacing"] == "time_uniform"]
        best = [float(r["frechet"]) for r in at if r["model"] == "teacher"]
        mmd = [float(r["frechet"]) for r in at if r["model"].startswith("MMD-DDM")]
        series["teacher, DDIM"].append(ddim[-1] if ddim else float("nan"))
        series["teacher, best training-free"].append(min(best) if best else float("nan"))
        series["MMD-DDM (DDIM)"].append(mmd[-1] if mmd else float("nan"))
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for name, values in series.items():
        ax.plot(t_primes, values, "o-", label=name)
    if floor:
        ax.axhline(floor[-1], ls=":", c="k", label="real-data floor")
    ax.set_xlabel("T' (NFE)")
    ax.set_ylabel("Frechet distance (seed-0 classifier)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "quality.png"), dpi=120)
    plt.close(fig)


def memory(out, t_primes=(2, 4, 10), batch=64):
    """Temp memory of the compiled update (XLA's memory analysis), per-step remat on and off."""
    import jax
    import jax.numpy as jnp

    from _teachers import teacher_workdir
    from dpmjax.methods import mmd_ddm
    from dpmjax.methods.loop import FinetuneState, make_finetune_step
    from dpmjax.sharding import make_mesh, sharding_rule
    from dpmjax.workdir import load_teacher

    teacher = load_teacher(teacher_workdir("digits"))
    mesh = make_mesh(1)
    for t_prime in t_primes:
        for remat in (True, False):
            config = _method_config(t_prime, 10, remat=remat)
            with config.unlocked():
                config.data.batch_size = batch
            program = mmd_ddm.build(config, teacher)
            state = jax.eval_shape(lambda f: FinetuneState(step=jnp.zeros((), jnp.int32),
                                                           key=jax.random.key_data(jax.random.key(0)),
                                                           method=program.init(f, jax.random.key(0))),
                                   program.frozen)
            step = make_finetune_step(program, mesh, sharding_rule("replicate", mesh, state),
                                      sharding_rule("replicate", mesh, program.frozen))
            batch_spec = {"image": jax.ShapeDtypeStruct((batch, 8, 8, 1), jnp.float32),
                          "label": jax.ShapeDtypeStruct((batch,), jnp.int32)}
            compiled = step.jitted.lower(state, batch_spec, program.frozen, step.init_metrics()).compile()
            analysis = compiled.memory_analysis()
            row = dict(t_prime=t_prime, remat=remat, batch=batch, temp_mib=round(analysis.temp_size_in_bytes / 2**20, 2),
                       argument_mib=round(analysis.argument_size_in_bytes / 2**20, 2))
            _append(os.path.join(out, "memory.csv"), row)
            print(row, flush=True)


def throughput_child(devices, t_prime, steps, batch):
    """Updates per second of MMD-DDM on ``devices`` devices (run in a fresh process with XLA_FLAGS set)."""
    import jax

    from _teachers import teacher_workdir
    from dpmjax.methods import finetune
    from dpmjax.workdir import load_teacher
    import tempfile

    teacher = load_teacher(teacher_workdir("digits"))
    config = _method_config(t_prime, steps)
    with config.unlocked():
        config.data.batch_size = batch
        config.train.update(log_every=steps, checkpoint_every=steps)
    with tempfile.TemporaryDirectory() as tmp:
        finetune("mmd_ddm", teacher, config, os.path.join(tmp, "warm"), num_devices=devices, quiet=True,
                 stop_after=1)  # compile
        start = time.perf_counter()
        finetune("mmd_ddm", teacher, config, os.path.join(tmp, "warm"), num_devices=devices, quiet=True)
        seconds = time.perf_counter() - start
    print(f"RESULT devices={len(jax.devices()[:devices])} updates_per_s={(steps - 1) / seconds:.4f}", flush=True)


def throughput(out, t_prime=4, steps=11, batch=64):
    for devices in (1, 8):
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        result = subprocess.run([sys.executable, os.path.abspath(__file__), "--throughput-child", str(devices),
                                 "--t-primes", str(t_prime), "--steps", str(steps)], env=env, capture_output=True,
                                text=True, cwd=ROOT)
        line = [ln for ln in result.stdout.splitlines() if ln.startswith("RESULT")]
        if result.returncode or not line:
            raise RuntimeError(f"throughput run on {devices} devices failed:\n{result.stderr[-3000:]}")
        fields = dict(item.split("=") for item in line[0].split()[1:])
        row = dict(devices=devices, t_prime=t_prime, batch=batch, updates_per_s=float(fields["updates_per_s"]),
                   images_per_s=round(float(fields["updates_per_s"]) * batch, 2), load="%.1f" % os.getloadavg()[0])
        _append(os.path.join(out, "throughput.csv"), row)
        print(row, flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--t-primes", default="2,4,6,10")
    parser.add_argument("--steps", type=int, default=150, help="finetuning updates per T'")
    parser.add_argument("--num", type=int, default=1000, help="samples per row")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="real (= generated) images per update (default: the config's 64)")
    parser.add_argument("--skip-baselines", action="store_true",
                        help="only the teacher's DDIM row, not the sweep of training-free solvers")
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--throughput", action="store_true")
    parser.add_argument("--throughput-child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dataset", default="digits", choices=("digits", "fashion_mnist"))
    parser.add_argument("--out", default=None, help="default results/mmd_ddm (digits), results/mmd_ddm/<dataset>")
    args = parser.parse_args(argv)
    args.out = args.out or (OUT if args.dataset == "digits" else os.path.join(OUT, args.dataset))
    os.makedirs(args.out, exist_ok=True)
    t_primes = [int(t) for t in args.t_primes.split(",")]
    if args.throughput_child:
        return throughput_child(args.throughput_child, t_primes[0], args.steps, 64)
    if args.memory:
        return memory(args.out)
    if args.throughput:
        return throughput(args.out)
    quality(t_primes, args.steps, args.num, args.out, args.batch_size, args.skip_baselines, args.dataset)


if __name__ == "__main__":
    main()
