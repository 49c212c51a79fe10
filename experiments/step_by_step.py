"""Distilling step-by-step at CPU scale on digits and Fashion-MNIST: Frechet distance of a one-step
trajectory-distilled student vs the amount of distillation data (10 %, 25 %, 100 % of a pool of N teacher
pairs), with and without the auxiliary rationale targets (K intermediate states of the teacher's trajectory), at
equal update counts.

    python experiments/step_by_step.py                          # pool 4000 pairs, 1500 updates per run (~20 min)
    python experiments/step_by_step.py --pool 2000 --steps 600  # quicker
    python experiments/step_by_step.py --fractions 0.1,0.25 --alpha 0.8 --aux-only --out results/step_by_step/alpha0.8
    python experiments/step_by_step.py --fractions 0.1 --seed 1 --out results/step_by_step/seed1   # a replicate
    python experiments/step_by_step.py --fractions 0.1,0.25 --rationale denoised --aux-only --out results/step_by_step/denoised
    python experiments/step_by_step.py --plot-only
    python experiments/step_by_step.py --dataset fashion_mnist --pool 1000 --steps 300 --num 500 --batch-size 32

``--seed`` changes the pool of pairs (``method.pair_seed``) and the minibatch draws (``config.seed``); other
``--alpha`` / ``--seed`` settings go to another ``--out`` folder (rows are keyed by pairs, aux and updates).

The teacher is ``_teachers.teacher_workdir("digits")`` (configs/digits.py, v-prediction). Each run is
``dpmjax.methods.finetune("step_by_step", ...)`` with ``configs/methods/step_by_step.py`` (pairs from the teacher's
dpmpp_2m, 10 NFE, Karras grid; the first n pairs of one pool, so the data sets are nested; K = 3 states at
trajectory entries 1, 4, 6; alpha = 0.5; batch 64; Adam 1e-3 cosine; EMA 0.995). Every row scores 1000 samples
from fresh noise (never a training pair) against the 355 held-out digits in the seed-0 digits classifier
(``dpmjax.metrics.domain``), and the student's mean squared distance to the teacher's 10-NFE output on that same
noise (its held-out distillation error). References: the teacher at 1 NFE (its x0-prediction at t = 1: the
student's initialisation) and at its pair-generating 10 NFE. Writes ``results/step_by_step/quality.csv``,
``quality.png`` and sample grids. ``--dataset fashion_mnist``: the Fashion-MNIST teacher (``_teachers.OVERRIDES``),
its seed-0 classifier and the 10000 test images, under ``results/step_by_step/fashion_mnist/``.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "results", "step_by_step")
EVAL_SEED = 12345  # the evaluation noise; pairs use pair_seed 0 (fold_in(key(0), i)): never the same draws
FIELDS = ["model", "aux", "num_pairs", "fraction", "updates", "seconds", "frechet", "confident_share",
          "mse_to_teacher", "final_main_mse", "final_rationale_mse", "load", "alpha", "seed"]


def _append(path, row):
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)


def _done(path):
    if not os.path.exists(path):
        return set()
    return {(r["model"], r["aux"], r["num_pairs"], r["updates"]) for r in csv.DictReader(open(path))}


def _method_config(num_pairs: int, aux: bool, steps: int, alpha: float = 0.5, seed: int = 0,
                   rationale: str = "states", batch_size: int | None = None):
    from dpmjax.config import configs_dir, load_config

    config = load_config(os.path.join(configs_dir(), "methods", "step_by_step.py") +
                         f":pairs={num_pairs},aux={str(aux).lower()}")
    with config.unlocked():
        config.train.update(num_steps=steps, checkpoint_every=steps, log_every=max(1, steps // 10))
        config.method.update(alpha=alpha, pair_seed=seed, rationale=rationale)  # seed: another pool of pairs and other minibatches
        config.seed = seed
        if batch_size:
            config.data.batch_size = batch_size
    return config


def _generate(apply_fn, params, schedule, prediction, solver, spacing, nfe, x_T):
    import jax

    from dpmjax.samplers import make_param_sampler

    sampler = make_param_sampler(apply_fn, schedule=schedule, solver=solver, nfe=nfe, spacing=spacing,
                                 prediction=prediction, batch_size=x_T.shape[0])
    return jax.device_get(sampler(params, x_T, jax.random.key(EVAL_SEED + 1)))


def quality(pool, fractions, steps, num, out, alpha=0.5, seed=0, aux_only=False, rationale="states",
            dataset="digits", batch_size=None):
    import jax
    import numpy as np

    from _teachers import real_split, teacher_workdir
    from dpmjax.methods import finetune
    from dpmjax.metrics.domain import domain_metric
    from dpmjax.metrics.report import image_grid
    from dpmjax.workdir import load_params, load_teacher

    os.makedirs(out, exist_ok=True)
    teacher = load_teacher(teacher_workdir(dataset))
    apply_fn = teacher.apply_fn()
    real, _ = real_split(dataset, "test")
    scorer = domain_metric(dataset, 0)
    path = os.path.join(out, "quality.csv")
    done = _done(path)
    x_T = jax.random.normal(jax.random.key(EVAL_SEED), (num,) + teacher.image_shape)
    load = lambda: "%.1f" % os.getloadavg()[0]  # noqa: E731

    reference = _generate(apply_fn, teacher.params, teacher.schedule, teacher.prediction, "dpmpp_2m", "karras", 10,
                          x_T)

    def score(samples):
        result = scorer.evaluate(np.clip(samples, -1, 1), real)
        return dict(frechet=round(result["frechet"], 3), confident_share=round(result["confident_share"], 3),
                    mse_to_teacher=round(float(np.mean((samples - reference) ** 2)), 5))

    for name, solver, spacing, nfe in (("teacher dpmpp_2m 10 NFE (pair generator)", "dpmpp_2m", "karras", 10),
                                       ("teacher 1 NFE (x0 at t=1; student init)", "renoise", "time_uniform", 1)):
        if (name, "", "0", "0") in done:
            continue
        samples = _generate(apply_fn, teacher.params, teacher.schedule, teacher.prediction, solver, spacing, nfe, x_T)
        _append(path, dict(model=name, aux="", num_pairs=0, fraction="", updates=0, seconds=0, **score(samples),
                           final_main_mse="", final_rationale_mse="", load=load()))
        image_grid(np.clip(samples[:128], -1, 1), os.path.join(out, f"samples_teacher_nfe{nfe}.png"))

    for fraction in fractions:
        num_pairs = int(round(fraction * pool))
        for aux in ((True,) if aux_only else (False, True)):
            if ("student", str(aux), str(num_pairs), str(steps)) in done:
                continue
            workdir = os.path.join(out, "runs", f"pairs{num_pairs}_aux{int(aux)}_steps{steps}_alpha{alpha:g}_seed{seed}")
            start = time.perf_counter()
            finetune("step_by_step", teacher, _method_config(num_pairs, aux, steps, alpha, seed, rationale, batch_size),
                     workdir,
                     quiet=True)
            seconds = time.perf_counter() - start
            _, params, schedule, config = load_params(workdir)
            samples = _generate(apply_fn, params, schedule, teacher.prediction, config.sample.solver,
                                config.sample.spacing, int(config.sample.nfe), x_T)
            last = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))][-1]
            row = dict(model="student", aux=aux, num_pairs=num_pairs, fraction=fraction, updates=steps,
                       seconds=round(seconds, 1), **score(samples), final_main_mse=round(last["main_mse"], 5),
                       final_rationale_mse=round(last["rationale_mse"], 5), load=load(), alpha=alpha if aux else 1.0,
                       seed=seed)
            _append(path, row)
            image_grid(np.clip(samples[:128], -1, 1), os.path.join(out, f"samples_pairs{num_pairs}_aux{int(aux)}.png"))
            print(f"pairs={num_pairs} aux={aux}: FD {row['frechet']} mse_to_teacher {row['mse_to_teacher']} "
                  f"(train main mse {row['final_main_mse']}), {seconds:.0f} s", flush=True)
            plot(out)


def plot(out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(open(os.path.join(out, "quality.csv"))))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, field, label in ((axes[0], "frechet", "Frechet distance (seed-0 classifier)"),
                             (axes[1], "mse_to_teacher", "MSE to the teacher's 10-NFE output")):
        for aux, name in (("False", "without rationale (alpha = 1)"), ("True", "with rationale (K = 3)")):
            points = sorted((int(r["num_pairs"]), float(r[field])) for r in rows
                            if r["model"] == "student" and r["aux"] == aux)
            if points:
                ax.plot(*zip(*points), "o-", label=name)
        for r, style in zip([r for r in rows if r["model"] != "student"], (":", "--")):
            if float(r[field]) > 0:  # the pair generator's MSE to itself is 0: no line on a log axis
                ax.axhline(float(r[field]), ls=style, c="k", label=r["model"])
        ax.set_xscale("log")
        ax.set_yscale("log")
        counts = sorted({int(r["num_pairs"]) for r in rows if r["model"] == "student"})
        ax.set_xticks(counts, [str(n) for n in counts])
        ax.minorticks_off()
        ax.set_xlabel("distillation pairs")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "quality.png"), dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", type=int, default=4000, help="pairs in the pool (100 %%)")
    parser.add_argument("--fractions", default="0.1,0.25,1.0")
    parser.add_argument("--steps", type=int, default=1500, help="updates per run (the same for every run)")
    parser.add_argument("--num", type=int, default=1000, help="samples scored per row")
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of the main loss in the aux runs")
    parser.add_argument("--seed", type=int, default=0, help="pair_seed and training seed of the student runs")
    parser.add_argument("--aux-only", action="store_true", help="only the runs with the rationale head")
    parser.add_argument("--rationale", default="states", help="states (noisy x_t) or denoised (teacher x0 there)")
    parser.add_argument("--batch-size", type=int, default=None, help="pairs per update (default: the config's 64)")
    parser.add_argument("--dataset", default="digits", choices=("digits", "fashion_mnist"))
    parser.add_argument("--out", default=None, help="default results/step_by_step, results/step_by_step/<dataset>")
    parser.add_argument("--plot-only", action="store_true")
    args = parser.parse_args(argv)
    args.out = args.out or (OUT if args.dataset == "digits" else os.path.join(OUT, args.dataset))
    if args.plot_only:
        plot(args.out)
        return 0
    quality(args.pool, [float(f) for f in args.fractions.split(",")], args.steps, args.num, args.out, args.alpha,
            args.seed, args.aux_only, args.rationale, args.dataset, args.batch_size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
