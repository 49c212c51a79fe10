"""The ``dpmjax`` command line: the only module that parses flags.

    dpmjax quickstart [--workdir runs/digits]
        The main job (also what plain ``dpmjax`` runs): train configs/digits.py, sample it with dpmpp_2m at
        10 NFE, write a sample grid and a quality table (classifier Frechet distance at NFE 5/10/20 and for
        1000-step DDPM, beside the real-data floor).
    dpmjax train --config configs/NAME.py[:ARG] --workdir DIR [--config.train.num_steps=N ...]
    dpmjax sample --workdir DIR --solver S --nfe N --num M --out FILE.npz     (npz + PNG grid)
    dpmjax sample [--oracle ring|mix64] [--solvers a,b] [--nfe 5,10,20]       (no --workdir: the oracle)
        Sample the Gaussian-mixture oracle (exact score) with each solver and NFE; print the error against
        the exact probability-flow ODE solution.
    dpmjax eval --workdir DIR --solvers a,b --nfe 5,10,20 [--num M]           (CSV + plot)
    dpmjax solvers
        List the registered solvers and their options.
    dpmjax convert --from-diffusers DIR --out DIR [--scheduler-config FILE] [--overwrite]
        Convert a diffusers UNet2DModel folder (e.g. google/ddpm-cifar10-32) into a dpmjax checkpoint folder
        that ``sample`` / ``eval --workdir`` and ``load_for_sampling`` read.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time

DEFAULT_SOLVERS = "ddim,dpm_solver_2m,dpm_solver_3m,dpmpp_2m,dpmpp_3m"


def _parse_list(text: str, cast=str):
    return [cast(v) for v in text.split(",") if v.strip()]


def _oracle(name: str):
    from dpmjax.oracle import GaussianMixture
    if name == "ring":
        return GaussianMixture.ring()
    if name == "mix64":
        return GaussianMixture.random(seed=0, num_modes=6, dim=64)
    raise ValueError(f"--oracle must be one of ('ring', 'mix64'), got {name!r}")


def _schedule(name: str):
    from dpmjax.schedules import schedule_from_name
    return schedule_from_name(name)


def cmd_sample(args) -> int:
    if args.workdir:
        return cmd_sample_workdir(args)
    import jax
    import jax.numpy as jnp
    import numpy as np

    import dpmjax
    from dpmjax.oracle import ode_solution

    solvers = _parse_list(args.solvers)
    nfes = _parse_list(args.nfe, int)
    for name in solvers:
        if name not in dpmjax.SOLVERS:
            raise SystemExit(f"unknown solver {name!r}; choose from {sorted(dpmjax.SOLVERS)}")
    mixture, schedule = _oracle(args.oracle), _schedule(args.schedule)
    x_T = jax.random.normal(jax.random.key(args.seed), (args.num, mixture.dim), jnp.float32)
    t_start, t_end = schedule.default_t_start, schedule.default_t_end
    reference = ode_solution(mixture, np.asarray(x_T, np.float64), t_start, t_end, schedule)
    scale = float(np.sqrt(np.mean(reference ** 2)))
    model = mixture.model_fn(schedule)
    rows = []
    print(f"oracle={args.oracle} (dim {mixture.dim}) schedule={args.schedule} spacing={args.spacing} "
          f"samples={args.num}; error = RMS(x - exact ODE solution) / RMS(exact)")
    print(f"{'solver':<22}" + "".join(f"{'nfe=' + str(n):>12}" for n in nfes))
    outputs = {}
    for name in solvers:
        errors = []
        for nfe in nfes:
            entry = dpmjax.SOLVERS[name]
            if nfe < entry.min_nfe():
                errors.append(float("nan"))
                continue
            key = jax.random.key(args.seed + 1)
            start = time.perf_counter()
            fn = dpmjax.make_sampler(model, schedule=schedule, solver=name, nfe=nfe, spacing=args.spacing)
            x0 = np.asarray(fn(x_T, key))
            seconds = time.perf_counter() - start
            err = float(np.sqrt(np.mean((x0 - reference) ** 2)) / scale)
            errors.append(err)
            outputs[f"{name}_nfe{nfe}"] = x0
            rows.append({"solver": name, "nfe": nfe, "relative_rmse": err, "seconds_incl_compile": seconds})
        print(f"{name:<22}" + "".join(f"{e:>12.2e}" for e in errors))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        np.savez(args.out, x_T=np.asarray(x_T), reference=reference, **outputs)
        with open(os.path.splitext(args.out)[0] + ".csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {args.out} and {os.path.splitext(args.out)[0]}.csv")
    return 0


def cmd_train(args, extra) -> int:
    from dpmjax.config import load_config
    from dpmjax.train.loop import train
    config = load_config(args.config, extra)
    if args.multihost:
        import jax
        jax.distributed.initialize()
    train(config, args.workdir, num_devices=args.num_devices)
    print(f"trained {config.train.num_steps} steps; checkpoints in {os.path.abspath(args.workdir)}/checkpoints")
    return 0


def cmd_sample_workdir(args) -> int:
    import numpy as np

    from dpmjax.metrics.report import generate, image_grid
    from dpmjax.workdir import load_for_sampling

    model_fn, schedule, config = load_for_sampling(args.workdir)
    solver, nfe = args.solvers.split(",")[0], int(args.nfe.split(",")[0])
    images = generate(model_fn, schedule, tuple(config.data.image_shape), solver=solver, nfe=nfe, num=args.num,
                      seed=args.seed, spacing=args.spacing, prediction=str(config.train.get("target", "eps")))
    out = args.out or os.path.join(args.workdir, f"samples_{solver}_nfe{nfe}.npz")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    np.savez(out, images=images, solver=solver, nfe=nfe)
    image_grid(images, os.path.splitext(out)[0] + ".png")
    print(f"wrote {out} and {os.path.splitext(out)[0]}.png ({len(images)} samples, {solver}, nfe={nfe})")
    return 0


def cmd_eval(args) -> int:
    from dpmjax.metrics.report import quality_table
    from dpmjax.workdir import load_for_sampling

    model_fn, schedule, config = load_for_sampling(args.workdir)
    out_dir = args.out_dir or os.path.join(args.workdir, "eval")
    rows, _, _ = quality_table(model_fn, schedule, config, solvers=_parse_list(args.solvers),
                               nfes=_parse_list(args.nfe, int), num=args.num,
                               ddpm_steps=args.ddpm_steps or None, out_dir=out_dir, fid_num=args.fid_num)
    _print_table(rows)
    print(f"wrote {out_dir}/quality.csv and quality.png")
    return 0


def _print_table(rows):
    fid = "fid" in rows[0]
    print(f"{'sampler':<26}{'NFE':>6}{'Frechet (classifier)':>22}{'confident > 0.9':>18}{'seconds':>10}"
          + (f"{'FID':>10}{'KID':>10}" if fid else ""))
    for r in rows:
        print(f"{r['solver']:<26}{r['nfe']:>6}{r['frechet']:>22.3f}{r['confident_share']:>18.3f}"
              f"{r['seconds']:>10.1f}" + (f"{r['fid']:>10.2f}{r['kid']:>10.4f}" if fid else ""))


def cmd_quickstart(args) -> int:
    from dpmjax.config import configs_dir, load_config
    from dpmjax.metrics.report import image_grid, quality_table
    from dpmjax.train.loop import train
    from dpmjax.workdir import load_for_sampling

    start = time.perf_counter()
    config = load_config(os.path.join(configs_dir(), "digits.py"))
    print(f"[1/3] training configs/digits.py for {config.train.num_steps} steps in {args.workdir}")
    train(config, args.workdir)
    model_fn, schedule, config = load_for_sampling(args.workdir)
    print("[2/3] sampling: dpmpp_2m, 5/10/20 NFE, and 1000-step DDPM (the reference sampler)")
    rows, samples, _ = quality_table(model_fn, schedule, config, solvers=["dpmpp_2m"], nfes=[5, 10, 20],
                                     num=args.num, ddpm_steps=1000, ddpm_num=args.ddpm_num,
                                     out_dir=os.path.join(args.workdir, "eval"))
    grid = os.path.join(args.workdir, "samples_dpmpp_2m_nfe10.png")
    image_grid(samples[("dpmpp_2m", 10)], grid)
    print("[3/3] quality (Frechet distance in a digits classifier's feature space; lower is better):")
    _print_table(rows)
    print(f"sample grid: {grid}; table: {args.workdir}/eval/quality.csv; total {time.perf_counter() - start:.0f} s")
    return 0


def cmd_ems(args) -> int:
    from dpmjax.ems import compute_ems_for_workdir
    _, path = compute_ems_for_workdir(args.workdir, num_grid=args.num_grid, num_samples=args.num_samples)
    print(f"wrote DPM-Solver-v3 statistics to {path}")
    return 0


def cmd_convert(args) -> int:
    from dpmjax.metrics.weights import UnsafeCheckpointError
    from dpmjax.train.convert import convert_diffusers

    try:
        out = convert_diffusers(args.from_diffusers, args.out, scheduler_config=args.scheduler_config,
                                image_size=args.image_size, overwrite=args.overwrite)
    except UnsafeCheckpointError as err:
        print(f"dpmjax: error: refusing to load {args.from_diffusers}: {err}", file=sys.stderr)
        return 2
    print(f"sample it with: dpmjax sample --workdir {out} --solver dpmpp_2m --nfe 10 --num 64")
    return 0


def cmd_solvers(args) -> int:
    import dpmjax
    for name, entry in sorted(dpmjax.SOLVERS.items()):
        options = ", ".join(o for o in entry.options if not o.startswith("_"))
        print(f"{name:<22} options: {options or '-'}{'  (stochastic: needs key)' if entry.stochastic else ''}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpmjax", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("sample", help="sample the oracle (or, later, a trained checkpoint)")
    p.add_argument("--workdir", default=None)
    p.add_argument("--oracle", default="ring", help="ring (2-d, 8 modes) or mix64 (64-d, 6 modes)")
    p.add_argument("--schedule", default="linear")
    p.add_argument("--solvers", "--solver", default=DEFAULT_SOLVERS)
    p.add_argument("--nfe", default="5,10,20")
    p.add_argument("--spacing", default="logSNR")
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="npz file for the samples (a CSV of errors beside it)")
    p.set_defaults(func=cmd_sample)
    s = sub.add_parser("solvers", help="list the registered solvers")
    s.set_defaults(func=cmd_solvers)
    t = sub.add_parser("train", help="train a config (extra --config.a.b=v override config fields)")
    t.add_argument("--config", required=True)
    t.add_argument("--workdir", required=True)
    t.add_argument("--num-devices", type=int, default=None)
    t.add_argument("--multihost", action="store_true", help="call jax.distributed.initialize() first")
    t.set_defaults(func=cmd_train, takes_extra=True)
    e = sub.add_parser("eval", help="quality table of a trained workdir per solver and NFE")
    e.add_argument("--workdir", required=True)
    e.add_argument("--solvers", default="dpmpp_2m,unipc,ddim")
    e.add_argument("--nfe", default="5,10,20")
    e.add_argument("--num", type=int, default=1000)
    e.add_argument("--ddpm-steps", type=int, default=0, help="also 1000-step DDPM etc. (0: skip)")
    e.add_argument("--out-dir", default=None)
    e.add_argument("--fid-num", type=int, default=0,
                   help="also FID/KID (Inception, real weights) on this many samples per row (0: skip)")
    e.set_defaults(func=cmd_eval)
    m = sub.add_parser("ems", help="DPM-Solver-v3 empirical model statistics of a trained workdir")
    m.add_argument("--workdir", required=True)
    m.add_argument("--num-grid", type=int, default=120)
    m.add_argument("--num-samples", type=int, default=1024)
    m.set_defaults(func=cmd_ems)
    c = sub.add_parser("convert", help="convert a diffusers UNet2DModel folder into a dpmjax checkpoint folder")
    c.add_argument("--from-diffusers", required=True, metavar="DIR",
                   help="pipeline folder (unet/, scheduler/) or model folder (config.json + weights)")
    c.add_argument("--out", required=True, metavar="DIR", help="folder to create (written atomically)")
    c.add_argument("--scheduler-config", default=None, metavar="FILE",
                   help="scheduler_config.json (default: found beside the UNet, else DDPMScheduler's defaults)")
    c.add_argument("--image-size", type=int, default=None, help="sample size when config.json has none")
    c.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    c.set_defaults(func=cmd_convert)
    q = sub.add_parser("quickstart", help="the main job: train digits, sample, report quality")
    q.add_argument("--workdir", default="runs/digits")
    q.add_argument("--num", type=int, default=1000)
    q.add_argument("--ddpm-num", type=int, default=250)
    q.set_defaults(func=cmd_quickstart)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        args, extra = parser.parse_known_args(["quickstart"] + argv)
    try:
        if getattr(args, "takes_extra", False):
            return args.func(args, extra)
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return args.func(args)
    except ValueError as err:
        print(f"dpmjax: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
