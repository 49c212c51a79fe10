"""Learned solver schedules: DC-Solver vs UniPC, S^3 vs the best hand-made solver, TS-DDIM / TS-S-PNDM /
TS-F-PNDM vs their bases, with search cost in seconds; on the Gaussian-mixture oracle or a trained model.

    python experiments/learned_schedules.py --model oracle --held 64 --budget 30            # exact oracle
    python experiments/learned_schedules.py --model digits                                  # trained digits UNet
    python experiments/learned_schedules.py --model fashion_mnist --frechet key --num-quality 500

Oracle: the exact eps of ``GaussianMixture.random(seed=0, num_modes=6, dim=64)`` on the linear DiscreteVP
schedule, float64; reference = the exact ODE solution (``ode_solution``).
Trained models (float32): ``TRAINED`` below, trained once by dpmjax's training loop into
``dpmjax.metrics.domain.cache_dir()/trained`` (outside the repository) and reused; reference = a
``--ref-steps`` DPM-Solver++(3M) solve (logSNR grid) of the same model from the same noise over the same time
interval, its own error estimated against a solve with twice the steps.
Metrics: (a) RMS error of the final sample against the reference on ``--held`` held-out noises (seed 1) --
what DC-Solver and S^3 optimise; (b) trained models only: Frechet distance in the features of the domain
classifier (``dpmjax.metrics.domain``) between ``--num-quality`` samples from other held-out noises (seed 2),
clipped to [-1, 1], and the dataset's test split -- what Time-Shift targets (exposure bias).
Searches only see the search noises (seed 0): DC the first ``--search`` of them, S^3 ``--s3-search``.
DC search reference: ``dc.model_targets`` (DPM-Solver++(3M) with 20 substeps per interval).
Writes ``<out>/<model>.json``, ``<out>/<model>.csv`` (one row per NFE) and ``<out>/<model>.png``.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from dpmjax.config import configs_dir, load_config
from dpmjax.samplers import SOLVERS, make_sampler, plan
from dpmjax.samplers.usf import spec_arrays
from dpmjax.search import SpecEvaluator, dc, s3

# --------------------------------------------------------------------------------------------------------
# Trained models: trained once by dpmjax's own loop into the cache (outside the repository), then reused.
# --------------------------------------------------------------------------------------------------------

# name -> (config file, --config overrides, checkpoint step used). digits: the default main job (`dpmjax
# quickstart`'s model, 1500 steps). fashion_mnist: configs/fashion_mnist.py made unconditional (no labels, so
# no guidance) with a 1500-step schedule; the benchmark uses its step-500 EMA checkpoint (the run was cut at
# step 735 for time on 2 shared, ~4x oversubscribed cores; a rerun that trains on still uses step 500).
TRAINED = {
    "digits": ("configs/digits.py", (), 1500),
    "fashion_mnist": ("configs/fashion_mnist.py",
                      ("--config.model.num_classes=None", "--config.model.label_dropout=0.0",
                       "--config.train.num_steps=1500", "--config.optim.learning_rate=2e-3",
                       "--config.train.ema_decay=0.995"), 500),
}


def trained_config(name: str):
    if name not in TRAINED:
        raise ValueError(f"model must be one of {tuple(TRAINED)}, got {name!r}")
    path, overrides, _ = TRAINED[name]
    return load_config(os.path.join(configs_dir(), os.path.basename(path)), overrides)


def trained_workdir(name: str, *, train_if_missing: bool = True) -> str:
    """The cached workdir of ``TRAINED[name]`` (``cache_dir()/trained/<name>-<config hash>``), trained if it
    has no checkpoint at the step the benchmark uses.

    Equivalent command: ``dpmjax train --config <file> <overrides> --workdir <that dir>``.
    """
    from dpmjax.metrics.domain import cache_dir
    from dpmjax.train import checkpoint
    from dpmjax.train.loop import train

    config = trained_config(name)
    tag = hashlib.sha256(config.to_json(sort_keys=True).encode()).hexdigest()[:12]
    workdir = os.path.join(cache_dir(), "trained", f"{name}-{tag}")
    done = None
    if os.path.isdir(os.path.join(workdir, "checkpoints")):
        mngr = checkpoint.manager(workdir)
        done = mngr.latest_step()
        mngr.close()
    if done is None or done < TRAINED[name][2]:
        if not train_if_missing:
            raise FileNotFoundError(f"{workdir}: no finished training run of {name!r} (step {done})")
        print(f"training {name} into {workdir}: dpmjax train --config {TRAINED[name][0]} "
              f"{' '.join(TRAINED[name][1])} --workdir {workdir}", flush=True)
        train(config, workdir)
    return workdir


# --------------------------------------------------------------------------------------------------------
# Problems: a model, its noises, a reference solver and (trained models) a quality metric
# --------------------------------------------------------------------------------------------------------

def rms(a, b):
    return float(jnp.sqrt(jnp.mean((jnp.asarray(a) - jnp.asarray(b)) ** 2)))


class Samplers:
    """The library sampler, compiled once per (solver, static options, grid length): grids, DC ratios and USF specs
    are grid data passed per call, so every searched schedule of one length reuses one compiled program."""

    def __init__(self, model, schedule):
        self.model, self.schedule, self._compiled = model, schedule, {}

    def __call__(self, x_T, *, solver, timesteps=None, spec=None, **options):
        if spec is not None:  # a USF spec: its times and per-step choices are data, only AFS is static
            timesteps, options = spec.timesteps, dict(arrays=spec_arrays(spec), afs=spec.afs)
        timesteps = np.asarray(timesteps, np.float64)
        data = {k: options.pop(k) for k in SOLVERS[solver].prepared_options if k in options}
        key = (solver, len(timesteps), tuple(sorted(options.items())))
        if key not in self._compiled:
            self._compiled[key] = make_sampler(self.model, schedule=self.schedule, solver=solver,
                                               timesteps=timesteps, **options, **data)
        return self._compiled[key](jnp.asarray(x_T), timesteps=timesteps, **data)


class Problem:
    """model, schedule, noises (search x_s, held-out x_h, quality x_q), reference(x, t0, t1), frechet(samples)."""

    def __init__(self, name, model, schedule, x_s, x_h, reference, x_q=None, frechet=None, info=None):
        self.name, self.model, self.schedule = name, model, schedule
        self.x_s, self.x_h, self.x_q = x_s, x_h, x_q
        self._reference, self.frechet, self.info = reference, frechet, info or {}
        self._cache = {}

    def reference(self, which: str, t0: float, t1: float):
        key = (which, round(float(t0), 9), round(float(t1), 9))
        if key not in self._cache:
            self._cache[key] = self._reference(getattr(self, which), float(t0), float(t1))
        return self._cache[key]


def oracle_problem(args) -> Problem:
    from dpmjax.oracle import GaussianMixture, ode_solution
    from dpmjax.schedules import DiscreteVP

    schedule = DiscreteVP.from_name("linear")
    mix = GaussianMixture.random(seed=0, num_modes=6, dim=64)
    x_s = jax.random.normal(jax.random.key(0), (max(args.search, args.s3_search), 64), jnp.float64)
    x_h = jax.random.normal(jax.random.key(1), (args.held, 64), jnp.float64)
    return Problem("oracle", mix.model_fn(schedule), schedule, x_s, x_h,
                   lambda x, t0, t1: ode_solution(mix, x, t0, t1, schedule),
                   info={"reference": "exact ODE solution (ode_solution)"})


def trained_problem(args) -> Problem:
    from dpmjax.data import get_dataset
    from dpmjax.metrics.domain import domain_metric
    from dpmjax.metrics.fid import frechet_distance, statistics_from_features
    from dpmjax.workdir import load_for_sampling

    workdir = trained_workdir(args.model)
    model, schedule, config = load_for_sampling(workdir, step=TRAINED[args.model][2])
    shape = tuple(config.data.image_shape)
    x_s = jax.random.normal(jax.random.key(0), (max(args.search, args.s3_search),) + shape, jnp.float32)
    x_h = jax.random.normal(jax.random.key(1), (args.held,) + shape, jnp.float32)
    x_q = jax.random.normal(jax.random.key(2), (args.num_quality,) + shape, jnp.float32)
    from dpmjax.samplers import sample
    from dpmjax.schedules import time_grid

    # one compiled scan per (batch, steps) for every interval: the grid is an argument, not a constant
    solve = jax.jit(lambda x, ts: sample(model, x, schedule=schedule, solver="dpmpp_3m", timesteps=ts))

    def reference(x, t0, t1, steps=args.ref_steps):
        ts = np.asarray(time_grid(schedule, steps, "logSNR", t_start=t0, t_end=t1), np.float32)
        return solve(x, jnp.asarray(ts))

    start = time.perf_counter()
    ref = reference(x_h, 1.0, schedule.default_t_end)
    ref2 = reference(x_h[:args.ref_check], 1.0, schedule.default_t_end, 2 * args.ref_steps)
    ref = ref[:args.ref_check]
    info = {"workdir": workdir, "checkpoint_step": TRAINED[args.model][2],
            "reference": f"DPM-Solver++(3M), {args.ref_steps} steps, logSNR",
            "reference_rms_vs_2x_steps": rms(ref, ref2), "reference_check_noises": len(ref),
            "reference_seconds": time.perf_counter() - start}
    frechet = None
    if args.frechet != "none":
        metric = domain_metric(args.model)
        test = get_dataset(args.model, "test")
        real = np.asarray(test.get_batch(np.arange(len(test)))["image"], np.float32)
        real_stats = statistics_from_features(metric.features(real))

        def frechet(samples):
            feats = metric.features(np.clip(np.asarray(samples, np.float32), -1.0, 1.0))
            return frechet_distance(*statistics_from_features(feats), *real_stats)
        info.update(classifier_test_accuracy=metric.test_accuracy, num_real=len(real),
                    frechet_reference_solve=frechet(reference(x_q, 1.0, schedule.default_t_end, args.quality_steps)),
                    frechet_reference_solve_steps=args.quality_steps)
    print(json.dumps(info), flush=True)
    return Problem(args.model, model, schedule, x_s, x_h, reference, x_q=x_q, frechet=frechet, info=info)


# --------------------------------------------------------------------------------------------------------
# The comparisons
# --------------------------------------------------------------------------------------------------------

KEY_FRECHET = ("unipc_bh2", "dc_bh2_greedy", "s3", "best_hand", "ddim_leading", "ts_ddim_leading",
               "s_pndm_leading", "ts_s_pndm_leading", "pndm", "ts_pndm")


def run(problem: Problem, args):
    model, schedule = problem.model, problem.schedule
    x_dc = problem.x_s[:args.search]
    x_s3 = problem.x_s[:args.s3_search]
    t0, t1 = schedule.default_t_start, schedule.default_t_end
    runner = Samplers(model, schedule)

    def measure(row, label, **kw):
        """RMS vs the reference on x_h over the grid's own interval (+ Frechet on x_q where asked)."""
        grid = np.asarray(kw["timesteps"] if "timesteps" in kw else kw["spec"].timesteps, np.float64)
        quality = problem.frechet is not None and (args.frechet == "all" or label in KEY_FRECHET)
        x = jnp.concatenate([problem.x_h, problem.x_q]) if quality else problem.x_h  # one batch, one compile
        try:
            out = runner(x, **kw)
        except ValueError as err:
            row[label] = f"error: {err}"
            return
        row[label] = rms(out[:len(problem.x_h)], problem.reference("x_h", grid[0], grid[-1]))
        if quality:
            row[f"{label}_frechet"] = problem.frechet(out[len(problem.x_h):])

    results = []
    for nfe in args.nfes:
        row = {"nfe": nfe}
        # --- DC-Solver vs UniPC (order 2, logSNR grid) -----------------------------------------------------
        if "dc" not in args.skip:
            grid = plan(schedule, "dc_solver", nfe=nfe, spacing="logSNR").grid["t"]
            targets = dc.model_targets(model, x_dc, grid, schedule, substeps=20)
            for variant in args.dc_variants:
                measure(row, f"unipc_{variant}", solver="unipc", timesteps=grid, variant=variant)
                for objective in args.dc_objectives:
                    ratios, info = dc.search_dc_ratios(model, x_dc, targets, schedule=schedule, timesteps=grid,
                                                       num_iters=args.dc_iters, objective=objective,
                                                       variant=variant)
                    measure(row, f"dc_{variant}_{objective}", solver="dc_solver", timesteps=grid, ratios=ratios,
                            variant=variant)
                    row[f"dc_{variant}_{objective}_seconds"] = info["seconds"]
                    row[f"dc_{variant}_{objective}_ratios"] = [round(float(r), 3) for r in ratios]
        # --- S^3 vs the best hand-made solver --------------------------------------------------------------
        if "s3" not in args.skip:
            ref_s3 = problem.reference("x_s", t0, t1)[:args.s3_search]
            spec, info = s3.s3_search(model, schedule, nfe, x_s3, ref_s3, budget=args.budget)
            held = SpecEvaluator(model, schedule, problem.x_h, problem.reference("x_h", t0, t1), "eps")
            hand = [(held(s), s) for s in s3.seed_specs(schedule, nfe)]
            best_hand = min(hand, key=lambda e: e[0])
            measure(row, "s3", solver="usf", spec=spec)
            measure(row, "best_hand", solver="usf", spec=best_hand[1])
            row.update(s3_search_metric=info["best_metric"], s3_seed_best_search_metric=info["seed_best"],
                       s3_seconds=info["seconds"], s3_evaluated=info["evaluated"],
                       best_hand_desc=_describe(best_hand[1], schedule), s3_desc=_describe(spec, schedule),
                       best_hand_held_ranking=[round(m, 4) for m, _ in sorted(hand, key=lambda e: e[0])],
                       s3_spec=spec.to_json())
        # --- Time-Shift vs base --------------------------------------------------------------------------------
        if "ts" not in args.skip:
            for ts_name, base_name in (("ts_ddim", "ddim"), ("ts_s_pndm", "s_pndm")):
                for spacing in args.ts_spacings:
                    grid = plan(schedule, base_name, nfe=nfe, spacing=spacing).grid["t"]
                    measure(row, f"{base_name}_{spacing}", solver=base_name, timesteps=grid)
                    measure(row, f"{ts_name}_{spacing}", solver=ts_name, timesteps=grid)
        print(json.dumps({k: v for k, v in row.items() if not k.endswith(("ratios", "spec"))}), flush=True)
        results.append(row)
    if "ts" not in args.skip and "pndm" not in args.skip:  # F-PNDM needs >= 12 calls (3 pseudo-RK4 steps)
        for nfe in args.pndm_nfes:
            grid = plan(schedule, "pndm", nfe=nfe, spacing="leading").grid["t"]
            row = {"nfe": nfe}
            measure(row, "pndm", solver="pndm", timesteps=grid)
            measure(row, "ts_pndm", solver="ts_pndm", timesteps=grid)
            measure(row, "ts_pndm_w30_c300", solver="ts_pndm", timesteps=grid, window=30, cutoff=300)
            print(json.dumps(row), flush=True)
            results.append(row)
    return results


def _describe(spec, schedule) -> str:
    """A short text of a spec: grid kind guessed from the seeds, orders, relaxation, corrector, AFS."""
    from dpmjax.schedules import time_grid

    kind = "searched grid"
    for spacing in ("logSNR", "time_uniform", "time_quadratic"):
        ts = np.asarray(time_grid(schedule, spec.num_steps, spacing), np.float64)
        if np.allclose(ts, np.asarray(spec.timesteps, np.float64), rtol=1e-5, atol=1e-7):
            kind = spacing
    return (f"{kind} order={''.join(map(str, spec.order))} relax={'/'.join(sorted(set(spec.relax)))} "
            f"corr={int(all(spec.corrector[:-1]))}{' AFS' if spec.afs else ''}")


# --------------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------------

def write_outputs(results, problem, args, seconds):
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, problem.name)
    with open(base + ".json", "w") as f:
        json.dump({"model": problem.name, "info": problem.info, "args": vars(args), "seconds": seconds,
                   "results": results}, f, indent=1, default=str)
    keys = []
    for row in results:
        keys += [k for k, v in row.items() if k not in keys and not isinstance(v, (list, dict))
                 and not k.endswith("spec")]
    with open(base + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        for row in results:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items() if k in keys})
    try:
        _plot(results, problem, base + ".png")
    except Exception as err:  # noqa: BLE001 - a missing matplotlib must not lose the numbers
        print(f"plot skipped: {err}")
    print(f"wrote {base}.json, .csv, .png")


def _plot(results, problem, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results if r["nfe"] <= 10]
    panels = [("DC-Solver vs UniPC (RMS)", ["unipc_bh2", "dc_bh2_greedy", "dc_bh2_final", "unipc_bh1",
                                           "dc_bh1_greedy", "dc_bh1_final"], ""),
              ("S^3 vs best hand-made (RMS)", ["best_hand", "s3"], ""),
              ("Time-Shift (RMS)", ["ddim_leading", "ts_ddim_leading", "s_pndm_leading", "ts_s_pndm_leading",
                                    "ddim_logSNR", "ts_ddim_logSNR", "s_pndm_logSNR", "ts_s_pndm_logSNR"], "")]
    if problem.frechet is not None:
        panels += [("DC / S^3 (Frechet)", ["unipc_bh2", "dc_bh2_greedy", "best_hand", "s3"], "_frechet"),
                   ("Time-Shift (Frechet)", panels[2][1], "_frechet")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for ax, (title, labels, suffix) in zip(np.atleast_1d(axes), panels):
        for label in labels:
            pts = [(r["nfe"], r[label + suffix]) for r in rows if isinstance(r.get(label + suffix), float)]
            if pts:
                ax.plot(*zip(*pts), marker="o", ls="--" if label.startswith(("dc", "ts", "s3")) else "-",
                        label=label)
        ax.set_yscale("log")
        ax.set_xlabel("NFE")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=6)
    fig.suptitle(f"learned solver schedules: {problem.name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="oracle", choices=("oracle",) + tuple(TRAINED))
    parser.add_argument("--nfes", type=int, nargs="+", default=[4, 5, 6, 8, 10])
    parser.add_argument("--pndm-nfes", type=int, nargs="*", default=[13, 15, 20], help="F-PNDM needs >= 12")
    parser.add_argument("--search", type=int, default=10, help="DC search datapoints (seed 0)")
    parser.add_argument("--s3-search", type=int, default=None,
                        help="S^3 metric datapoints (seed 0; default: --search for the oracle, 32 trained)")
    parser.add_argument("--held", type=int, default=None, help="held-out noises for RMS (seed 1; default 128/64)")
    parser.add_argument("--num-quality", type=int, default=1000, help="trained: samples for the Frechet distance")
    parser.add_argument("--frechet", default="all", choices=("all", "key", "none"),
                        help="trained: Frechet for every sampler, for KEY_FRECHET only, or none")
    parser.add_argument("--ref-steps", type=int, default=200, help="trained: steps of the reference solve")
    parser.add_argument("--ref-check", type=int, default=None,
                        help="trained: held-out noises on which the reference is checked against 2x its steps")
    parser.add_argument("--quality-steps", type=int, default=50,
                        help="trained: DPM-Solver++(3M) steps of the converged-solve Frechet anchor")
    parser.add_argument("--budget", type=int, default=30)
    parser.add_argument("--dc-iters", type=int, default=20)
    parser.add_argument("--dc-variants", nargs="+", default=["bh2", "bh1"])
    parser.add_argument("--dc-objectives", nargs="+", default=["greedy", "final"])
    parser.add_argument("--ts-spacings", nargs="+", default=["leading", "logSNR"])
    parser.add_argument("--skip", nargs="*", default=[], help="parts to skip: dc s3 ts pndm")
    parser.add_argument("--train-only", action="store_true", help="train (or find) the model and stop")
    parser.add_argument("--out", default=os.path.join("results", "learned_schedules"))
    args = parser.parse_args(argv)
    trained = args.model != "oracle"
    if args.s3_search is None:
        args.s3_search = 32 if trained else args.search
    if args.held is None:
        args.held = 64 if trained else 128
    if args.train_only:
        print(trained_workdir(args.model))
        return
    jax.config.update("jax_enable_x64", not trained)  # the oracle in float64; networks as trained (float32)
    start = time.perf_counter()
    problem = trained_problem(args) if trained else oracle_problem(args)
    results = run(problem, args)
    seconds = time.perf_counter() - start
    write_outputs(results, problem, args, seconds)
    print(f"total {seconds:.0f} s")


if __name__ == "__main__":
    main()
