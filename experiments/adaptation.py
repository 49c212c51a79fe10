"""Few-shot adaptation at CPU scale: plain finetuning vs DomainStudio (and LoRA / QST when registered) on 10 shots
of a style-shifted digit domain (issue 16; dpmjax/data/few_shot.py, dpmjax/metrics/few_shot.py).

    python experiments/adaptation.py                                   # invert domain, 1000 updates, all methods
    python experiments/adaptation.py --transform mirror --out results/adaptation/mirror
    python experiments/adaptation.py --only full_finetune,domainstudio --steps 300 --eval-at 100,300

Source: the unconditional digits teacher of every method experiment (``_teachers.teacher_workdir("digits")``,
v-prediction UNet, 173k parameters). Target: the first 10 images (one per digit) of ``style:digits:TRANSFORM``;
held out: the other 1787 digits in that style. Each method runs ``dpmjax.methods.finetune`` with its
``configs/methods/<method>.py`` (the 10 shots, batch 8, Adam at the config's rate or ``--lr``) and is evaluated at the updates of
``--eval-at`` on ``--num`` samples (fixed noise, the workdir's sampler: DPM-Solver++(2M), 10 NFE, Karras grid):

  fd               Frechet distance to the held-out target images, in the seed-0 digits classifier's features of
                   the images mapped back to the source style (``invert`` / ``mirror`` are their own inverses;
                   the classifier was trained on upright white-on-black digits; ``dilate`` is scored as is);
  intra_diversity  DomainStudio's Intra-cluster diversity in those features (samples clustered by nearest shot);
  nn_shot          mean pixel L2 distance to the nearest shot; ``copy_rate`` the share of samples closer to a
                   shot than 1 % of the held-out target images are (``dpmjax.metrics.few_shot``).

Rows "source" (the teacher, un-adapted), "heldout" (500 real held-out target images scored as samples: what a
model of the whole domain would get) and "copies" (500 draws of the 10 shots: a perfect memoriser) frame the
table. Writes OUT/scores.csv, OUT/grid_<run>_<step>.png and
OUT/scores.png.
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import time

from _adaptation import grid, sampler, target_features
from _teachers import ROOT, teacher_workdir

OUT = os.path.join(ROOT, "results", "adaptation")
RUNS = {  # run name -> (method, extra config variant)
    "full_finetune": ("full_finetune", ""),
    "domainstudio": ("domainstudio", ""),
    "domainstudio_sim_only": ("domainstudio", "hf_pair_weight=0.0,hf_mse_weight=0.0"),  # the ablation: no HF terms
    "lora": ("lora", ""),
    "qst": ("qst", ""),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transform", default="invert", choices=("invert", "mirror", "dilate"))
    parser.add_argument("--shots", type=int, default=10)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--eval-at", default="100,300,1000")
    parser.add_argument("--lr", type=float, default=None, help="Adam's learning rate of every run (default: each "
                        "method config's: 5e-4 full finetuning / DomainStudio, 2e-3 LoRA / QST)")
    parser.add_argument("--num", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0, help="config.seed of every run (data order, noise)")
    parser.add_argument("--only", default="", help=f"comma-separated runs of {list(RUNS)} (default: all whose "
                        "method is registered)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import jax
    import numpy as np

    import dpmjax.methods
    from dpmjax.config import configs_dir, load_config
    from dpmjax.data.few_shot import few_shot_target
    from dpmjax.metrics.few_shot import adaptation_scores
    from dpmjax.workdir import load_params, load_teacher, sample_settings

    out = args.out or os.path.join(OUT, args.transform)
    os.makedirs(out, exist_ok=True)
    eval_at = sorted({int(s) for s in args.eval_at.split(",") if s} | {args.steps})
    runs = args.only.split(",") if args.only else list(RUNS)
    unknown = [run for run in runs if run not in RUNS]
    if unknown:
        parser.error(f"unknown runs {unknown}; choose from {list(RUNS)}")
    runs = [run for run in runs if RUNS[run][0] in dpmjax.methods.METHOD_MODULES]
    teacher = load_teacher(teacher_workdir("digits"))
    target = few_shot_target("digits", args.transform, args.shots)
    features = target_features(args.transform)
    x_T = jax.random.normal(jax.random.key(1234), (args.num, *teacher.image_shape))
    rows = []

    def record(run, step, samples, seconds=float("nan")):
        scores = adaptation_scores(samples, target.shots, target.heldout, features=features)
        rows.append({"run": run, "step": step, **{k: round(v, 4) if isinstance(v, float) else v
                                                   for k, v in scores.items()}, "train_s": round(seconds, 1)})
        print(rows[-1], flush=True)
        grid(samples, os.path.join(out, f"grid_{run}_{step}.png"))

    settings = sample_settings(teacher.config)
    source_sampler = sampler(teacher.model, teacher.schedule, teacher.prediction, settings)
    record("source", 0, source_sampler(teacher.params, x_T))
    rng = np.random.default_rng(0)
    record("heldout", 0, target.heldout[rng.choice(len(target.heldout), min(args.num, len(target.heldout)),
                                                   replace=False)])
    record("copies", 0, target.shots[rng.integers(0, args.shots, args.num)])  # a perfect memoriser
    grid(target.shots, os.path.join(out, "shots.png"), columns=args.shots)
    for run in runs:
        method, variant = RUNS[run]
        config = load_config(os.path.join(configs_dir(), "methods", f"{method}.py") +
                             f":target=style:digits:{args.transform},shots={args.shots},steps={args.steps}" +
                             (f",{variant}" if variant else ""))
        with config.unlocked():
            if args.lr is not None:
                config.optim.learning_rate = args.lr
            config.seed = args.seed
            config.train.update(checkpoint_every=min(eval_at), keep_checkpoints=len(eval_at) + args.steps)
        workdir = os.path.join(out, "runs", run)
        shutil.rmtree(workdir, ignore_errors=True)  # every run starts from the teacher (no resume of old runs)
        start = time.time()
        dpmjax.methods.finetune(method, teacher, config, workdir, quiet=True)
        seconds = time.time() - start
        run_sampler = None
        for step in eval_at:
            model, params, _, _ = load_params(workdir, step=step)
            run_sampler = run_sampler or sampler(model, teacher.schedule, teacher.prediction, settings)  # QST: own net
            record(run, step, run_sampler(params, x_T), seconds if step == args.steps else float("nan"))
    with open(os.path.join(out, "scores.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, out)


def plot(rows, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("fd", "intra_diversity", "copy_rate")
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.5))
    for axis, key in zip(axes, keys):
        for run in dict.fromkeys(r["run"] for r in rows if r["run"] not in ("source", "heldout", "copies")):
            points = [(r["step"], r[key]) for r in rows if r["run"] == run]
            axis.plot(*zip(*points), marker="o", label=run)
        for ref, style in (("heldout", ":"), ("source", "--"), ("copies", "-.")):
            value = [r[key] for r in rows if r["run"] == ref][0]
            axis.axhline(value, ls=style, c="k", lw=1, label=ref)
        axis.set_xlabel("updates")
        axis.set_title(key)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "scores.png"), dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
