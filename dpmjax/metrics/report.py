"""Sample-quality reports of a trained model: per (solver, NFE), the domain metric (classifier Frechet
distance and confident-label share) against held-out real images, as CSV rows, a plot and a sample grid."""
from __future__ import annotations

import csv
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import dpmjax


def generate(model_fn, schedule, image_shape, *, solver: str, nfe: int, num: int, seed: int = 0,
             batch_size: int = 500, spacing: str = "logSNR", **options) -> np.ndarray:
    """``num`` samples [num, H, W, C] from fixed noise (seeded), jitted once per (solver, nfe)."""
    entry = dpmjax.SOLVERS[solver]
    kwargs = dict(nfe=nfe, spacing=spacing, **options)
    if solver == "ddpm" and isinstance(schedule, dpmjax.DiscreteVP):
        # ancestral sampling on nfe training timesteps (all of them for nfe = N), then the last step to
        # sigma = 0 (Ho et al. 2020, Alg. 2); the appended 0 marks that end.
        n = schedule.num_train_timesteps
        ks = np.linspace(0, n - 1, nfe).round()[::-1]
        kwargs = dict(timesteps=np.append((ks + 1.0) / n, 0.0), final_sigma="zero", **options)
    fn = dpmjax.make_sampler(model_fn, schedule=schedule, solver=solver, **kwargs)
    out = []
    key = jax.random.key(seed)
    for start in range(0, num, batch_size):
        size = min(batch_size, num - start)
        k_noise, k_solver = jax.random.split(jax.random.fold_in(key, start))
        x_T = jax.random.normal(k_noise, (size,) + tuple(image_shape), jnp.float32)
        out.append(np.asarray(fn(x_T, k_solver if entry.stochastic else None)))
    return np.clip(np.concatenate(out), -1.0, 1.0)


def image_grid(images, path: str, columns: int = 16) -> None:
    """Save a PNG grid of images in [-1, 1] ([N, H, W, C], C = 1 or 3)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = (np.asarray(images)[: columns * columns] + 1.0) / 2.0
    n, h, w, c = images.shape
    rows = -(-n // columns)
    canvas = np.ones((rows * (h + 1) + 1, columns * (w + 1) + 1, c), np.float32)
    for i, img in enumerate(images):
        r, q = divmod(i, columns)
        canvas[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = img
    scale = max(1, 32 // h)  # nearest-neighbour upscaling so 8x8 digits are visible
    canvas = np.repeat(np.repeat(canvas, scale, axis=0), scale, axis=1)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    plt.imsave(path, canvas[..., 0] if c == 1 else canvas, cmap="gray" if c == 1 else None, vmin=0, vmax=1)


def quality_table(model_fn, schedule, config, *, solvers, nfes, num: int = 1000, ddpm_steps: int | None = 1000,
                  ddpm_num: int | None = None, out_dir: str | None = None, seed: int = 0, fid_num: int = 0, log=print):
    """Rows {solver, nfe, frechet, confident_share, seconds} plus the real-data floor; CSV + plot in out_dir.

    With ``fid_num > 0`` each row also gets FID and KID (FID Inception-v3, real weights) of its first
    ``fid_num`` samples against as many held-out real images (upsampled to 299 as pytorch-fid does; about
    3.5 images/s on a 2-core CPU, so keep it small there).
    """
    from dpmjax.data import get_dataset
    from dpmjax.metrics.domain import _all, domain_metric

    dataset = config.data.name
    metric = domain_metric(dataset)
    real_test, _ = _all(get_dataset(dataset, "test"))
    real_train, _ = _all(get_dataset(dataset, "train"))
    floor = metric.evaluate(real_train[: max(num, len(real_test))], real_test)
    rows = [{"solver": "real (train vs held-out)", "nfe": 0, "frechet": floor["frechet"],
             "confident_share": floor["confident_share"], "seconds": 0.0}]
    shape = tuple(config.data.image_shape)
    runs = [(s, n) for s in solvers for n in nfes]
    if ddpm_steps:
        runs.append(("ddpm", ddpm_steps))
    samples = {}
    inception = _InceptionScores(real_test, fid_num) if fid_num > 0 else None
    if inception is not None:
        rows[0].update(inception.score(real_train))
    for solver, nfe in runs:
        start = time.perf_counter()
        count = ddpm_num if (solver == "ddpm" and ddpm_num) else num
        images = generate(model_fn, schedule, shape, solver=solver, nfe=nfe, num=count, seed=seed)
        seconds = time.perf_counter() - start
        result = metric.evaluate(images, real_test)
        rows.append({"solver": solver, "nfe": nfe, "frechet": result["frechet"],
                     "confident_share": result["confident_share"], "seconds": seconds})
        if inception is not None:
            rows[-1].update(inception.score(images))
        samples[(solver, nfe)] = images
        log(f"{solver:<14} nfe={nfe:<5} frechet={result['frechet']:8.3f} "
            f"confident>0.9={result['confident_share']:.3f}  ({seconds:.1f} s, {count} samples)")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "quality.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        _plot(rows, os.path.join(out_dir, "quality.png"))
    return rows, samples, floor


class _InceptionScores:
    """FID / KID against a fixed real set, with the real features computed once."""

    def __init__(self, real, num: int):
        from dpmjax.metrics import inception_features, load_inception_params
        self.num, self.params = num, load_inception_params()
        self.features = lambda x: inception_features(self.params, (np.asarray(x[:num]) + 1.0) / 2.0,
                                                     progress=False)
        self.real = self.features(real)

    def score(self, images) -> dict:
        from dpmjax.metrics.fid import frechet_distance, kernel_inception_distance, statistics_from_features
        feats = self.features(images)
        fid = frechet_distance(*statistics_from_features(feats), *statistics_from_features(self.real))
        kid, _ = kernel_inception_distance(feats, self.real, num_subsets=10)
        return {"fid": fid, "kid": kid}


def _plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    solvers = sorted({r["solver"] for r in rows if r["nfe"] and r["solver"] != "ddpm"})
    for solver in solvers:
        pts = sorted((r["nfe"], r["frechet"]) for r in rows if r["solver"] == solver)
        ax.plot(*zip(*pts), marker="o", label=solver)
    for r in rows:
        if r["solver"] == "ddpm":
            ax.axhline(r["frechet"], ls="--", c="gray", label=f"ddpm {r['nfe']} steps")
        if r["nfe"] == 0:
            ax.axhline(r["frechet"], ls=":", c="k", label="real floor")
    ax.set_xlabel("NFE")
    ax.set_ylabel("classifier Frechet distance")
    ax.set_xscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
