"""Learned solver schedules on the Gaussian-mixture oracle: DC-Solver vs UniPC, S^3 vs the best hand-made
solver, TS-DDIM / TS-S-PNDM / TS-F-PNDM vs their bases, with search cost in seconds.

Model: the exact eps of ``GaussianMixture.random(seed=0, num_modes=6, dim=64)`` on the linear DiscreteVP
schedule, float64. Metric: RMS error of x_{t_end} against the exact ODE solution (``ode_solution``) on
``--held`` held-out noises (seed 1); searches use ``--search`` other noises (seed 0) and never see them.
DC reference for the search: a fine DPM-Solver++(3M) solve (20 substeps per interval; its own error ~3e-3).

    python experiments/learned_schedules.py --nfes 4 5 6 8 10 --out results.json
"""
from __future__ import annotations

import argparse
import json
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dpmjax.oracle import GaussianMixture, ode_solution  # noqa: E402
from dpmjax.samplers import plan, sample  # noqa: E402
from dpmjax.schedules import DiscreteVP  # noqa: E402
from dpmjax.search import dc, s3  # noqa: E402


def rms(a, b):
    return float(jnp.sqrt(jnp.mean((jnp.asarray(a) - jnp.asarray(b)) ** 2)))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--nfes", type=int, nargs="+", default=[4, 5, 6, 8, 10])
    parser.add_argument("--search", type=int, default=10)
    parser.add_argument("--held", type=int, default=128)
    parser.add_argument("--budget", type=int, default=40)
    parser.add_argument("--dc-iters", type=int, default=20)
    parser.add_argument("--skip", nargs="*", default=[], help="parts to skip: dc s3 ts")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    schedule = DiscreteVP.from_name("linear")
    mix = GaussianMixture.random(seed=0, num_modes=6, dim=64)
    model = mix.model_fn(schedule)
    x_s = jax.random.normal(jax.random.key(0), (args.search, 64), jnp.float64)
    x_h = jax.random.normal(jax.random.key(1), (args.held, 64), jnp.float64)
    t0, t1 = schedule.default_t_start, schedule.default_t_end
    exact_h = ode_solution(mix, x_h, t0, t1, schedule)
    exact_s = ode_solution(mix, x_s, t0, t1, schedule)
    results = []
    cache = {}

    def exact_for(grid):
        key = (float(grid[0]), float(grid[-1]))
        if key not in cache:
            cache[key] = ode_solution(mix, x_h, key[0], key[1], schedule)
        return cache[key]

    for nfe in args.nfes:
        row = {"nfe": nfe}
        # --- DC-Solver vs UniPC (order 2, bh2, logSNR grid) ----------------------------------------------
        if "dc" not in args.skip:
            _, grid, _ = plan(schedule, "dc_solver", nfe=nfe, spacing="logSNR")
            targets = dc.model_targets(model, x_s, grid, schedule, substeps=20)
            for variant in ("bh2", "bh1"):
                base = rms(sample(model, x_h, schedule=schedule, solver="unipc", timesteps=grid, variant=variant),
                           exact_h)
                row[f"unipc_{variant}"] = base
                for objective in ("greedy", "final"):
                    ratios, info = dc.search_dc_ratios(model, x_s, targets, schedule=schedule, timesteps=grid,
                                                       num_iters=args.dc_iters, objective=objective,
                                                       variant=variant)
                    y = sample(model, x_h, schedule=schedule, solver="dc_solver", timesteps=grid, ratios=ratios,
                               variant=variant)
                    row[f"dc_{variant}_{objective}"] = rms(y, exact_h)
                    row[f"dc_{variant}_{objective}_seconds"] = info["seconds"]
                    row[f"dc_{variant}_{objective}_ratios"] = [round(float(r), 3) for r in ratios]
        # --- S^3 vs the best hand-made solver ------------------------------------------------------------
        if "s3" not in args.skip:
            spec, info = s3.s3_search(model, schedule, nfe, x_s, exact_s, budget=args.budget)
            held = s3._Evaluator(model, schedule, x_h, exact_h, "eps")
            hand = [(held(s), s) for s in s3.seed_specs(schedule, nfe)]
            best_hand = min(hand, key=lambda e: e[0])
            row.update(s3_held=held(spec), s3_search_metric=info["best_metric"], s3_seconds=info["seconds"],
                       s3_evaluated=info["evaluated"], best_hand_held=best_hand[0],
                       best_hand=f"order={best_hand[1].order} relax={best_hand[1].relax[-1]} "
                                 f"corr={best_hand[1].corrector[0]}",
                       s3_spec=spec.to_json())
        # --- Time-Shift vs base ----------------------------------------------------------------------------
        if "ts" not in args.skip:
            for ts_name, base_name in (("ts_ddim", "ddim"), ("ts_s_pndm", "s_pndm")):
                for spacing in ("leading", "logSNR"):
                    _, grid, _ = plan(schedule, base_name, nfe=nfe, spacing=spacing)
                    exact = exact_for(grid)  # a "leading" grid starts below t = 1: compare on its own interval
                    kw = dict(schedule=schedule, timesteps=grid)
                    row[f"{base_name}_{spacing}"] = rms(sample(model, x_h, solver=base_name, **kw), exact)
                    try:
                        row[f"{ts_name}_{spacing}"] = rms(sample(model, x_h, solver=ts_name, **kw), exact)
                    except ValueError as err:
                        row[f"{ts_name}_{spacing}"] = f"error: {err}"
        print(json.dumps({k: v for k, v in row.items() if not k.endswith(("ratios", "spec"))}), flush=True)
        results.append(row)
    if "ts" not in args.skip:  # F-PNDM needs >= 12 calls (3 pseudo-RK4 steps)
        for nfe in (13, 15, 20):
            _, grid, _ = plan(schedule, "pndm", nfe=nfe, spacing="leading")
            exact, kw = exact_for(grid), dict(schedule=schedule, timesteps=grid)
            row = {"nfe": nfe, "pndm": rms(sample(model, x_h, solver="pndm", **kw), exact),
                   "ts_pndm": rms(sample(model, x_h, solver="ts_pndm", **kw), exact),
                   "ts_pndm_w30_c300": rms(sample(model, x_h, solver="ts_pndm", window=30, cutoff=300, **kw),
                                           exact)}
            print(json.dumps(row), flush=True)
            results.append(row)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - start:.0f} s")
