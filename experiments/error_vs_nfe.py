"""Error vs NFE of every registered deterministic solver on exact Gaussian-mixture oracles, beside diffusers.

    python experiments/error_vs_nfe.py             # full run: CSV, PNGs and markdown tables in results/
    python experiments/error_vs_nfe.py --quick     # smoke run (few samples, NFE 5 and 10)

Setting: float64; oracles: the 2-d 8-mode ring (1000 samples) and a 64-d 6-mode mixture (512 samples);
``DiscreteVP.from_name("linear" | "cosine")``; x_T ~ N(0, I). Error of a run = RMS(x - x_exact) /
RMS(x_exact), x_exact = ``ode_solution`` from the same x_T between the run's own start and end
(``t_to="zero"`` for runs that end at sigma = 0). dpmjax configurations:
  * linspace+zero: spacing="linspace", final_sigma="zero" -- diffusers' defaults, the very grid of
    DPMSolverMultistepScheduler / UniPC at each NFE;
  * logSNR+t_end:  spacing="logSNR", final_sigma="t_end" (t_end = 1/N = 1e-3) -- the official DPM-Solver
    recommendation for low-resolution data.
diffusers (torch, float64 samples, float32 schedule; ``_diffusers_reference.CONFIGS``) runs on the same
oracle, and dpmjax's matching solver is also run on exactly that scheduler's grid ("same grid").
Stochastic solvers get a sliced Wasserstein-2 distance to exact p_0 samples instead (separate table).

Compile cost dominates on a small CPU, so the schedule, the mixture and the grid are traced arguments of
one jitted function: a program is compiled once per (solver, options, NFE, end type). Both oracles share
it: dpmjax runs the ring embedded in 64 dims (62 extra dims N(0, 1) in every mode, which cancel in the
responsibilities, so dims 0-1 follow the 2-d ring ODE exactly -- checked to 1e-11) and the 64-d mixture
padded to 8 modes with weight 0; errors are taken on the oracle's own dims. References, diffusers runs and
the adaptive solver use the oracles as they are.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import resource
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")  # faster compiles, same numerics

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import dpmjax  # noqa: E402
from dpmjax.oracle import GaussianMixture, ode_solution  # noqa: E402
from dpmjax.samplers import SOLVERS, plan  # noqa: E402
from dpmjax.schedules import DiscreteVP  # noqa: E402

import _diffusers_reference as dref  # noqa: E402

NFES = (5, 6, 8, 10, 12, 15, 20, 50)
HEADLINE_NFES = (5, 10, 20)
STOCHASTIC_NFES = (10, 20, 50)
OURS_CONFIGS = {
    "linspace+zero": dict(spacing="linspace", final_sigma="zero"),
    "logSNR+t_end": dict(spacing="logSNR", final_sigma="t_end"),
}
# Not in the fixed-NFE sweep: the adaptive solver picks its own NFE.
ADAPTIVE = ("dpm_solver_adaptive",)
# Option sets run as separate rows (only if the solver accepts the option): name -> [(label suffix, opts)].
VARIANTS = {"unipc": [("bh1", (("variant", "bh1"),)), ("bh2", (("variant", "bh2"),))]}


def rel_rms(x, ref):
    return float(np.sqrt(np.mean((np.asarray(x) - ref) ** 2)) / np.sqrt(np.mean(ref ** 2)))


# ------------------------------------------------------------------------------------------------
# dpmjax runs on explicit (traced) grids.
# ------------------------------------------------------------------------------------------------

_SAMPLERS: dict = {}
_SAMPLERS_LOCK = threading.Lock()


def _sampler(solver, options, schedule, sched_name, ts, final_sigma):
    """The library's params-as-arguments sampler with the mixture as params: one compiled program per (schedule,
    solver, options, grid length); every grid of that length and every oracle of the same shapes reuse it."""
    cache_key = (sched_name, solver, final_sigma, options, len(ts))
    with _SAMPLERS_LOCK:
        if cache_key not in _SAMPLERS:
            _SAMPLERS[cache_key] = dpmjax.make_param_sampler(
                lambda mix, x, t: mix.eps(x, t, schedule), schedule=schedule, solver=solver, timesteps=ts,
                final_sigma=final_sigma, **dict(options))
        return _SAMPLERS[cache_key]


def run_ours(solver, options, x_T, mixture, schedule, sched_name, grid, final_sigma, key=None):
    """Run a dpmjax solver on an explicit solver grid (the sigma = 0 end not included).

    Returns the output, or the exception text if the run failed (a result to report, not a crash)."""
    try:
        return _run_ours(solver, options, x_T, mixture, schedule, sched_name, grid, final_sigma, key)
    except Exception as err:  # noqa: BLE001
        return f"error: {type(err).__name__}: {err}"[:300]


def _run_ours(solver, options, x_T, mixture, schedule, sched_name, grid, final_sigma, key):
    ts = np.asarray(grid, np.float64)
    if final_sigma == "zero":  # the driver reads the last point as sigma = 0; its value is never used
        ts = np.concatenate([ts, [0.5 * ts[-1]]])
    key = jax.random.key(0) if key is None else key
    sampler = _sampler(solver, options, schedule, sched_name, ts, final_sigma)
    return np.asarray(sampler(mixture, jnp.asarray(x_T), key, timesteps=ts))


def own_grid(solver, options, schedule, nfe, spacing, final_sigma):
    """dpmjax's own solver grid for ``nfe`` (without the sigma = 0 end) and its exact NFE."""
    p = plan(schedule, solver, nfe=nfe, spacing=spacing, final_sigma=final_sigma, **dict(options))
    return np.asarray(p.grid["t"]), p.solver.num_model_calls + int(p.final_denoise)


def nfe_on_grid(solver, options, schedule, grid, final_sigma):
    """Exact NFE of a solver on an explicit solver grid, counted as the driver does."""
    ts = np.asarray(grid, np.float64)
    if final_sigma == "zero":
        ts = np.concatenate([ts, [0.5 * ts[-1]]])
    p = plan(schedule, solver, timesteps=ts, final_sigma=final_sigma, **dict(options))
    return p.solver.num_model_calls + int(p.final_denoise)


# ------------------------------------------------------------------------------------------------
# The sweep.
# ------------------------------------------------------------------------------------------------

def solver_rows(names):
    """(label, solver, options) for every deterministic registered solver (and listed variants)."""
    rows = []
    for name in names:
        entry = SOLVERS[name]
        if name in ADAPTIVE or (entry.stochastic and name != "ddim"):
            continue
        variants = [(f"{name} {suffix}", opts) for suffix, opts in VARIANTS.get(name, ())
                    if all(k in entry.options for k, _ in opts)]
        rows += [(label, name, opts) for label, opts in variants] or [(name, name, ())]
    return rows


def stochastic_names(names):
    return [n for n in names if SOLVERS[n].stochastic and n != "ddim" and n not in ADAPTIVE]


class Oracle:
    """An oracle as given (references, diffusers) and as dpmjax runs it (64 dims, 8 modes: shared compiles)."""

    def __init__(self, name, mixture, num_samples, seed, run_dim=64, run_modes=8):
        self.name, self.mixture, self.dim = name, mixture, mixture.dim
        means, stds, weights = (np.asarray(a) for a in (mixture.means, mixture.stds, mixture.weights))
        k, d = means.shape
        run_means, run_stds = np.zeros((run_modes, run_dim)), np.ones((run_modes, run_dim))
        run_means[:k, :d], run_stds[:k, :d] = means, stds
        self.run_mixture = GaussianMixture.create(run_means, run_stds,
                                                  np.concatenate([weights, np.zeros(run_modes - k)]))
        self.x_T_run = np.random.default_rng(seed).standard_normal((num_samples, run_dim))
        self.x_T = self.x_T_run[:, :d].copy()

    def own(self, x):
        """The oracle's own dims of a run output."""
        return np.asarray(x)[:, :self.dim]


class References:
    """Exact ODE solutions, cached by (oracle, schedule, start, end); thread-safe."""

    def __init__(self):
        self.cache = {}
        self.seconds = 0.0
        self.lock = threading.Lock()

    def get(self, oracle, sname, schedule, t_start, end):
        t_start = 1.0 if abs(t_start - 1.0) < 1e-6 else float(t_start)
        end = end if end == "zero" else float(end)
        key = (oracle.name, sname, round(t_start, 10), end if end == "zero" else round(end, 10))
        with self.lock:
            if key not in self.cache:
                t0 = time.perf_counter()
                self.cache[key] = ode_solution(oracle.mixture, oracle.x_T, t_start, end, schedule)
                self.seconds += time.perf_counter() - t0
            return self.cache[key]


def ours_option_for(config: dref.DiffusersConfig):
    """dpmjax options matching a diffusers config, or None if there is no matching solver."""
    if not config.ours or config.ours not in SOLVERS:
        return None
    entry = SOLVERS[config.ours]
    opts = dict(config.ours_options)
    if config.ours == "unipc":
        kw = dict(config.kwargs)
        if "variant" in entry.options:
            opts["variant"] = kw.get("solver_type", "bh2")
        if "order" in entry.options:
            opts["order"] = 2  # diffusers' default solver_order
    return tuple(sorted(opts.items()))


def measure(oracle, sname, schedule, refs, solver, options, grid, final_sigma, end, key=None):
    """Run dpmjax on a grid; (fields for the row: error, seconds, status)."""
    t0 = time.perf_counter()
    x = run_ours(solver, options, oracle.x_T_run, oracle.run_mixture, schedule, sname, grid, final_sigma, key)
    dt = time.perf_counter() - t0
    if isinstance(x, str):
        return dict(seconds=dt, status=x)
    ref = refs.get(oracle, sname, schedule, float(grid[0]), end)
    err = rel_rms(oracle.own(x), ref)
    return dict(error=err, seconds=dt, t_start=float(grid[0]), end=end,
                status="ok" if np.isfinite(err) else "nan")


def own_sweep(task, args, oracles, schedules, refs, writer):
    """One (solver, options, configuration) over every NFE, oracle and schedule: programs compiled per NFE
    are reused across oracles and schedules."""
    label, solver, options, cname, cfg = task
    for nfe in args.nfes:
        for oracle in oracles:
            for sname, schedule in schedules.items():
                base = dict(oracle=oracle.name, schedule=sname, impl="dpmjax", config=cname, label=label,
                            solver=solver, options=dict(options), nfe_target=nfe)
                try:
                    grid, nfe_actual = own_grid(solver, options, schedule, nfe, **cfg)
                except ValueError as err:
                    try:  # e.g. heun spends an even NFE on the grid: take the NFE below (marked in tables)
                        grid, nfe_actual = own_grid(solver, options, schedule, nfe - 1, **cfg)
                    except ValueError:
                        writer(dict(base, status=f"skipped: {err}"[:300]))
                        continue
                end = "zero" if cfg["final_sigma"] == "zero" else float(grid[-1])
                writer(dict(base, nfe=nfe_actual, **measure(oracle, sname, schedule, refs, solver, options, grid,
                                                            cfg["final_sigma"], end)))


def sweep(args, oracles, schedules, solvers, stoch, writer):
    refs = References()
    for oracle in oracles:  # the references every own-grid run needs, before the threads start
        for sname, schedule in schedules.items():
            refs.get(oracle, sname, schedule, 1.0, "zero")
            refs.get(oracle, sname, schedule, 1.0, schedule.default_t_end)
    # dpmjax on its own grids; compiles are the cost, and XLA releases the GIL while compiling.
    tasks = [(label, solver, options, cname, cfg) for cname, cfg in OURS_CONFIGS.items()
             for label, solver, options in solvers]
    with ThreadPoolExecutor(max_workers=args.threads) as pool:
        for _ in pool.map(lambda task: own_sweep(task, args, oracles, schedules, refs, writer), tasks):
            pass
    for oracle in oracles:
        for sname, schedule in schedules.items():
            if not args.no_diffusers:  # diffusers, and dpmjax on each diffusers grid
                diffusers_side(args, oracle, sname, schedule, refs, writer)
            adaptive_side(args, oracle, sname, schedule, refs, writer)
            stochastic_side(args, oracle, sname, schedule, stoch, writer)
    return refs


def diffusers_side(args, oracle, sname, schedule, refs, writer):
    for config in dref.CONFIGS:
        ours_opts = ours_option_for(config)
        for nfe in args.nfes:
            base = dict(oracle=oracle.name, schedule=sname, impl="diffusers", config="diffusers default grid",
                        label=config.label, solver=config.scheduler, options=dict(config.kwargs), nfe_target=nfe)
            t0 = time.perf_counter()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    r = dref.run_diffusers(config, sname, schedule, oracle.mixture, oracle.x_T, nfe)
            except Exception as err:  # noqa: BLE001 - a failing scheduler is a result to report
                writer(dict(base, status=f"error: {type(err).__name__}: {err}"[:300]))
                continue
            dt = time.perf_counter() - t0
            ref = refs.get(oracle, sname, schedule, r["t_start"], r["end"])
            err_d = rel_rms(r["x"], ref)
            writer(dict(base, nfe=r["nfe"], error=err_d, seconds=dt, t_start=r["t_start"], end=r["end"],
                        status="ok" if np.isfinite(err_d) else "nan"))
            if ours_opts is None:
                continue
            final_sigma = "zero" if r["end"] == "zero" else "t_end"
            grid = r["grid"]
            if final_sigma == "t_end" and grid[-1] > r["end"]:
                grid = np.concatenate([grid, [r["end"]]])
            base_o = dict(oracle=oracle.name, schedule=sname, impl="dpmjax", config=f"same grid as {config.label}",
                          label=config.ours, solver=config.ours, options=dict(ours_opts), nfe_target=nfe,
                          pair=config.label)
            try:
                nfe_o = nfe_on_grid(config.ours, ours_opts, schedule, grid, final_sigma)
                if nfe_o != r["nfe"] - config.wasted_calls:  # it reads the grid differently: use its own grid
                    grid, nfe_o = own_grid(config.ours, ours_opts, schedule, r["nfe"] - config.wasted_calls,
                                           "linspace", final_sigma)
                    base_o["config"] += " (own linspace grid)"
            except ValueError as err:
                writer(dict(base_o, status=f"skipped: {err}"[:300]))
                continue
            writer(dict(base_o, nfe=nfe_o, **measure(oracle, sname, schedule, refs, config.ours, ours_opts, grid,
                                                     final_sigma, r["end"])))


ADAPTIVE_TOLS = ((0.05, 0.0078), (0.01, 1e-3), (1e-3, 1e-4))  # (rtol, atol); the first: official


def adaptive_side(args, oracle, sname, schedule, refs, writer):
    """dpm_solver_adaptive (DPM-Solver-12/23, data prediction) from t = 1 to 1e-3: its NFE and error."""
    if "dpm_solver_adaptive" not in SOLVERS:
        return
    from dpmjax.samplers.adaptive import sample_adaptive

    ref = refs.get(oracle, sname, schedule, 1.0, schedule.t_min)
    for order in (2, 3):
        for rtol, atol in ADAPTIVE_TOLS[:1] if args.quick else ADAPTIVE_TOLS:
            base = dict(oracle=oracle.name, schedule=sname, impl="dpmjax", config="adaptive, t=1 -> 1e-3",
                        label=f"dpm_solver_adaptive order={order} rtol={rtol} atol={atol}",
                        solver="dpm_solver_adaptive", options=dict(order=order, rtol=rtol, atol=atol))
            t0 = time.perf_counter()
            try:
                fn = jax.jit(lambda x: sample_adaptive(oracle.mixture.model_fn(schedule), x, schedule=schedule,
                                                       order=order, rtol=rtol, atol=atol, max_nfe=2000))
                x, info = fn(oracle.x_T)
                err = rel_rms(x, ref)
                writer(dict(base, nfe=int(info.nfe), nfe_target=int(info.nfe), error=err,
                            seconds=time.perf_counter() - t0, status="ok" if bool(info.finished) else "unfinished"))
            except Exception as err:  # noqa: BLE001
                writer(dict(base, status=f"error: {type(err).__name__}: {err}"[:300]))


def sliced_w2(a, b, num_projections=128, seed=0):
    """Sliced Wasserstein-2 between two equal-size sample sets [n, D]."""
    rng = np.random.default_rng(seed)
    dirs = rng.standard_normal((a.shape[1], num_projections))
    dirs /= np.linalg.norm(dirs, axis=0, keepdims=True)
    pa, pb = np.sort(a @ dirs, axis=0), np.sort(b @ dirs, axis=0)
    return float(np.sqrt(np.mean((pa - pb) ** 2)))


def stochastic_side(args, oracle, sname, schedule, stoch, writer):
    if not stoch:
        return
    n = oracle.x_T.shape[0]
    exact = np.asarray(oracle.mixture.sample(jax.random.key(1), n, jnp.float64))
    floor = sliced_w2(np.asarray(oracle.mixture.sample(jax.random.key(2), n, jnp.float64)), exact)
    base0 = dict(oracle=oracle.name, schedule=sname, impl="dpmjax", config="linspace+zero (SW2 to exact p_0)")
    writer(dict(base0, label="exact samples (noise floor)", solver="-", nfe=0, nfe_target=0, error=floor,
                status="sw2"))
    for label, solver, options in stoch + [("dpmpp_2m (ODE, for scale)", "dpmpp_2m", ())]:
        if solver not in SOLVERS:
            continue
        for nfe in [m for m in STOCHASTIC_NFES if m in args.nfes or args.quick]:
            base = dict(base0, label=label, solver=solver, options=dict(options), nfe_target=nfe)
            try:
                grid, nfe_actual = own_grid(solver, options, schedule, nfe, "linspace", "zero")
            except ValueError as err:
                writer(dict(base, status=f"skipped: {err}"[:300]))
                continue
            t0 = time.perf_counter()
            x = run_ours(solver, options, oracle.x_T_run, oracle.run_mixture, schedule, sname, grid, "zero",
                         key=jax.random.key(3))
            if isinstance(x, str):
                writer(dict(base, status=x))
                continue
            writer(dict(base, nfe=nfe_actual, error=sliced_w2(oracle.own(x), exact),
                        seconds=time.perf_counter() - t0, status="sw2"))


# ------------------------------------------------------------------------------------------------
# Output: CSV, plots, markdown tables.
# ------------------------------------------------------------------------------------------------

FIELDS = ("oracle", "schedule", "impl", "config", "label", "solver", "options", "nfe_target", "nfe", "error",
          "seconds", "t_start", "end", "pair", "status")


def fmt(e):
    if e is None or e == "":
        return "–"
    if not np.isfinite(e):
        return "NaN"
    return f"{e:.2e}"


def _finite(r):
    return r is not None and r.get("error") not in (None, "") and np.isfinite(r["error"])


def cell(rows, nfe):
    """Error at a target NFE, marked *k when the run made k != NFE model calls."""
    r = rows.get(nfe)
    if r is None or r.get("error") in (None, ""):
        return "–" if r is None or r.get("status", "").startswith("skipped") else "fail"
    mark = "" if r.get("nfe") == nfe else f"*{r['nfe']}"
    return fmt(r["error"]) + mark


def slope(rows, lo=15, hi=50):
    a, b = rows.get(lo), rows.get(hi)
    if not (_finite(a) and _finite(b)) or a["error"] <= 0 or b["error"] <= 0:
        return "–"
    return f"{-math.log(b['error'] / a['error']) / math.log(b['nfe'] / a['nfe']):.2f}"


def index(results, field="label"):
    """{(oracle, schedule, impl, config, label): {nfe_target: row}}."""
    out = {}
    for r in results:
        key = (r["oracle"], r["schedule"], r["impl"], r["config"], r.get(field) or r["label"])
        out.setdefault(key, {})[r.get("nfe_target", 0)] = r
    return out


def tables(results, oracle_names, schedule_names, nfes):
    idx = index(results)
    pairs = {}
    for r in results:
        if r.get("pair"):
            pairs.setdefault((r["oracle"], r["schedule"], r["pair"]), {})[r["nfe_target"]] = r
    lines = []
    hn = [m for m in HEADLINE_NFES if m in nfes]
    for oname in oracle_names:
        for sname in schedule_names:
            lines += [f"#### {oname}, {sname} schedule", "",
                      "| dpmjax solver | " + " | ".join(f"lin+zero {m}" for m in hn) + " | slope | " +
                      " | ".join(f"logSNR {m}" for m in hn) + " | slope |",
                      "|" + "---|" * (2 * len(hn) + 3)]
            labels = [k[4] for k in idx if k[:4] == (oname, sname, "dpmjax", "linspace+zero")]
            for label in labels:
                a = idx.get((oname, sname, "dpmjax", "linspace+zero", label), {})
                b = idx.get((oname, sname, "dpmjax", "logSNR+t_end", label), {})
                lines.append(f"| {label} | " + " | ".join(cell(a, m) for m in hn) + f" | {slope(a)} | " +
                             " | ".join(cell(b, m) for m in hn) + f" | {slope(b)} |")
            lines.append("")
            dkeys = [k for k in idx if k[:3] == (oname, sname, "diffusers")]
            if dkeys:
                lines += ["| diffusers scheduler (same oracle) | " + " | ".join(f"diffusers {m}" for m in hn) +
                          " | dpmjax, same grid | " + " | ".join(f"dpmjax {m}" for m in hn) +
                          " | max rel. diff (all NFE) |", "|" + "---|" * (2 * len(hn) + 3)]
                for k in dkeys:
                    d, o = idx[k], pairs.get((oname, sname, k[4]), {})
                    solver = next((r["solver"] for r in o.values()), "–")
                    if any("own linspace" in r["config"] for r in o.values()):
                        solver += " (own grid)"
                    diffs = [abs(o[m]["error"] - d[m]["error"]) / d[m]["error"] for m in nfes
                             if _finite(o.get(m)) and _finite(d.get(m)) and d[m]["error"] > 0]
                    lines.append(f"| {k[4]} | " + " | ".join(cell(d, m) for m in hn) + f" | {solver} | " +
                                 " | ".join(cell(o, m) for m in hn) +
                                 (f" | {max(diffs):.1e} |" if diffs else " | – |"))
                lines.append("")
            akeys = [k for k in idx if k[:4] == (oname, sname, "dpmjax", "adaptive, t=1 -> 1e-3")]
            if akeys:
                lines.append("Adaptive (t = 1 -> 1e-3): " + "; ".join(
                    f"{k[4].replace('dpm_solver_adaptive ', '')}: NFE {r.get('nfe', '?')}, err {fmt(r.get('error'))}"
                    for k in akeys for r in idx[k].values()))
                lines.append("")
            skeys = [k for k in idx if k[:4] == (oname, sname, "dpmjax", "linspace+zero (SW2 to exact p_0)")]
            if skeys:
                sn = sorted({m for k in skeys for m in idx[k] if m})
                lines += ["Stochastic, sliced W2 to exact p_0 samples (linspace+zero): " + "; ".join(
                    f"{k[4]}: " + (fmt(idx[k][0]["error"]) if 0 in idx[k] else
                                   ", ".join(f"{cell(idx[k], m)} @{m}" for m in sn))
                    for k in skeys), ""]
    return "\n".join(lines)


def anomalies(results):
    """Runs that failed or gave NaN, and errors that do not fall from NFE 10 to 20 or 20 to 50."""
    out = []
    for key, rows in index(results, field="pair").items():
        if "SW2" in key[3] or "adaptive" in key[3]:
            continue
        name = " / ".join(key[:4]) + (f" / {key[4]}" if key[4] not in key[3] else "")
        for r in rows.values():
            if r.get("status") == "nan" or r.get("status", "").startswith("error"):
                out.append(f"{name}: NFE {r.get('nfe_target')}: {r['status']}")
        for lo, hi in ((10, 20), (20, 50)):
            a, b = rows.get(lo), rows.get(hi)
            if _finite(a) and _finite(b) and b["error"] > 0.9 * a["error"]:
                out.append(f"{name}: error {a['error']:.2e} at NFE {a['nfe']} -> {b['error']:.2e} at NFE "
                           f"{b['nfe']} (does not fall)")
    return out


def plots(results, oracle_names, schedule_names, out_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = index(results)
    panels = (("dpmjax", "linspace+zero"), ("dpmjax", "logSNR+t_end"), ("diffusers", "diffusers default grid"))
    for oname in oracle_names:
        for sname in schedule_names:
            fig, axes = plt.subplots(1, 3, figsize=(18, 5.5), sharey=True)
            for ax, (impl, config) in zip(axes, panels):
                for key, rows in idx.items():
                    if key[:4] != (oname, sname, impl, config):
                        continue
                    pts = sorted((r["nfe"], r["error"]) for r in rows.values() if _finite(r) and r["error"] > 0)
                    if pts:
                        style = ("-", "--", ":")[len(ax.get_lines()) // 10 % 3]
                        ax.loglog(*zip(*pts), marker="o", ms=3, ls=style, label=key[4])
                ax.set_title(f"{impl}: {config}")
                ax.set_xlabel("NFE")
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=6, ncol=2)
            axes[0].set_ylabel("relative RMS error to the exact ODE solution")
            fig.suptitle(f"{oname}, DiscreteVP {sname}, float64")
            fig.tight_layout()
            fig.savefig(os.path.join(out_dir, f"error_vs_nfe_{oname}_{sname}.png"), dpi=110)
            plt.close(fig)


def read_csv(path):
    rows = []
    with open(path) as fh:
        for r in csv.DictReader(fh):
            for k in ("nfe", "nfe_target"):
                r[k] = int(r[k]) if r[k] else None
            r["error"] = float(r["error"]) if r["error"] else None
            rows.append(r)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: few samples, NFE 5 and 10")
    parser.add_argument("--nfes", type=int, nargs="*", default=None)
    parser.add_argument("--solvers", nargs="*", default=None, help="only these dpmjax solvers")
    parser.add_argument("--oracles", nargs="*", default=("ring2d", "gmm64d"))
    parser.add_argument("--no-diffusers", action="store_true")
    parser.add_argument("--threads", type=int, default=2, help="threads compiling dpmjax programs")
    parser.add_argument("--from-csv", action="store_true", help="only rebuild tables and plots from --out's CSV")
    parser.add_argument("--out", default=os.path.join("results", "error_vs_nfe"))
    args = parser.parse_args(argv)
    args.nfes = tuple(args.nfes or ((5, 10) if args.quick else NFES))
    n = 48 if args.quick else 1000
    all_oracles = {"ring2d": lambda: Oracle("ring2d", GaussianMixture.ring(), n, seed=0),
                   "gmm64d": lambda: Oracle("gmm64d", GaussianMixture.random(seed=0, num_modes=6, dim=64), n,
                                            seed=1)}
    oracles = [all_oracles[o]() for o in args.oracles]
    schedules = {"linear": DiscreteVP.from_name("linear"), "cosine": DiscreteVP.from_name("cosine")}
    names = sorted(SOLVERS) if args.solvers is None else [s for s in args.solvers if s in SOLVERS]
    solvers = solver_rows(names)
    stoch = [(s, s, ()) for s in stochastic_names(names)]
    os.makedirs(args.out, exist_ok=True)
    if args.from_csv:
        results = read_csv(os.path.join(args.out, "error_vs_nfe.csv"))
        onames = list(dict.fromkeys(r["oracle"] for r in results))
        snames = list(dict.fromkeys(r["schedule"] for r in results))
        nfes = tuple(sorted({r["nfe_target"] for r in results if r.get("nfe_target")}))
        with open(os.path.join(args.out, "tables.md"), "w") as fh:
            fh.write(tables(results, onames, snames, nfes) + "\n\nAnomalies (automatic):\n\n" +
                     "\n".join(f"- {b}" for b in anomalies(results)) + "\n")
        plots(results, onames, snames, args.out)
        return
    print(f"solvers: {[s[0] for s in solvers]}; stochastic: {[s[0] for s in stoch]}; NFE {args.nfes}; "
          f"{n} samples", flush=True)

    results = []
    start = time.perf_counter()
    with open(os.path.join(args.out, "error_vs_nfe.csv"), "w", newline="") as fh:
        out = csv.DictWriter(fh, fieldnames=FIELDS)
        out.writeheader()

        lock = threading.Lock()

        def writer(row):
            with lock:
                _write(row)

        def _write(row):
            results.append(row)
            out.writerow({k: row.get(k, "") for k in FIELDS})
            fh.flush()
            err = row.get("error")
            print(f"[{time.perf_counter() - start:7.1f}s] {row['oracle']:6s} {row['schedule']:6s} "
                  f"{row['impl']:9s} {row['config'][:44]:44s} {row['label'][:34]:34s} "
                  f"nfe={row.get('nfe', row.get('nfe_target', ''))!s:>3} "
                  f"{'err=' + fmt(err) if err is not None else row.get('status', '')[:120]}", flush=True)

        refs = sweep(args, oracles, schedules, solvers, stoch, writer)
    total = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime
    onames, snames = [o.name for o in oracles], list(schedules)
    md = tables(results, onames, snames, args.nfes)
    bad = anomalies(results)
    with open(os.path.join(args.out, "tables.md"), "w") as fh:
        fh.write(md + "\n\nAnomalies (automatic):\n\n" + "\n".join(f"- {b}" for b in bad) + "\n")
        fh.write(f"\nTotal {total:.0f} s wall, {cpu:.0f} s CPU, load average {os.getloadavg()[0]:.1f} at the end "
                 f"(ODE references {refs.seconds:.0f} s); {len(_SAMPLERS)} compiled samplers\n")
    plots(results, onames, snames, args.out)
    print(md)
    print("Anomalies:\n" + "\n".join(bad))
    print(f"total {total:.0f} s wall, {cpu:.0f} s CPU, references {refs.seconds:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
