"""DPM-Solver-v3 benchmark: the cost of the EMS and error vs NFE against DPM-Solver++(3M) and UniPC-3.

    python experiments/dpm_solver_v3_bench.py --oracle                      # Gaussian-mixture oracles
    python experiments/dpm_solver_v3_bench.py --digits runs/digits          # a trained digits workdir
    python experiments/dpm_solver_v3_bench.py --oracle --quick              # smoke run

Oracle: the 2-d 8-mode ring and an 8-d 6-mode random mixture (``GaussianMixture.random(0, 6, 8)``) on
``DiscreteVP.from_name("linear")``, t from 1 to 1e-3, x_T ~ N(0, I) (512 samples); error = RMS(x - x_exact) with
x_exact = ``ode_solution``. EMS from K = 4096 exact samples on N = 400 lambda points (``compute_ems``), estimated
in float64 and in float32. Samplers run in float64 (discretization error) and in float32 (what a user runs).
Trained model: EMS from K training images on N lambda points; per (solver, NFE): RMS distance to a 200-NFE
DPM-Solver++(3M) solution from the same noise (convergence, as the paper's Stable-Diffusion MSE) and the
domain metric (classifier-feature Frechet distance to held-out digits, ``dpmjax.metrics.domain``).
Results: markdown tables on stdout and JSON in ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")  # faster compiles, same numerics

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import dpmjax  # noqa: E402
from dpmjax.ems import compute_ems  # noqa: E402
from dpmjax.oracle import GaussianMixture, ode_solution  # noqa: E402

NFES = (5, 6, 8, 10, 15, 20)
BASELINES = [("dpmpp_3m", "dpmpp_3m", {}), ("unipc3", "unipc", dict(order=3)),
             ("unipc3_bh1", "unipc", dict(order=3, variant="bh1"))]


def v3_configs(ems):
    return [("v3", "dpm_solver_v3", dict(ems=ems)),
            ("v3_c_exact", "dpm_solver_v3", dict(ems=ems, c_pseudo=False)),
            ("v3_p_pseudo", "dpm_solver_v3", dict(ems=ems, p_pseudo=True)),
            ("v3_no_corr", "dpm_solver_v3", dict(ems=ems, use_corrector=False)),
            ("v3_degenerate", "dpm_solver_v3", {})]


def table(title, rows, columns):
    lines = [f"\n{title}\n", "| NFE | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for nfe, values in rows.items():
        best = min(values)
        cells = [(f"**{v:.4f}**" if v == best else f"{v:.4f}") for v in values]
        lines.append(f"| {nfe} | " + " | ".join(cells) + " |")
    print("\n".join(lines), flush=True)


def rms(a, b):
    return float(np.sqrt(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)))


def run_oracle(args):
    schedule = dpmjax.DiscreteVP.from_name("linear")
    mixtures = {"ring2d": GaussianMixture.ring(), "mix8d": GaussianMixture.random(0, 6, 8)}
    nfes = (5, 10) if args.quick else NFES
    num_grid, num_data = (100, 1024) if args.quick else (400, 4096)
    results = {}
    for name, mixture in mixtures.items():
        model = mixture.model_fn(schedule)
        ems, cost = {}, {}
        for precision in ("float64", "float32"):
            with jax.enable_x64(precision == "float64"):
                dtype = jnp.float64 if precision == "float64" else jnp.float32
                data = np.asarray(mixture.sample(jax.random.key(1), num_data, dtype))
                start = time.perf_counter()
                ems[precision] = compute_ems(model, schedule, data, num_grid=num_grid, batch_size=num_data,
                                             progress=False, model_id=f"oracle:{name}")
                cost[precision] = time.perf_counter() - start
        print(f"\n{name}: EMS N={num_grid}, K={num_data}: {cost['float64']:.1f} s (float64), "
              f"{cost['float32']:.1f} s (float32) on {len(jax.devices())} CPU device(s)", flush=True)
        results[name] = {"ems_seconds": cost, "errors": {}}
        with jax.enable_x64(True):
            x64 = jax.random.normal(jax.random.key(0), (512, mixture.dim), jnp.float64)
            ref = ode_solution(mixture, x64, 1.0, 1e-3, schedule)
            runs = {"float64": (x64, v3_configs(ems["float64"]) + BASELINES),
                    "float32": (x64.astype(jnp.float32),
                                [("v3", "dpm_solver_v3", dict(ems=ems["float64"])),
                                 ("v3_ems32", "dpm_solver_v3", dict(ems=ems["float32"])),
                                 ("v3_c_exact", "dpm_solver_v3", dict(ems=ems["float64"], c_pseudo=False))]
                                + BASELINES)}
            for precision, (x, configs) in runs.items():
                for spacing in ("logSNR", "time_uniform"):
                    rows = {}
                    for nfe in nfes:
                        rows[nfe] = [rms(dpmjax.sample(model, x, schedule=schedule, solver=solver, nfe=nfe,
                                                       spacing=spacing, **opts), ref)
                                     for _, solver, opts in configs]
                    columns = [label for label, _, _ in configs]
                    table(f"{name}, sampler {precision}, {spacing}: RMS error vs the exact ODE solution", rows,
                          columns)
                    results[name]["errors"][f"{precision}/{spacing}"] = {"columns": columns, "rows": rows}
    return results


def run_digits(args):
    from dpmjax.data import get_dataset
    from dpmjax.metrics.domain import domain_metric
    from dpmjax.metrics.report import generate
    from dpmjax.workdir import load_for_sampling

    model_fn, schedule, config = load_for_sampling(args.digits)
    shape = tuple(config.data.image_shape)
    source = get_dataset(config.data.name, "train")
    images = np.asarray(source.get_batch(np.arange(len(source)))["image"], np.float32)
    rng = np.random.default_rng(0)
    data = images[rng.permutation(len(images))[:args.ems_k]]
    t_start = args.t_start
    start = time.perf_counter()
    ems = compute_ems(model_fn, schedule, data, num_grid=args.ems_n, batch_size=min(256, len(data)),
                      t_start=t_start, model_id=f"{os.path.abspath(args.digits)}", progress=True)
    ems_seconds = time.perf_counter() - start
    ems.save(os.path.join(args.out, f"digits_ems_t{t_start:g}.npz"))
    print(f"\ndigits: EMS N={args.ems_n}, K={len(data)}: {ems_seconds:.1f} s on {len(jax.devices())} device(s)")
    print("EMS means over pixels at 9 grid points (lambda, l, s, b):")
    for j in np.linspace(0, ems.num_grid, 9).round().astype(int):
        print(f"  {ems.lambda_grid[j]:7.2f} {ems.l[j].mean():7.3f} {ems.s[j].mean():7.3f} {ems.b[j].mean():7.4f}")
    metric = domain_metric(config.data.name)
    test = get_dataset(config.data.name, "test")
    reference_images = np.asarray(test.get_batch(np.arange(len(test)))["image"], np.float32)
    num = args.num
    if t_start >= 1.0:
        gen = lambda solver, nfe, **o: generate(model_fn, schedule, shape, solver=solver, nfe=nfe, num=num,
                                                spacing="logSNR", **o)
    else:
        # Start at t_start from the 200-NFE DPM-Solver++(3M) solution of the same noise: this leaves out the
        # high-noise end, where the EMS of a network are hardest to estimate (see BENCHMARKS.md).
        noise = jax.random.normal(jax.random.key(0), (num,) + shape, jnp.float32)
        x_start = dpmjax.make_sampler(model_fn, schedule=schedule, solver="dpmpp_3m", nfe=200, spacing="logSNR",
                                      t_start=1.0, t_end=t_start)(noise)

        def gen(solver, nfe, **o):
            fn = dpmjax.make_sampler(model_fn, schedule=schedule, solver=solver, nfe=nfe, spacing="logSNR",
                                     t_start=t_start, **o)
            return np.clip(np.asarray(fn(x_start)), -1.0, 1.0)
    converged = gen("dpmpp_3m", 200)
    configs = [("v3", "dpm_solver_v3", dict(ems=ems)), ("v3_c_exact", "dpm_solver_v3", dict(ems=ems, c_pseudo=False)),
               ("v3_degenerate", "dpm_solver_v3", {})] + BASELINES[:2]
    nfes = (5, 10) if args.quick else NFES
    dist, frechet = {}, {}
    for nfe in nfes:
        dist[nfe], frechet[nfe] = [], []
        for _, solver, opts in configs:
            samples = gen(solver, nfe, **opts)
            dist[nfe].append(rms(samples, converged))
            frechet[nfe].append(metric.frechet(samples, reference_images))
    columns = [label for label, _, _ in configs]
    where = f"digits (logSNR, t from {t_start:g})"
    table(f"{where}: RMS distance to the 200-NFE DPM-Solver++(3M) solution from the same start", dist, columns)
    table(f"{where}: classifier-feature Frechet distance to held-out digits", frechet, columns)
    print(f"(200-NFE DPM-Solver++(3M) itself: Frechet {metric.frechet(converged, reference_images):.4f})")
    return {"t_start": t_start, "ems_seconds": ems_seconds, "ems_n": args.ems_n, "ems_k": len(data), "columns": columns,
            "rms_to_converged": dist, "frechet": frechet}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--oracle", action="store_true")
    parser.add_argument("--digits", metavar="WORKDIR", help="a workdir of `dpmjax train --config configs/digits.py`")
    parser.add_argument("--ems-n", type=int, default=120, help="EMS grid intervals for the trained model")
    parser.add_argument("--ems-k", type=int, default=512, help="EMS data points for the trained model")
    parser.add_argument("--num", type=int, default=1000, help="samples per (solver, NFE) for the trained model")
    parser.add_argument("--t-start", type=float, default=1.0,
                        help="trained model: start sampling (and the EMS range) here; below 1 the start is the "
                             "200-NFE DPM-Solver++(3M) solution at t_start from N(0, I) noise at t = 1")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="results/dpm_solver_v3")
    args = parser.parse_args(argv)
    if not (args.oracle or args.digits):
        parser.error("give --oracle and/or --digits WORKDIR")
    os.makedirs(args.out, exist_ok=True)
    results = {}
    if args.oracle:
        results["oracle"] = run_oracle(args)
    if args.digits:
        results["digits"] = run_digits(args)
    with open(os.path.join(args.out, "results.json" if not args.quick else "results_quick.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
