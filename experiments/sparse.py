"""Sparse finetuning of the digits teacher at CPU scale: eps-loss only vs + output distillation vs + SquareHead at
50 / 75 / 90 % sparsity, and what sparsity buys in speed here (issue 17 item 2; dpmjax/methods/sparse.py).

    python experiments/sparse.py                                   # 9 runs of 300 updates + the speed table
    python experiments/sparse.py --speed-only                      # only the speed table
    python experiments/sparse.py --steps 600 --only 0.9 --out results/sparse/long

Teacher: the digits UNet of every method experiment (``_teachers.teacher_workdir("digits")``, v-prediction,
173k parameters). Each run is ``dpmjax.methods.finetune("sparse", ...)`` with ``configs/methods/sparse.py:
sparsity=S,distill=D,steps=N``: the teacher's training split, batch 64, Adam 5e-4 cosine, the cubic ramp to S over
the first 75 % of the updates (pruning every 10), per-tensor magnitude masks over every Dense / Conv kernel.
Scores of the final (masked) student:

  heldout_loss  the denoising loss (the teacher's v-target MSE) on the digits test split, 8 fixed (t, eps) draws
                per image (the same draws for every row);
  fd            Frechet distance between 500 samples (fixed noise; the teacher's sampler: DPM-Solver++(2M),
                10 NFE, Karras grid) and the test split, in the seed-0 digits classifier's 128-d features;
  sparsity      the measured fraction of exact zeros over the prunable kernels.

Rows "teacher" (dense) and "real" (500 training images scored as samples: the FD floor) frame the table.

Speed (``speed.csv``): the denoiser call (batch 500, the sampler's, jitted) with the dense teacher's params and with
a 90 %-masked copy: the same XLA program on arrays of the same shapes, so any difference is noise -- dense
kernels do no less work for zeros. Then one layer executed truly sparse: y = patches @ W for the im2col form of a
3x3 convolution, at the digits UNet's size (32 -> 32 channels, 8x8 maps, batch 500) and at a DDPM-CIFAR10 size
(256 -> 256 channels, 8x8 maps, batch 16), by dense XLA, ``jax.experimental.sparse`` BCOO and scipy.sparse CSR,
at 0 / 50 / 75 / 90 % magnitude sparsity. Writes OUT/scores.csv, OUT/speed.csv, OUT/scores.png, OUT/grid_*.png.
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import tempfile
import time

from _adaptation import grid, sampler
from _teachers import ROOT, real_split, teacher_workdir

OUT = os.path.join(ROOT, "results", "sparse")
DISTILLS = ("none", "output", "squarehead")


def heldout_loss_fn(teacher, images, draws=8):
    """jitted params -> the denoising loss on ``images`` with fixed (t, eps) draws."""
    import jax
    import jax.numpy as jnp

    from dpmjax.methods.adaptation import noised

    apply_fn = teacher.apply_fn()
    images = jnp.asarray(images)

    @jax.jit
    def loss(params):
        def one(key):
            x_t, t, target = noised({"image": images}, key, teacher.schedule, teacher.prediction)
            return jnp.mean((apply_fn(params, x_t, t) - target) ** 2)

        return jnp.mean(jax.lax.map(one, jax.random.split(jax.random.key(1234), draws)))

    return loss


def timed(fn, *args, repeats=20):
    """Median seconds of ``fn(*args)`` (results blocked on), after one warm-up call."""
    import jax
    import numpy as np

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def speed_rows(teacher):
    """The speed table (see the module docstring)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import scipy.sparse
    from jax.experimental import sparse as jsparse

    from dpmjax.methods.sparse import apply_masks, magnitude_masks

    rows = []
    apply_fn = jax.jit(teacher.apply_fn())
    x = jax.random.normal(jax.random.key(0), (500,) + teacher.image_shape, jnp.float32)
    t = jnp.full((500,), 0.5, jnp.float32)
    masked = apply_masks(teacher.params, magnitude_masks(teacher.params, 0.9))
    for name, params in (("dense", teacher.params), ("masked_0.9", masked)):
        rows.append({"what": "denoiser call, batch 500 (dense XLA)", "params": name, "sparsity": 0.0 if name ==
                     "dense" else 0.9, "ms": 1e3 * timed(apply_fn, params, x, t, repeats=10)})
    rng = np.random.default_rng(0)
    for label, (batch, cin, cout) in (("digits UNet conv 3x3 32->32, 8x8, batch 500", (500, 32, 32)),
                                      ("DDPM-CIFAR10 conv 3x3 256->256, 8x8, batch 16", (16, 256, 256))):
        patches = jnp.asarray(rng.normal(size=(batch * 64, 9 * cin)), jnp.float32)
        weight = rng.normal(size=(9 * cin, cout)).astype(np.float32)
        dense_mm = jax.jit(lambda a, w: a @ w)
        patches_np = np.asarray(patches)
        for s in (0.0, 0.5, 0.75, 0.9):
            w = np.asarray(apply_masks({"kernel": jnp.asarray(weight)},
                                       magnitude_masks({"kernel": jnp.asarray(weight)}, s))["kernel"])
            rows.append({"what": label, "params": "dense XLA matmul", "sparsity": s,
                         "ms": 1e3 * timed(dense_mm, patches, jnp.asarray(w), repeats=10)})
            bcoo = jsparse.BCOO.fromdense(jnp.asarray(w.T))  # [cout, 9 cin], nse = kept weights
            sparse_mm = jax.jit(lambda wt, a: (wt @ a.T).T)
            rows.append({"what": label, "params": "BCOO (jax.experimental.sparse)", "sparsity": s,
                         "ms": 1e3 * timed(sparse_mm, bcoo, patches, repeats=3)})
            csr = scipy.sparse.csr_matrix(w.T)
            rows.append({"what": label, "params": "scipy.sparse CSR", "sparsity": s,
                         "ms": 1e3 * timed(lambda: (csr @ patches_np.T).T, repeats=5)})
            rows.append({"what": label, "params": "numpy dense (BLAS)", "sparsity": s,
                         "ms": 1e3 * timed(lambda: patches_np @ w, repeats=5)})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--only", default="0.5,0.75,0.9", help="comma-separated sparsities")
    parser.add_argument("--num", type=int, default=500)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--speed-only", action="store_true")
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from dpmjax.config import configs_dir, load_config
    from dpmjax.methods import finetune, get_method
    from dpmjax.methods.sparse import sparsity_of
    from dpmjax.metrics.features import feature_network
    from dpmjax.metrics.fid import frechet_distance, statistics_from_features
    from dpmjax.workdir import load_teacher

    os.makedirs(args.out, exist_ok=True)
    started = time.time()
    teacher = load_teacher(teacher_workdir("digits"))
    settings = dict(teacher.config.sample)
    run_sampler = sampler(teacher.model, teacher.schedule, teacher.prediction, settings)
    x_T = jax.random.normal(jax.random.key(7), (args.num,) + teacher.image_shape, jnp.float32)
    test_images, _ = real_split("digits", "test")
    train_images, _ = real_split("digits", "train")
    net = feature_network("classifier:digits", image_shape=(8, 8, 1))
    embed = jax.jit(net.apply)
    reference = statistics_from_features(np.asarray(embed(net.params, jnp.asarray(test_images))))
    heldout = heldout_loss_fn(teacher, test_images)

    def score(name, sparsity, distill, params, seconds):
        samples = np.asarray(run_sampler(params, x_T))
        fd = frechet_distance(*statistics_from_features(np.asarray(embed(net.params, jnp.asarray(samples)))),
                              *reference)
        grid(samples, os.path.join(args.out, f"grid_{name}.png"))
        row = {"run": name, "sparsity_target": sparsity, "distill": distill,
               "sparsity": round(sparsity_of(params)["total"], 4), "heldout_loss": float(heldout(params)),
               "fd": float(fd), "train_s": round(seconds, 1)}
        print(row, flush=True)
        return row

    if args.speed_only:
        return write_speed(teacher, args.out, started)
    rows = [score("teacher", 0.0, "-", teacher.params, 0.0)]
    real = np.asarray(train_images[:args.num])
    rows.append({"run": "real", "sparsity_target": 0.0, "distill": "-", "sparsity": 0.0, "heldout_loss": float("nan"),
                 "fd": float(frechet_distance(*statistics_from_features(np.asarray(embed(net.params,
                                                                                         jnp.asarray(real)))),
                                              *reference)), "train_s": 0.0})
    workroot = tempfile.mkdtemp(prefix="sparse_runs_")
    try:
        for sparsity in [float(s) for s in args.only.split(",") if s]:
            for distill in DISTILLS:
                name = f"s{sparsity:g}_{distill}"
                config = load_config(os.path.join(configs_dir(), "methods", "sparse.py")
                                     + f":sparsity={sparsity},distill={distill},steps={args.steps}")
                begin = time.time()
                state = finetune("sparse", teacher, config, os.path.join(workroot, name), num_devices=1, quiet=True)
                seconds = time.time() - begin
                program = get_method("sparse").build(config, teacher)
                params = jax.device_get(program.student(state.method, use_ema=False))
                rows.append(score(name, sparsity, distill, params, seconds))
    finally:
        shutil.rmtree(workroot, ignore_errors=True)
    with open(os.path.join(args.out, "scores.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("heldout_loss", "fd")):
        for distill in DISTILLS:
            points = [(r["sparsity_target"], r[metric]) for r in rows if r["distill"] == distill]
            if points:
                ax.plot(*zip(*points), "o-", label=distill)
        ax.axhline(rows[0][metric], color="k", ls="--", label="dense teacher")
        ax.set_xlabel("sparsity")
        ax.set_ylabel(metric)
        ax.legend()
    fig.suptitle(f"sparse finetuning of the digits UNet, {args.steps} updates")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "scores.png"), dpi=100)

    if not args.skip_speed:
        return write_speed(teacher, args.out, started)
    print(f"done in {time.time() - started:.0f} s; wrote {args.out}", flush=True)


def write_speed(teacher, out, started):
    speed = speed_rows(teacher)
    for row in speed:
        print(row, flush=True)
    with open(os.path.join(out, "speed.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(speed[0]))
        writer.writeheader()
        writer.writerows(speed)
    print(f"done in {time.time() - started:.0f} s; wrote {out}", flush=True)


if __name__ == "__main__":
    main()
