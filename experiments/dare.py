"""DARE / DAREx at CPU scale: prune the delta of a finetuned digits UNet at p in {0.5, 0.9, 0.99} (issue 16 item 4).

    python experiments/dare.py                                  # mirror domain, full train split, ~15 min
    python experiments/dare.py --steps 200 --num 128            # quicker
    python experiments/dare.py --replot                         # redraw results/dare/curves.png from scores.csv

Setting. Source: the unconditional digits teacher of every method experiment (``_teachers.teacher_workdir
("digits")``, v-prediction UNet, 173k parameters). Target: ``style:digits:mirror``, its *whole* train split (1437
mirrored digits), not 10 shots: DARE and DAREx prune the delta of a supervised finetune on a real task, where the
delta encodes a skill rather than a memorised handful of images (a 10-shot finetune mostly learns to copy its shots,
and "quality" there is ill-defined); mirroring keeps the strokes and changes the layout, a moderate delta. Held out:
the mirrored test split (360 digits).

Finetunes (``--method full_finetune``, batch 64, Adam ``--lr`` constant, ``--steps`` updates): plain AdamW
(``adamr_lambda`` = 0) and AdamR (``adamr_lambda`` in ``--adamr``; ``dpmjax.train.adamr``), DAREx-L2's recipe.
lambda: AdamR's pull per step is lr lambda / s (theta - theta_pre) with s = sqrt(mean v_hat) ~ the RMS gradient,
measured at 9.3e-4 for this teacher on mirrored batches of 64; with lr = 1e-3 that is ~lambda per step, so
lambda = 0.01 / 0.05 pull the delta back with a time constant of ~100 / ~20 updates (1 would undo every step).
Each delta d = theta_ft - theta_teacher is pruned at each p by (``dpmjax.methods.dare``):

  dare             random drop, rescale 1/(1 - p);
  dare_q           DAREx-q, q in linspace(1 - p, 1, 41) minimising the output change mean |f_ft - f_pruned| on one
                   unlabelled batch (64 noisy training images of the target at random t), for the same mask;
  dare_q_analytic  DAREx-q per layer from the analytic bound (c = |d xbar|), eta chosen on that batch;
  magnitude        top (1 - p) of |d| per tensor, no rescale (the importance baseline);

each random variant with the masks of ``--seeds`` (0, 1, 2; the curves show the mean and the min-max range).
Scores of each pruned model (and of the unpruned finetune and the un-adapted teacher):

  loss   the denoising loss (v-prediction MSE, the training loss) on the held-out target images, 4 fixed draws of
         (t, noise) per image: the paper's "task performance" at this scale;
  fd     Frechet distance of ``--num`` samples (DPM-Solver++(2M), 10 NFE, Karras grid, fixed noise) to the held-out
         target images in the seed-0 digits classifier's features (``classifier:digits``), the images mirrored back
         first (the classifier saw upright digits); ``dpmjax.metrics.few_shot.adaptation_scores``;
  bytes  the size of the sparse delta file (``dare.save``) against the dense delta.

Writes results/dare/scores.csv, results/dare/curves.png, results/dare/deltas.csv (delta statistics) and the sparse
files under results/dare/deltas/.
"""
from __future__ import annotations

import argparse
import csv
import os
import time

from _adaptation import sampler as make_sampler, target_features
from _teachers import ROOT, teacher_workdir

OUT = os.path.join(ROOT, "results", "dare")
RATES = (0.5, 0.9, 0.99)


def _heldout_loss(teacher, images, draws=4, seed=7):
    """jitted params -> mean denoising loss on ``images`` over ``draws`` fixed (t, noise) draws per image."""
    import jax
    import jax.numpy as jnp

    from dpmjax.train import losses

    apply_fn, schedule = teacher.apply_fn(), teacher.schedule
    x0 = jnp.tile(jnp.asarray(images, jnp.float32), (draws, 1, 1, 1))
    k_t, k_noise = jax.random.split(jax.random.key(seed))
    t = losses.sample_times(k_t, x0.shape[0], schedule, jnp.float32)
    noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
    x_t = losses.diffuse(x0, t, noise, schedule)
    target = losses.target_for(x0, noise, t, schedule, teacher.prediction)

    @jax.jit
    def loss(params, x_t, t, target):
        return jnp.mean((apply_fn(params, x_t, t) - target) ** 2)

    return lambda params: float(loss(params, x_t, t, target))


def _delta_stats(d) -> dict:
    import jax
    import numpy as np

    values = np.concatenate([np.asarray(v).ravel() for v in jax.tree.leaves(d)])
    return {"entries": int(values.size), "mean_abs": float(np.mean(np.abs(values))), "mean": float(np.mean(values)),
            "std": float(np.std(values)), "max_abs": float(np.max(np.abs(values))),
            "l2": float(np.sqrt(np.sum(values ** 2)))}


def finetune(teacher, out, lam, args):
    import dpmjax.methods
    from dpmjax.config import configs_dir, load_config
    from dpmjax.workdir import checkpoint_steps

    config = load_config(os.path.join(configs_dir(), "methods", "full_finetune.py") +
                         f":target=style:digits:mirror,steps={args.steps},adamr={lam}")
    with config.unlocked():
        config.data.shots = None
        config.data.batch_size = 64
        config.optim.learning_rate = args.lr
        config.train.update(checkpoint_every=args.steps, log_every=max(args.steps // 4, 1))
    workdir = os.path.join(out, "runs", f"ft_adamr{lam:g}" if lam else "ft_adamw")
    start = time.time()
    try:
        done = checkpoint_steps(workdir)[-1] >= args.steps
    except FileNotFoundError:
        done = False
    if not done:
        dpmjax.methods.finetune("full_finetune", teacher, config, workdir, quiet=True)
    return workdir, config, time.time() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--adamr", default="0.01,0.05", help="AdamR's lambdas, comma-separated (module docstring)")
    parser.add_argument("--num", type=int, default=256, help="samples per FD row")
    parser.add_argument("--seeds", default="0,1,2", help="mask seeds of the random variants")
    parser.add_argument("--out", default=OUT)
    parser.add_argument("--replot", action="store_true")
    args = parser.parse_args()
    out = args.out
    if args.replot:
        with open(os.path.join(out, "scores.csv")) as f:
            plot(list(csv.DictReader(f)), out)
        return

    import jax
    import numpy as np

    from dpmjax.data.few_shot import load_style
    from dpmjax.methods import dare
    from dpmjax.metrics.few_shot import adaptation_scores
    from dpmjax.workdir import load_params, load_teacher, sample_settings

    os.makedirs(os.path.join(out, "deltas"), exist_ok=True)
    teacher = load_teacher(teacher_workdir("digits"))
    train = load_style("style:digits:mirror", "train")
    heldout = load_style("style:digits:mirror", "test").images
    shots = train.images[:10]  # one per digit: the clusters of the diversity score
    features = target_features("mirror")
    sampler = make_sampler(teacher.model, teacher.schedule, teacher.prediction, sample_settings(teacher.config))
    loss_of = _heldout_loss(teacher, heldout)
    x_T = jax.random.normal(jax.random.key(1234), (args.num, *teacher.image_shape))
    rows, delta_rows = [], []
    seeds = [int(v) for v in args.seeds.split(",") if v]

    def record(finetune_name, variant, p, params, **extra):
        start = time.time()
        samples = np.asarray(sampler(params, x_T))
        scores = adaptation_scores(samples, shots, heldout, features=features)
        row = {"finetune": finetune_name, "variant": variant, "p": p, "loss": round(loss_of(params), 5),
               "fd": round(scores["fd"], 4), "intra_diversity": round(scores["intra_diversity"], 4), **extra,
               "eval_s": round(time.time() - start, 1)}
        rows.append(row)
        print(row, flush=True)

    record("teacher", "base", 0.0, teacher.params)
    for lam in [0.0] + [float(v) for v in args.adamr.split(",") if v]:
        name = f"adamr{lam:g}" if lam else "adamw"
        workdir, _, seconds = finetune(teacher, out, lam, args)
        print(f"finetune {name}: {workdir} ({seconds:.0f} s)", flush=True)
        _, finetuned, _, ft_config = load_params(workdir)
        d = dare.delta(finetuned, teacher.params)
        delta_rows.append({"finetune": name, **_delta_stats(d), "train_s": round(seconds, 1)})
        print(delta_rows[-1], flush=True)
        record(name, "unpruned", 0.0, finetuned)
        calibration = dare.calibration_batch(ft_config, jax.random.key(1))
        for p in RATES:
            for variant in dare.VARIANTS:
                for seed in ([0] if variant == "magnitude" else seeds):  # magnitude pruning draws no mask
                    start = time.time()
                    pruned, info = dare.prune_workdirs(teacher.params, finetuned, variant=variant, p=p, seed=seed,
                                                       model=teacher.model, schedule=teacher.schedule,
                                                       calibration=calibration)
                    sparse = dare.sparsify(pruned, info=info)
                    size = dare.save(os.path.join(out, "deltas", f"{name}_{variant}_p{p:g}_seed{seed}.npz"), sparse)
                    prune_s = time.time() - start
                    q = info.get("q", info.get("q_mean", float("nan")))
                    record(name, variant, p, dare.apply(teacher.params, sparse), seed=seed, q=round(q, 4),
                           eta=round(info.get("eta", float("nan")), 4), bytes=size,
                           dense_bytes=dare.dense_nbytes(sparse), prune_s=round(prune_s, 1))
    for path, table in (("scores.csv", rows), ("deltas.csv", delta_rows)):
        fields = list(dict.fromkeys(k for r in table for k in r))
        with open(os.path.join(out, path), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(table)
    plot(rows, out)
    print(f"wrote {out}/scores.csv, deltas.csv, curves.png")


def plot(rows, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finetunes = [f for f in dict.fromkeys(r["finetune"] for r in rows) if f != "teacher"]
    base = next(r for r in rows if r["finetune"] == "teacher")
    fig, axes = plt.subplots(2, len(finetunes), figsize=(5 * len(finetunes), 7), squeeze=False)
    for col, name in enumerate(finetunes):
        mine = [r for r in rows if r["finetune"] == name]
        unpruned = next(r for r in mine if r["variant"] == "unpruned")
        for row_i, metric in enumerate(("loss", "fd")):
            ax = axes[row_i][col]
            for variant in ("dare", "dare_q", "dare_q_analytic", "magnitude"):
                by_p: dict = {}
                for r in mine:
                    if r["variant"] == variant:
                        by_p.setdefault(float(r["p"]), []).append(float(r[metric]))
                if by_p:
                    ps = sorted(by_p)
                    mean = [sum(by_p[p]) / len(by_p[p]) for p in ps]
                    low = [m - min(by_p[p]) for m, p in zip(mean, ps)]
                    high = [max(by_p[p]) - m for m, p in zip(mean, ps)]
                    ax.errorbar([1 - p for p in ps], mean, yerr=[low, high], fmt="o-", capsize=3, label=variant)
            ax.axhline(float(unpruned[metric]), color="k", ls="--", lw=1, label="finetuned (p = 0)")
            ax.axhline(float(base[metric]), color="gray", ls=":", lw=1, label="teacher (no delta)")
            ax.set_xscale("log")
            ax.invert_xaxis()  # p grows to the right
            ax.set_xticks([0.5, 0.1, 0.01])
            ax.set_xticklabels(["p=0.5", "p=0.9", "p=0.99"])
            ax.set_yscale("log")
            ax.set_ylabel(f"held-out {'denoising loss' if metric == 'loss' else 'FD (classifier features)'}")
            ax.set_title(f"{name}: {metric}")
            if row_i == 0 and col == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
