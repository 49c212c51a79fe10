"""Sample-quality reports of a trained model: per (solver, NFE), the domain metric (classifier Frechet
distance and confident-label share) against held-out real images, as CSV rows, a plot and a sample grid.

    gen = make_generator(apply_fn, schedule, (8, 8, 1), solver="dpmpp_2m", nfe=10, batch_size=500)
    images = gen(params, 1000, seed=0)                      # a new checkpoint: same program, no recompile
    rows, samples, floor = quality_table(model_fn, schedule, config, solvers=["dpmpp_2m"], nfes=[5, 10],
                                         out_dir="runs/digits/eval")

Sampling goes through the library's params-as-arguments sampler (``dpmjax.make_param_sampler``): one compiled
program per (solver, NFE, batch), the last partial batch padded, params an argument. ``quality_table`` writes each
row to ``quality.csv`` as soon as it is finished, so a failure late in the list loses none of the rows before it.
"""
from __future__ import annotations

import csv
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import dpmjax

__all__ = ["make_generator", "generate", "image_grid", "quality_table", "sampler_kwargs", "CSV_FIELDS"]

CSV_FIELDS = ("solver", "nfe", "num", "frechet", "confident_share", "seconds")


def sampler_kwargs(schedule, solver: str, nfe: int, spacing: str, options: dict) -> dict:
    """``make_param_sampler`` keywords for (solver, nfe): ``ddpm`` on a discrete schedule runs on training steps.

    Ancestral DDPM on ``nfe`` training timesteps (all of them for nfe = N), then the last step to sigma = 0
    (Ho et al. 2020, Alg. 2); the appended 0 marks that end. Every other solver: ``nfe`` and ``spacing``.
    """
    if solver == "ddpm" and isinstance(schedule, dpmjax.DiscreteVP):
        n = schedule.num_train_timesteps
        steps = np.linspace(0, n - 1, nfe).round()[::-1]
        return dict(timesteps=np.append((steps + 1.0) / n, 0.0), final_sigma="zero", **options)
    return dict(nfe=nfe, spacing=spacing, **options)


def make_generator(apply_fn, schedule, image_shape, *, solver: str, nfe: int, batch_size: int = 500,
                   spacing: str = "logSNR", mesh=None, **options):
    """``gen(params, num, seed=0, progress=False) -> [num, *image_shape]`` samples in [-1, 1], float32.

    One ``dpmjax.make_param_sampler`` program of batch ``batch_size`` (rounded up to a multiple of the mesh's data
    axis) serves every call: params are an argument (a new checkpoint or an EMA swap does not recompile) and the
    last partial batch is padded. Sample i's noise depends only on (seed, its batch start): x_T of the batch at
    ``start`` is ``normal(split(fold_in(key(seed), start))[0])``, the solver key (stochastic solvers) the other half,
    so the images do not depend on the number requested. Arguments are validated here, before anything compiles.

    Args:
      apply_fn: ``apply_fn(params, x, t) -> prediction`` (``dpmjax.nn.make_apply_fn``).
      solver, nfe, spacing: the sampler (``ddpm`` on a ``DiscreteVP`` schedule samples on training steps).
      mesh: a ``dpmjax.sharding.make_mesh()`` mesh to split each batch over, or None (one device).
      options: ``sample``'s keywords (prediction, final_sigma, solver options such as ``ems``).
    """
    shards = 1 if mesh is None else dpmjax.sharding.data_axis_size(mesh)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    batch = -(-int(batch_size) // shards) * shards
    sampler = dpmjax.make_param_sampler(apply_fn, schedule=schedule, solver=solver, mesh=mesh, batch_size=batch,
                                        **sampler_kwargs(schedule, solver, nfe, spacing, options))
    stochastic = dpmjax.SOLVERS[solver].stochastic
    shape = tuple(image_shape)

    def gen(params, num: int, seed: int = 0, progress: bool = False) -> np.ndarray:
        if isinstance(num, bool) or not isinstance(num, (int, np.integer)) or num < 1:
            raise ValueError(f"num must be a positive integer, got {num!r}")
        key, out = jax.random.key(seed), []
        with tqdm(total=int(num), unit="img", desc=f"sampling {solver} nfe={nfe}", disable=not progress) as bar:
            for start in range(0, num, batch):
                size = min(batch, num - start)
                k_noise, k_solver = jax.random.split(jax.random.fold_in(key, start))
                x_T = jax.random.normal(k_noise, (size,) + shape, jnp.float32)
                out.append(np.asarray(sampler(params, x_T, k_solver if stochastic else None)))
                bar.update(size)
        return np.clip(np.concatenate(out), -1.0, 1.0)

    gen.batch_size = batch
    gen.sampler = sampler
    return gen


def generate(model_fn, schedule, image_shape, *, solver: str, nfe: int, num: int, seed: int = 0,
             batch_size: int = 500, spacing: str = "logSNR", params=None, mesh=None, progress: bool = False,
             **options) -> np.ndarray:
    """``num`` samples [num, H, W, C] in [-1, 1] from fixed seeded noise (see ``make_generator``).

    ``params=None``: ``model_fn(x, t)`` is a closure (``dpmjax.workdir.load_for_sampling``), compiled into the
    program as before. With ``params``: ``model_fn`` is ``apply_fn(params, x, t)`` and params are an argument of
    the program. The compiled batch is ``min(batch_size, num)`` (rounded up to the mesh's data axis), so a small
    request does not run a padded 500-batch; the last partial batch is padded, not recompiled.
    """
    if params is None:
        apply_fn, params = (lambda _, x, t: model_fn(x, t)), ()
    else:
        apply_fn = model_fn
    if isinstance(num, bool) or not isinstance(num, (int, np.integer)) or num < 1:
        raise ValueError(f"num must be a positive integer, got {num!r}")
    gen = make_generator(apply_fn, schedule, image_shape, solver=solver, nfe=nfe,
                         batch_size=min(int(batch_size), int(num)), spacing=spacing, mesh=mesh, **options)
    return gen(params, num, seed, progress)


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


class _RowWriter:
    """quality.csv written row by row (flushed and fsynced), so finished rows survive a later failure."""

    def __init__(self, out_dir, fields):
        self.file = None
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
            self.file = open(os.path.join(out_dir, "quality.csv"), "w", newline="")
            self.writer = csv.DictWriter(self.file, fieldnames=list(fields), extrasaction="ignore")
            self.writer.writeheader()
            self._sync()

    def _sync(self):
        self.file.flush()
        os.fsync(self.file.fileno())

    def write(self, row: dict):
        if self.file is not None:
            self.writer.writerow(row)
            self._sync()

    def close(self):
        if self.file is not None:
            self.file.close()


def quality_table(model_fn, schedule, config, *, solvers, nfes, num: int = 1000, ddpm_steps: int | None = 1000,
                  ddpm_num: int | None = None, out_dir: str | None = None, seed: int = 0, fid_num: int = 0,
                  log=print, params=None, spacing: str = "logSNR", solver_options: dict | None = None,
                  prediction: str = "eps", batch_size: int = 500, mesh=None, progress: bool = True):
    """Rows {solver, nfe, num, frechet, confident_share, seconds[, fid, kid]}, the real-data floor first.

    The floor row compares real training images with the held-out split (``nfe`` 0); each (solver, NFE) row
    compares ``num`` samples with the held-out split in the feature space of ``domain.domain_metric(
    config.data.name)``: Frechet distance (Heusel et al. 2017's formula on classifier features) and the share
    of samples classified with softmax confidence > 0.9. With ``ddpm_steps``, a last row samples by ancestral
    DDPM on that many training steps (``ddpm_num`` samples, default ``num``).

    Every (solver, NFE) is validated (unknown solver, an NFE below its minimum) before anything is sampled. With
    ``out_dir``, ``quality.csv`` is (re)written from its header, and each row is appended as soon as it is
    finished; ``quality.png`` (Frechet vs NFE) is drawn at the end, or from the finished rows when a row fails
    (the error is then re-raised).

    Args:
      model_fn: ``model_fn(x, t)`` (params closed over), or ``apply_fn(params, x, t)`` when ``params`` is given.
      fid_num: > 0 adds FID and KID (FID Inception-v3, real weights) of each row's first ``fid_num`` samples
        against as many held-out real images (upsampled to 299 as pytorch-fid does; about 5-7 images/s on a
        2-core CPU, so keep it small there), with a tqdm bar when ``progress``.
      spacing: the time grid of every solver but DDPM. solver_options: {solver: {option: value}}, e.g.
        ``{"dpm_solver_v3": {"ems": ems}}``. prediction: what the model returns ("eps", "x0", "v").
      batch_size, mesh: the sampling batch and device mesh (``make_generator``).
      progress: tqdm bars for sampling and Inception features.
    Returns:
      (rows, {(solver, nfe): samples}, the floor's ``DomainMetric.evaluate`` dict).
    """
    from dpmjax.data import get_dataset
    from dpmjax.metrics.domain import all_images, domain_metric

    solvers, nfes = list(solvers), list(nfes)
    unknown = [s for s in solvers if s not in dpmjax.SOLVERS]
    if unknown:
        raise ValueError(f"unknown solvers {unknown}; choose from {sorted(dpmjax.SOLVERS)}")
    solver_options = dict(solver_options or {})
    runs = [(s, n, num) for s in solvers for n in nfes]
    if ddpm_steps:
        runs.append(("ddpm", ddpm_steps, ddpm_num or num))
    if params is None:
        apply_fn, params = (lambda _, x, t: model_fn(x, t)), ()
    else:
        apply_fn = model_fn
    shape = tuple(config.data.image_shape)
    generators = {}  # built (and so validated) before the first sample is drawn
    for solver, nfe, count in runs:
        try:
            generators[(solver, nfe)] = make_generator(
                apply_fn, schedule, shape, solver=solver, nfe=nfe, batch_size=min(batch_size, count),
                spacing=spacing, mesh=mesh, prediction=prediction, **solver_options.get(solver, {}))
        except ValueError as err:
            raise ValueError(f"solver {solver!r} at NFE {nfe}: {err}") from None

    dataset = config.data.name
    metric = domain_metric(dataset)
    real_test, _ = all_images(get_dataset(dataset, "test"))
    real_train, _ = all_images(get_dataset(dataset, "train"))
    fields = list(CSV_FIELDS) + (["fid", "kid"] if fid_num > 0 else [])
    writer = _RowWriter(out_dir, fields)
    rows, samples = [], {}
    try:
        floor_images = real_train[: max(num, len(real_test))]
        floor = metric.evaluate(floor_images, real_test)
        rows.append({"solver": "real (train vs held-out)", "nfe": 0, "num": len(floor_images),
                     "frechet": floor["frechet"], "confident_share": floor["confident_share"], "seconds": 0.0})
        inception = _InceptionScores(real_test, fid_num, progress) if fid_num > 0 else None
        if inception is not None:
            rows[0].update(inception.score(real_train))
        writer.write(rows[0])
        for solver, nfe, count in runs:
            start = time.perf_counter()
            images = generators[(solver, nfe)](params, count, seed, progress)
            seconds = time.perf_counter() - start
            result = metric.evaluate(images, real_test)
            row = {"solver": solver, "nfe": nfe, "num": count, "frechet": result["frechet"],
                   "confident_share": result["confident_share"], "seconds": seconds}
            if inception is not None:
                row.update(inception.score(images))
            rows.append(row)
            writer.write(row)
            samples[(solver, nfe)] = images
            log(f"{solver:<14} nfe={nfe:<5} frechet={result['frechet']:8.3f} "
                f"confident>0.9={result['confident_share']:.3f}  ({seconds:.1f} s, {count} samples)")
    finally:
        writer.close()
        if out_dir and rows:
            _plot(rows, os.path.join(out_dir, "quality.png"))
    return rows, samples, floor


class _InceptionScores:
    """FID / KID against a fixed real set, with the real features computed once."""

    def __init__(self, real, num: int, progress: bool = True):
        from dpmjax.metrics import inception_features, load_inception_params
        self.num, self.params = num, load_inception_params()
        self.features = lambda x: inception_features(self.params, (np.asarray(x[:num]) + 1.0) / 2.0,
                                                     progress=progress)
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
