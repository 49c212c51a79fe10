"""The ``dpmjax`` command line: the only module that parses flags.

    dpmjax sample [--oracle ring|mix64] [--solvers a,b] [--nfe 5,10,20] [--num M] [--out FILE]
        Sample the Gaussian-mixture oracle (exact score) with each solver and NFE; print the error against
        the exact probability-flow ODE solution (the default job: runs offline in about a minute).
    dpmjax solvers
        List the registered solvers and their options.
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
    from dpmjax import schedules
    if name in ("linear", "scaled_linear", "cosine"):
        return schedules.DiscreteVP.from_name(name)
    if name == "linear_vp":
        return schedules.LinearVP()
    if name == "cosine_vp":
        return schedules.CosineVP()
    if name == "flow":
        return schedules.FlowMatching()
    raise ValueError("--schedule must be one of ('linear', 'scaled_linear', 'cosine', 'linear_vp', "
                     f"'cosine_vp', 'flow'), got {name!r}")


def cmd_sample(args) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import dpmjax
    from dpmjax.oracle import ode_solution

    if args.workdir:
        raise SystemExit("dpmjax sample --workdir needs the training issue's checkpoints; "
                         "without --workdir it samples the Gaussian-mixture oracle")
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
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command is None:
        args = parser.parse_args(["sample"])
    try:
        return args.func(args)
    except ValueError as err:
        print(f"dpmjax: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
