"""DMD2 on digits (and Fashion-MNIST): 1-step and 4-step generators distilled from the teacher, with the ablations
the paper argues for (no GAN, no TTUR), scored next to the teacher's best solver at 1-20 NFE.

    python experiments/dmd2.py                                   # teacher table + every run (see RUNS)
    python experiments/dmd2.py --only one_step,one_step_no_gan --steps 400
    python experiments/dmd2.py --skip-teacher                    # runs only (the teacher table is reused)
    python experiments/dmd2.py --dataset fashion_mnist --only one_step,one_step_no_gan --steps 300 --batch-size 16

Teacher: ``_teachers.teacher_workdir("digits")`` (configs/digits.py, 1500 steps, eps-prediction). Each run is
``dpmjax.methods.finetune("dmd2", ...)`` with ``configs/methods/dmd2.py:<variant>`` plus the overrides below
(a larger learning rate and fewer steps than the paper: this is a minutes-long CPU run, see
results/dmd2/BENCHMARKS_section.md). Scores: Frechet distance in the digits classifier's features
(``dpmjax.metrics.domain.domain_metric("digits")``) of 1000 samples against the 355 held-out digits, and the share
of samples the classifier labels with confidence > 0.9. Students are sampled by the "renoise" solver (their
workdir's ``sample`` section) at 1, 2 and 4 NFE on the trailing grid; the teacher by DPM-Solver++(2M), UniPC and
DDIM on logSNR / time-uniform / Karras grids, best per NFE.

Writes under results/dmd2/: ``teacher.csv`` (solver x spacing x NFE), ``students.csv`` (run, step, params, NFE),
``curves.csv`` (FD of the raw generator at each checkpoint), ``learning_curves.png``, ``fd_vs_nfe.png``,
``samples_<run>.png`` and ``samples_teacher_<solver>_nfe<k>.png``; the runs' workdirs in results/dmd2/runs/.
``--dataset fashion_mnist``: the Fashion-MNIST teacher (``_teachers.OVERRIDES``), its classifier, 500 samples per
row against the 10000 test images and a shorter teacher table (NFE 1, 2, 4, 10, 20), under results/dmd2/fashion_mnist/.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import time

from _teachers import ROOT, real_split, teacher_workdir

OUT = os.path.join(ROOT, "results", "dmd2")
CONFIG = os.path.join(ROOT, "configs", "methods", "dmd2.py")
# name -> variant of configs/methods/dmd2.py
RUNS = {
    "one_step": "steps=1",
    "four_step": "steps=4",
    "one_step_no_gan": "steps=1,gan=false",
    "one_step_ttur1": "steps=1,ttur=1",
}
TEACHER_SOLVERS = ("dpmpp_2m", "unipc", "ddim")
TEACHER_SPACINGS = ("logSNR", "time_uniform", "karras")
TEACHER_NFES = (1, 2, 3, 4, 5, 6, 8, 10, 15, 20)
STUDENT_NFES = (1, 2, 4)
NUM_SAMPLES = 1000


def append_rows(path, rows):
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)


def replace_rows(path, run, rows):
    """Write ``rows`` into the CSV in place of the earlier rows of ``run`` (a rerun replaces, never duplicates)."""
    kept = [r for r in read_rows(path) if r["run"] != run]
    if os.path.exists(path):
        os.remove(path)
    if kept:
        append_rows(path, kept)
    append_rows(path, rows)


def read_rows(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def score(metric, real, images):
    result = metric.evaluate(images, real)
    return {"frechet": round(float(result["frechet"]), 3),
            "confident_share": round(float(result["confident_share"]), 4)}


def teacher_table(teacher, metric, real, seed):
    """FD of the teacher per (solver, spacing, NFE): one compiled sampler per (solver, NFE), grids as data."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import dpmjax
    from dpmjax.metrics.report import image_grid
    from dpmjax.samplers import plan

    apply_fn = teacher.apply_fn()
    x_T = jax.random.normal(jax.random.key(seed), (NUM_SAMPLES,) + teacher.image_shape, jnp.float32)
    rows = []
    for solver in TEACHER_SOLVERS:
        for nfe in TEACHER_NFES:
            try:
                sampler = dpmjax.make_param_sampler(apply_fn, schedule=teacher.schedule, solver=solver, nfe=nfe,
                                                    spacing="logSNR", prediction=teacher.prediction, batch_size=500)
            except ValueError as err:
                print(f"teacher {solver} nfe={nfe}: skipped ({err})", flush=True)
                continue
            for spacing in TEACHER_SPACINGS:
                times = plan(teacher.schedule, solver, nfe=nfe, spacing=spacing).grid["t"]
                images = np.clip(np.asarray(sampler(teacher.params, x_T, timesteps=times)), -1, 1)
                row = {"solver": solver, "spacing": spacing, "nfe": nfe, **score(metric, real, images)}
                rows.append(row)
                print("teacher", row, flush=True)
                if spacing == "logSNR" and solver == "dpmpp_2m" and nfe in (1, 4, 10):
                    image_grid(images, os.path.join(OUT, f"samples_teacher_{solver}_nfe{nfe}.png"))
    return rows


def run_one(name, variant, teacher, metric, real, args):
    """Distil one student; returns (student rows, curve rows)."""
    from dpmjax.config import load_config
    from dpmjax.methods import finetune, load_student
    from dpmjax.metrics.report import image_grid, make_generator
    from dpmjax.nn import make_apply_fn
    from dpmjax.workdir import checkpoint_steps, load_config_of

    workdir = os.path.join(OUT, "runs", name)
    every = max(args.steps // args.curve_points, 1)
    overrides = [f"--config.train.num_steps={args.steps}", f"--config.train.checkpoint_every={every}",
                 f"--config.train.keep_checkpoints={args.curve_points + 1}", f"--config.train.log_every={every}",
                 f"--config.optim.learning_rate={args.lr}", f"--config.data.batch_size={args.batch_size}",
                 f"--config.train.ema_decay={args.ema_decay}", f"--config.seed={args.seed}"]
    config = load_config(f"{CONFIG}:{variant}", overrides)
    start = time.perf_counter()
    finetune("dmd2", teacher, config, workdir, num_devices=1, quiet=True)
    seconds = time.perf_counter() - start
    print(f"{name}: {args.steps} updates in {seconds:.0f} s", flush=True)
    full = load_config_of(workdir)
    k = int(full.sample.nfe)
    apply_fn = make_apply_fn(teacher.model, teacher.schedule)
    gens = {nfe: make_generator(apply_fn, teacher.schedule, teacher.image_shape, solver="renoise", nfe=nfe,
                                spacing=full.sample.spacing, prediction=teacher.prediction, batch_size=500)
            for nfe in STUDENT_NFES}
    curve = []
    for step in checkpoint_steps(workdir):
        params = load_student(full, workdir, step=step, use_ema=False)
        images = gens[k](params, NUM_SAMPLES, args.seed)
        curve.append({"run": name, "step": step, "nfe": k, **score(metric, real, images)})
        print("curve", curve[-1], flush=True)
    rows = []
    final = checkpoint_steps(workdir)[-1]
    for use_ema in (False, True):
        params = load_student(full, workdir, step=final, use_ema=use_ema)
        for nfe in STUDENT_NFES:
            images = gens[nfe](params, NUM_SAMPLES, args.seed)
            rows.append({"run": name, "variant": variant, "generator_steps": k, "updates": final,
                         "params": "ema" if use_ema else "raw", "nfe": nfe, **score(metric, real, images),
                         "train_seconds": round(seconds)})
            print("student", rows[-1], flush=True)
            if nfe == k and not use_ema:
                image_grid(images, os.path.join(OUT, f"samples_{name}.png"))
    return rows, curve


def plots(teacher_rows, student_rows, curve_rows, floor):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    runs = sorted({r["run"] for r in curve_rows})
    for run in runs:
        pts = sorted((int(r["step"]), float(r["frechet"])) for r in curve_rows if r["run"] == run)
        axes[0].plot(*zip(*pts), marker="o", label=run)
    axes[0].axhline(floor, color="gray", ls=":", label="real-data floor")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("update (critic steps; the generator gets 1/ttur of them)")
    axes[0].set_ylabel("Frechet distance (dataset classifier)")
    axes[0].set_title("DMD2 learning curves (raw generator, own NFE)")
    axes[0].legend(fontsize=7)
    for run in runs:
        metrics = os.path.join(OUT, "runs", run, "metrics.jsonl")
        if not os.path.exists(metrics):
            continue
        logs = [json.loads(line) for line in open(metrics)]
        axes[1].plot([m["step"] for m in logs], [m["loss_fake"] for m in logs], label=f"{run} loss_fake")
        axes[1].plot([m["step"] for m in logs], [m["loss_dm"] for m in logs], ls="--", label=f"{run} loss_dm")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("update")
    axes[1].set_title("losses (metrics.jsonl)")
    axes[1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, "learning_curves.png"), dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    best = {}
    for r in teacher_rows:
        nfe = int(r["nfe"])
        if nfe not in best or float(r["frechet"]) < best[nfe][0]:
            best[nfe] = (float(r["frechet"]), f"{r['solver']}/{r['spacing']}")
    if best:
        nfes = sorted(best)
        ax.plot(nfes, [best[n][0] for n in nfes], "k-o", label="teacher, best solver per NFE")
    for run in sorted({r["run"] for r in student_rows}):
        pts = sorted((int(r["nfe"]), float(r["frechet"])) for r in student_rows
                     if r["run"] == run and r["params"] == "raw")
        ax.plot(*zip(*pts), marker="s", label=run)
    ax.axhline(floor, color="gray", ls=":", label="real-data floor")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("NFE")
    ax.set_ylabel("Frechet distance")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, "fd_vs_nfe.png"), dpi=120)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(RUNS), help=f"runs to do (of {list(RUNS)})")
    parser.add_argument("--steps", type=int, default=600, help="updates per run (critic steps)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--ema-decay", type=float, default=0.9)
    parser.add_argument("--curve-points", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-teacher", action="store_true", help="reuse teacher.csv (or leave the table out)")
    parser.add_argument("--dataset", default="digits", choices=("digits", "fashion_mnist"))
    args = parser.parse_args()
    global OUT, NUM_SAMPLES, TEACHER_NFES  # one script run, one dataset: its folder and sample budget
    if args.dataset != "digits":
        OUT, NUM_SAMPLES, TEACHER_NFES = os.path.join(OUT, args.dataset), 500, (1, 2, 4, 10, 20)
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - set(RUNS))
    if unknown:
        parser.error(f"unknown runs {unknown}; choose from {list(RUNS)}")
    os.makedirs(os.path.join(OUT, "runs"), exist_ok=True)

    from dpmjax.metrics.domain import domain_metric
    from dpmjax.workdir import load_teacher

    teacher = load_teacher(teacher_workdir(args.dataset))
    real, _ = real_split(args.dataset, "test")
    train_images, _ = real_split(args.dataset, "train")
    metric = domain_metric(args.dataset)
    floor = score(metric, real, train_images[:NUM_SAMPLES])["frechet"]
    print(f"real-data floor ({NUM_SAMPLES} training images vs the {len(real)} held-out): FD {floor}", flush=True)
    teacher_csv = os.path.join(OUT, "teacher.csv")
    if not args.skip_teacher:
        if os.path.exists(teacher_csv):
            os.remove(teacher_csv)
        append_rows(teacher_csv, teacher_table(teacher, metric, real, args.seed))
    for name in names:
        rows, curve = run_one(name, RUNS[name], teacher, metric, real, args)
        replace_rows(os.path.join(OUT, "students.csv"), name, rows)
        replace_rows(os.path.join(OUT, "curves.csv"), name, curve)
        plots(read_rows(teacher_csv), read_rows(os.path.join(OUT, "students.csv")),
              read_rows(os.path.join(OUT, "curves.csv")), floor)
    plots(read_rows(teacher_csv), read_rows(os.path.join(OUT, "students.csv")),
          read_rows(os.path.join(OUT, "curves.csv")), floor)
    with open(os.path.join(OUT, "floor.json"), "w") as f:
        json.dump({"real_floor_frechet": floor}, f)


if __name__ == "__main__":
    main()
