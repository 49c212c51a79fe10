"""The sampler entries: ``sample`` (closure form), ``make_sampler`` and ``make_param_sampler`` (compiled).

Everything that is the same for all solvers lives here, once: the time grid from ``nfe`` and ``spacing``,
conversion of the model's prediction to (eps, x0), dynamic thresholding, the final step to sigma = 0 and
``denoise_to_zero``, NaN reporting, the trajectory, and validation of every argument before tracing.

Two forms of one contract (DESIGN.md):
  * ``sample(model_fn, x_T, ...)``: the model is any ``model_fn(x, t)``; jittable, vmappable, differentiable.
  * ``make_param_sampler(apply_fn, ...)`` -> ``sampler(params, x_T, key=None, *, timesteps=None, **cond)``:
    the model is ``apply_fn(params, x, t, **cond)``; params, x_T, key, conditioning and the time grid are
    arguments of one jitted program (optionally sharded over a mesh), so a new checkpoint, an EMA swap or another
    grid of the same length (another spacing, t_end, a learned schedule) never recompiles.
    ``make_sampler(model_fn, ...)`` is the same for a closed-over model (``fn(x_T, key=None, *, timesteps=None)``).

Final step to sigma = 0 (``final_sigma="zero"``, diffusers' ``final_sigmas_type="zero"``, k-diffusion): the last
grid point is read as sigma = 0; the solver runs to the one before it and the last step is
x_0 = x0-prediction(x_{N-1}, t_{N-1}), i.e. a first-order step to sigma = 0 (one model call), as diffusers,
k-diffusion and DPM-Solver's ``denoise_to_zero`` do. ``denoise_to_zero=True`` keeps the whole grid and adds
that same call at t_end (+1 NFE). A concrete grid whose last time has sigma = 0 must say ``final_sigma="zero"``
(it is an error otherwise: the solver would divide by sigma = 0), so a grid means the same under ``jit``.

Errors the host must see (``check_nan``, an adaptive solve that did not reach t_end) are raised after the run when
the values are concrete (eager ``sample``, and every call of the compiled samplers). Inside an outer ``jax.jit``
they cannot be raised: ``check_nan=True`` is then refused at trace time (use ``return_info=True`` and test
``info.first_nonfinite``, or the compiled samplers), and an unfinished adaptive sample is returned as NaN unless
``return_info=True`` hands the caller ``info.finished``.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dpmjax import parameterization
from dpmjax.parameterization import coefficient_dtype
from dpmjax.samplers.base import ModelEval, Solver, SolverEntry, at_time, expand_like
from dpmjax.samplers.registry import SOLVERS
from dpmjax.schedules import time_grid, validate_timesteps

__all__ = ["sample", "make_sampler", "make_param_sampler", "plan", "Plan", "SampleInfo", "SamplingError",
           "make_evaluate", "run_plan", "device_grid", "prepare_grid", "FINAL_SIGMAS"]

FINAL_SIGMAS = ("t_end", "zero")
_SAMPLE_ONLY = ("prediction", "return_trajectory", "return_info", "thresholding", "threshold_ratio",
                "threshold_max", "check_nan", "remat")


def _mismatch_errors() -> tuple:
    from flax.errors import FlaxError

    return (TypeError, ValueError, KeyError, IndexError, AttributeError, FlaxError)


_MISMATCH_ERRORS = _mismatch_errors()


class SamplingError(RuntimeError):
    """A sampler could not produce a valid sample (non-finite model output, adaptive solve stopped early)."""


class SampleInfo(NamedTuple):
    """What a run did (``sample(..., return_info=True)``); scalars, traced under jit."""

    nfe: jax.Array              # int32 []: model calls made
    first_nonfinite: jax.Array  # int32 []: first model call (0-based) with a NaN/inf output; -1 if none
    finished: jax.Array         # bool []: the end of the grid was reached (adaptive: False when max_nfe stopped it)
    t_final: jax.Array          # []: the time reached (before a final step to sigma = 0)
    num_rejected: jax.Array     # int32 []: rejected trial steps (adaptive solvers; 0 for fixed-step solvers)


class Plan(NamedTuple):
    """A validated sampling plan (host side): the solver, its grid data and the final-step flag."""

    solver: Solver                 # or an ``AdaptiveSolver``
    grid: dict                     # {"t": times [N+1] or [N+1, B] (numpy or traced), ...solver data}
    final_denoise: bool            # one more x0 call after the solver (final_sigma="zero" or denoise_to_zero)
    entry: SolverEntry
    options: dict                  # the solver options (for preparing other grids of the same plan)
    final_zero: bool               # the given grid's last point is the sigma = 0 end (dropped from grid["t"])


def _solver_entry(solver: str) -> SolverEntry:
    if not isinstance(solver, str) or solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {sorted(SOLVERS)}")
    return SOLVERS[solver]


def _concrete(value):
    """``value`` as a numpy array, or None while it is traced (values can only be checked when concrete)."""
    try:
        return np.asarray(value)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def plan(schedule, solver: str, *, nfe=None, timesteps=None, spacing: str = "time_uniform", t_start=None,
         t_end=None, final_sigma: str = "t_end", denoise_to_zero: bool = False, **solver_options) -> Plan:
    """Validate arguments and build the solver and its grid data.

    Runs on the host before anything is traced; every error names the argument and the allowed values.
    """
    entry = _solver_entry(solver)
    entry.check(solver_options)
    if final_sigma not in FINAL_SIGMAS:
        raise ValueError(f"final_sigma must be one of {FINAL_SIGMAS}, got {final_sigma!r}")
    if (nfe is None) == (timesteps is None):
        raise ValueError("give exactly one of nfe (with spacing) or timesteps")
    if not isinstance(denoise_to_zero, bool):
        raise ValueError(f"denoise_to_zero must be True or False, got {denoise_to_zero!r}")
    final_zero = final_sigma == "zero"
    if final_zero and denoise_to_zero:
        raise ValueError("final_sigma='zero' already ends at sigma = 0; do not also set denoise_to_zero")
    extra_calls = int(final_zero or denoise_to_zero)
    if timesteps is None:
        if not isinstance(nfe, (int, np.integer)) or isinstance(nfe, bool):
            raise ValueError(f"nfe must be an integer, got {nfe!r}")
        min_nfe = entry.min_nfe(**solver_options) + extra_calls
        if nfe < min_nfe:
            raise ValueError(f"nfe={nfe} is too small for solver {solver!r} with these options: it needs "
                             f"nfe >= {min_nfe}")
        steps = entry.steps_for_nfe(nfe - extra_calls, **solver_options)
        builder = entry.grid or _default_grid
        timesteps = builder(schedule, steps + int(final_zero), spacing, t_start, t_end, **solver_options)
    grid = prepare_grid(entry, schedule, timesteps, final_zero, solver_options)
    times = grid["t"]
    if times.shape[0] < 2:
        raise ValueError("final_sigma='zero' needs at least 3 time points (2 + the sigma = 0 end)")
    built = entry.build(schedule, int(times.shape[0]) - 1, tail_steps=int(final_zero), **solver_options)
    return Plan(built, grid, bool(final_zero or denoise_to_zero), entry, dict(solver_options), final_zero)


def _default_grid(schedule, num_steps, spacing, t_start, t_end, **_):
    return time_grid(schedule, num_steps, spacing, t_start=t_start, t_end=t_end)


def prepare_grid(entry: SolverEntry, schedule, timesteps, final_zero: bool, options: dict) -> dict:
    """The solver's grid data for explicit ``timesteps`` (endpoints included; with ``final_zero`` the last
    point is the sigma = 0 end and is dropped): validated when concrete, then the entry's ``prepare`` hook."""
    host = _concrete(timesteps)
    if host is None:  # traced: shapes are all that can be checked
        times = timesteps
        if times.ndim not in (1, 2):
            raise ValueError(f"timesteps must have shape [N+1] or [N+1, batch], got {times.shape}")
        times = times[:-1] if final_zero else times
    elif final_zero:
        # the last point only marks the sigma = 0 end: it may be 0 even where the schedule starts at 1/N
        ends = np.asarray(host, np.float64)
        validate_timesteps(schedule, ends[:-1], min_points=2)
        if not np.all((ends[-1] >= 0) & (ends[-1] < ends[-2])):
            raise ValueError("timesteps: with final_sigma='zero' the last point (the sigma = 0 end) must be >= 0 "
                             "and below the one before it")
        times = ends[:-1]
    else:
        times = validate_timesteps(schedule, host, min_points=2)
        end_sigma = _sigma_on_host(schedule, times[-1])
        if np.any(end_sigma == 0):
            raise ValueError("timesteps end where sigma = 0: pass final_sigma='zero' (the last step is then the "
                             "x0-prediction, as diffusers' final_sigmas_type='zero'), or end at sigma > 0")
    grid = {"t": times}
    if entry.prepare is not None:
        grid.update(entry.prepare(schedule, times, tail_steps=int(final_zero), **options))
    return grid


def _sigma_on_host(schedule, t):
    from dpmjax.schedules import _host_eval  # noqa: PLC0415 - one jitted host evaluation of the schedule

    return np.exp(_host_eval(_log_sigma_fn, schedule, np.atleast_1d(np.asarray(t, np.float64))))


@jax.jit
def _log_sigma_fn(schedule, t):
    return schedule.log_sigma(t)


def device_grid(grid: dict, dtype) -> dict:
    """Floating grid leaves in ``coefficient_dtype(dtype)`` (at least float32), others unchanged."""
    compute = coefficient_dtype(dtype)

    def cast(leaf):
        leaf = jnp.asarray(leaf) if not isinstance(leaf, np.ndarray) else leaf
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            return jnp.asarray(leaf, compute)
        return jnp.asarray(leaf)

    return jax.tree.map(cast, grid)


def make_evaluate(model_fn: Callable, schedule, prediction: str = "eps", *, thresholding: bool = False,
                  threshold_ratio: float = 0.995, threshold_max: float = 1.0) -> Callable:
    """``evaluate(x, t) -> ModelEval(eps, x0)``: one model call at (x, t) in x's dtype.

    The model gets t [B] in ``coefficient_dtype(x.dtype)`` (float32 for a bfloat16 state); its output is cast to
    x's dtype (a bfloat16 model under a float32 state is upcast).
    """
    parameterization.check_prediction(prediction)

    def evaluate(x, t):
        t = jnp.asarray(t, coefficient_dtype(x.dtype))  # scalar (one grid for the batch) or [B]
        out = jnp.asarray(model_fn(x, jnp.broadcast_to(t, (x.shape[0],)))).astype(x.dtype)
        # conversions at t itself: a scalar t evaluates the schedule once, not once per sample
        eps = parameterization.to_eps(out, x, t, schedule, prediction)
        x0 = parameterization.to_x0(out, x, t, schedule, prediction)
        if thresholding:
            c = at_time(schedule, t)
            x0 = parameterization.dynamic_threshold(x0, threshold_ratio, threshold_max)
            eps = (x - expand_like(c.alpha, x) * x0) / expand_like(c.sigma, x)
        return ModelEval(eps=eps, x0=x0)

    return evaluate


def run_plan(p: Plan, evaluate: Callable, x_T, key, grid: dict, *, return_trajectory: bool = False,
             track_nonfinite: bool = False, remat: bool = False):
    """Run a plan: (x_0, trajectory or None, SampleInfo). ``grid`` holds device arrays (``device_grid``)."""
    key = jax.random.key(0) if key is None else key
    times = grid["t"]
    if p.entry.adaptive:  # a solver with its own (while) loop: dpm_solver_adaptive
        x, info = p.solver.run(evaluate, x_T, key, grid)
        nfe, first_bad = info.nfe, jnp.asarray(-1, jnp.int32)
        if p.final_denoise:
            x = evaluate(x, times[-1]).x0
            nfe = nfe + 1
        return x, None, SampleInfo(nfe=nfe, first_nonfinite=first_bad, finished=info.finished,
                                   t_final=info.t_final, num_rejected=info.num_rejected)

    solver = p.solver

    def body(carry, i):
        state, first_bad = carry
        x_eval, t_eval = solver.query(state, i, grid)
        out = evaluate(x_eval, t_eval)
        if track_nonfinite:
            bad = ~(jnp.all(jnp.isfinite(out.eps)) & jnp.all(jnp.isfinite(out.x0)))
            first_bad = jnp.where(bad & (first_bad < 0), i, first_bad)
        state = solver.update(state, i, grid, out)
        return (state, first_bad), (solver.output(state) if return_trajectory else None)

    if remat:  # prevent_cse=False is safe (and faster) inside scan, see jax.checkpoint's docs
        body = jax.checkpoint(body, prevent_cse=False)
    state = solver.init(x_T, key, grid)
    (state, first_bad), trajectory = jax.lax.scan(
        body, (state, jnp.asarray(-1, jnp.int32)), jnp.arange(solver.num_model_calls, dtype=jnp.int32))
    x = solver.output(state)
    nfe = solver.num_model_calls
    if p.final_denoise:
        out = evaluate(x, times[-1])
        if track_nonfinite:
            bad = ~jnp.all(jnp.isfinite(out.x0))
            first_bad = jnp.where(bad & (first_bad < 0), nfe, first_bad)
        x = out.x0
        nfe += 1
        if return_trajectory:
            trajectory = jnp.concatenate([trajectory, x[None]])
    info = SampleInfo(nfe=jnp.asarray(nfe, jnp.int32), first_nonfinite=first_bad, finished=jnp.asarray(True),
                      t_final=jnp.asarray(times[-1]), num_rejected=jnp.asarray(0, jnp.int32))
    return x, trajectory, info


def _validate_call(p: Plan, solver: str, x_T, key, *, thresholding, return_trajectory, check_nan):
    if not jnp.issubdtype(x_T.dtype, jnp.floating):
        raise ValueError(f"x_T must be a floating-point array, got dtype {x_T.dtype}")
    if x_T.ndim < 1:
        raise ValueError(f"x_T must have a batch dimension, got shape {x_T.shape}")
    if p.entry.adaptive and return_trajectory:
        raise ValueError(f"solver {solver!r} runs its own adaptive loop: return_trajectory is not supported "
                         "(its info.nfe says how many calls it made)")
    if thresholding and p.solver.uses == "eps":
        raise ValueError(f"thresholding acts on x0-predictions; solver {solver!r} (with these options) updates "
                         "with eps only. Use a data-prediction solver (dpmpp_*, unipc, ddim, ...).")
    if key is None and p.entry.needs_key(p.options):
        raise ValueError(f"solver {solver!r} is stochastic: pass key=jax.random.key(seed)")
    times = p.grid["t"]
    if times.ndim == 2 and times.shape[1] != x_T.shape[0]:
        raise ValueError(f"per-sample timesteps must have shape [N+1, {x_T.shape[0]}], got {times.shape}")


def _check_model(model_fn, x_T, times):
    t0 = jax.ShapeDtypeStruct((x_T.shape[0],), coefficient_dtype(x_T.dtype))
    try:
        out = jax.eval_shape(model_fn, x_T, t0)
    except Exception as err:  # noqa: BLE001 - re-raised with the context a user needs
        raise ValueError(f"model_fn failed on x_T of shape {x_T.shape} and dtype {x_T.dtype} with t of shape "
                         f"{t0.shape}: {type(err).__name__}: {err}") from err
    if not hasattr(out, "shape") or tuple(out.shape) != tuple(x_T.shape):
        raise ValueError(f"model_fn must return an array shaped like x_T {x_T.shape}, got {out}")


def _raise_on_host(info: SampleInfo, solver: str, *, check_nan: bool, adaptive: bool) -> None:
    """The host-side errors of a finished run (``info`` concrete)."""
    first_bad = int(info.first_nonfinite)
    if check_nan and first_bad >= 0:
        raise FloatingPointError(f"model output became NaN/inf at model call {first_bad} (0-based) of solver "
                                 f"{solver!r}")
    if adaptive and not bool(info.finished):
        raise SamplingError(f"solver {solver!r} stopped at t={float(info.t_final):.6g} before reaching the end of "
                            f"its grid, after {int(info.nfe)} model calls: raise max_nfe or loosen rtol/atol (a NaN "
                            "from the model also ends the loop here: check the model with check_nan)")


def sample(model_fn: Callable, x_T, *, schedule, solver: str, nfe: int | None = None, timesteps=None,
           prediction: str = "eps", spacing: str = "time_uniform", t_start=None, t_end=None, key=None,
           return_trajectory: bool = False, return_info: bool = False, final_sigma: str = "t_end",
           denoise_to_zero: bool = False, thresholding: bool = False, threshold_ratio: float = 0.995,
           threshold_max: float = 1.0, check_nan: bool = False, remat: bool = False, **solver_options):
    """Sample x_0 from x_T with a registered solver, in ``nfe`` model evaluations (counted exactly).

    Args:
      model_fn: ``model_fn(x [B, ...], t [B]) -> prediction`` in continuous time of ``schedule``.
      x_T: [B, ...] initial noise (at ``t_start``, default the schedule's start).
      schedule: a ``dpmjax.schedules`` schedule.
      solver: a name in ``dpmjax.samplers.SOLVERS``.
      nfe: number of model evaluations; with ``spacing``, ``t_start`` and ``t_end`` it builds the grid.
      timesteps: explicit decreasing times [N+1] (or per-sample [N+1, B]), endpoints included; overrides nfe.
        May be traced (then only its shape is checked).
      prediction: what ``model_fn`` returns: "eps", "x0", "v", "score" or "flow".
      spacing: "logSNR", "time_uniform", "time_quadratic", "karras", "linspace", "leading", "trailing".
      key: a ``jax.random.key`` for stochastic solvers (ddpm, ddim with eta > 0, sde_dpmpp_2m).
      return_trajectory: also return the current sample after every model call, [NFE, B, ...].
      return_info: also return a ``SampleInfo`` (NFE made, first non-finite call, finished, time reached).
      final_sigma: "t_end" (stop at the last time) or "zero" (last step to sigma = 0).
      denoise_to_zero: after reaching t_end, return the x0-prediction there (+1 NFE).
      thresholding: Imagen dynamic thresholding of every x0-prediction (quantile ``threshold_ratio``,
        floor ``threshold_max``), for data-prediction solvers.
      check_nan: raise ``FloatingPointError`` (with the call index) if the model returns NaN/inf. Needs
        concrete values: inside an outer ``jax.jit`` use ``return_info=True`` (or ``make_sampler``).
      remat: rematerialise each scan step under reverse-mode differentiation (``jax.checkpoint`` on the
        step): backprop then stores only the solver state per step, not the model's activations, and
        recomputes each step once. No effect on the value, nor on solvers with their own loop.
      **solver_options: the solver's own options (order, lower_order_final, eta, variant, ...).
    Returns:
      x_0 [B, ...] in the dtype of x_T; with ``return_trajectory`` and/or ``return_info``, a tuple
      (x_0, trajectory?, info?) in that order.
    """
    parameterization.check_prediction(prediction)
    x_T = jnp.asarray(x_T)
    p = plan(schedule, solver, nfe=nfe, timesteps=timesteps, spacing=spacing, t_start=t_start, t_end=t_end,
             final_sigma=final_sigma, denoise_to_zero=denoise_to_zero, **solver_options)
    _validate_call(p, solver, x_T, key, thresholding=thresholding, return_trajectory=return_trajectory,
                   check_nan=check_nan)
    grid = device_grid(p.grid, x_T.dtype)
    _check_model(model_fn, x_T, grid["t"])
    evaluate = make_evaluate(model_fn, schedule, prediction, thresholding=thresholding,
                             threshold_ratio=threshold_ratio, threshold_max=threshold_max)
    x, trajectory, info = run_plan(p, evaluate, x_T, key, grid, return_trajectory=return_trajectory,
                                   track_nonfinite=check_nan or return_info, remat=remat)
    needs_host = check_nan or (p.entry.adaptive and not return_info)
    if needs_host:
        concrete = _concrete(info.finished)
        if concrete is not None:
            _raise_on_host(jax.device_get(info), solver, check_nan=check_nan, adaptive=p.entry.adaptive)
        elif check_nan:
            raise ValueError("check_nan=True raises on the host and cannot run inside jax.jit: use "
                             "dpmjax.make_sampler(..., check_nan=True) / make_param_sampler (they raise after the "
                             "compiled call), or return_info=True and test info.first_nonfinite >= 0")
        else:  # an adaptive solve under an outer jit that did not reach t_end: a NaN sample nobody can miss
            x = jnp.where(info.finished, x, jnp.full_like(x, jnp.nan))
    out = (x,) + ((trajectory,) if return_trajectory else ()) + ((info,) if return_info else ())
    return out[0] if len(out) == 1 else out


# ---------------------------------------------------------------------------------------------------------
# Compiled samplers: params, x_T, key, conditioning and the grid are arguments of one jitted program.
# ---------------------------------------------------------------------------------------------------------

class _Compiled:
    """The shared machinery of ``make_sampler`` and ``make_param_sampler``."""

    def __init__(self, apply_fn, *, schedule, solver, nfe, timesteps, mesh, params_sharding, batch_size,
                 prediction="eps", thresholding=False, threshold_ratio=0.995, threshold_max=1.0, check_nan=False,
                 remat=False, **plan_kwargs):
        from dpmjax import sharding

        parameterization.check_prediction(prediction)
        for name in ("return_trajectory", "return_info"):
            if plan_kwargs.pop(name, False):
                raise ValueError(f"{name} is not available from a compiled sampler: use dpmjax.sample")
        self.plan = plan(schedule, solver, nfe=nfe, timesteps=timesteps, **plan_kwargs)
        self.default_timesteps = _default_timesteps(self.plan, schedule, timesteps)
        if thresholding and self.plan.solver.uses == "eps":
            raise ValueError(f"thresholding acts on x0-predictions; solver {solver!r} updates with eps only")
        if self.plan.grid["t"].ndim != 1:
            raise ValueError("a compiled sampler takes one time grid [N+1] for the whole batch; per-sample grids "
                             "[N+1, B] run through dpmjax.sample")
        self.solver, self.schedule, self.check_nan, self.mesh = solver, schedule, bool(check_nan), mesh
        self.params_sharding = params_sharding
        self.num_shards = 1 if mesh is None else sharding.data_axis_size(mesh)
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size < 1 or batch_size % self.num_shards):
            raise ValueError(f"batch_size must be a positive multiple of the mesh's data axis ({self.num_shards}), "
                             f"got {batch_size!r}")
        self.batch_size = batch_size
        self.apply_fn, self._checked = apply_fn, set()
        p = self.plan

        def run(params, x_T, key, grid, cond):
            def model_fn(x, t):
                return apply_fn(params, x, t, **cond)
            evaluate = make_evaluate(model_fn, schedule, prediction, thresholding=thresholding,
                                     threshold_ratio=threshold_ratio, threshold_max=threshold_max)
            x, _, info = run_plan(p, evaluate, x_T, key, grid, track_nonfinite=self.check_nan, remat=remat)
            return x, info

        if mesh is None:
            self.jitted = jax.jit(run)
        else:
            data, repl = sharding.data_sharding(mesh), sharding.replicated(mesh)
            # params_sharding None: the params keep the sharding they come with (replicated or fsdp-sharded
            # arrays on the mesh; host arrays are placed by XLA)
            self.jitted = jax.jit(run, in_shardings=(params_sharding, data, repl, repl, data),
                                  out_shardings=(data, repl))

    def grid_for(self, timesteps, grid_options):
        if timesteps is None and not grid_options:
            return self.plan.grid
        entry = self.plan.entry
        unknown = sorted(set(grid_options) - set(entry.prepared_options))
        if unknown:
            raise ValueError(f"solver {self.solver!r}: {unknown} cannot change per call (only the grid data "
                             f"{list(entry.prepared_options)} can); build another sampler")
        if timesteps is None:
            timesteps = self.default_timesteps
        grid = prepare_grid(entry, self.schedule, timesteps, self.plan.final_zero,
                            {**self.plan.options, **grid_options})
        want = self.plan.grid["t"].shape
        if tuple(grid["t"].shape) != tuple(want):
            raise ValueError(f"timesteps: this sampler was compiled for a grid of {want[0] + self.plan.final_zero} "
                             f"points, got {np.shape(timesteps)} (build another sampler for another length)")
        return grid

    def place_params(self, params):
        """Params not already on the mesh (e.g. restored to one device) are replicated over it; params on the mesh
        (replicated or fsdp-sharded by training) keep their sharding."""
        if self.mesh is None or self.params_sharding is not None:
            return params
        from dpmjax import sharding

        devices, replicated = set(self.mesh.devices.flat), sharding.replicated(self.mesh)

        def place(leaf):
            if isinstance(leaf, jax.Array) and leaf.sharding.device_set == devices:
                return leaf
            return jax.device_put(leaf, replicated)

        return jax.tree.map(place, params)

    def __call__(self, params, x_T, key, timesteps, cond, grid_options=None):
        from dpmjax import sharding

        x_T = x_T if isinstance(x_T, jax.Array) else jnp.asarray(x_T)
        _validate_call(self.plan, self.solver, x_T, key, thresholding=False, return_trajectory=False,
                       check_nan=self.check_nan)
        key = jax.random.key(0) if key is None else key
        grid = device_grid(self.grid_for(timesteps, grid_options or {}), x_T.dtype)
        total = x_T.shape[0]
        for name, value in cond.items():
            if np.shape(value)[:1] != (total,):
                raise ValueError(f"conditioning {name!r} must have a leading batch dimension {total}, got shape "
                                 f"{np.shape(value)}")
        chunk = self.batch_size or -(-total // self.num_shards) * self.num_shards
        self._check_inputs(params, x_T, cond, chunk)
        params = self.place_params(params)
        if chunk == total:  # no slicing: global (multi-host) arrays pass through untouched
            x, info = self.jitted(params, x_T, key, grid, cond)
            self._check(info)
            return x
        outputs = []
        for c, start in enumerate(range(0, total, chunk)):
            size = min(chunk, total - start)
            part = sharding.pad_to_multiple(x_T[start:start + size], chunk)[0]
            part_cond = {k: sharding.pad_to_multiple(jnp.asarray(v)[start:start + size], chunk)[0]
                         for k, v in cond.items()}
            x, info = self.jitted(params, part, key if c == 0 else jax.random.fold_in(key, c), grid, part_cond)
            self._check(info)
            outputs.append(x[:size])
        return jnp.concatenate(outputs)

    def _check_inputs(self, params, x_T, cond, chunk):
        """Trace the model once per input structure (no compile): params or conditioning that do not fit
        ``apply_fn`` give an error naming them instead of a failure deep inside the compiled program."""
        abstract = jax.tree.map(lambda v: jax.ShapeDtypeStruct(np.shape(v), jnp.result_type(v)), (params, cond))
        signature = (jax.tree.structure(abstract), tuple(jax.tree.leaves(abstract)), tuple(x_T.shape[1:]),
                     x_T.dtype, chunk)  # shapes only: a multi-host global x_T is never read here
        if signature in self._checked:
            return
        t = jax.ShapeDtypeStruct((chunk,), coefficient_dtype(x_T.dtype))
        x = jax.ShapeDtypeStruct((chunk,) + tuple(x_T.shape[1:]), x_T.dtype)
        cond_chunk = {k: jax.ShapeDtypeStruct((chunk,) + tuple(np.shape(v)[1:]), jnp.result_type(v))
                      for k, v in cond.items()}
        try:
            out = jax.eval_shape(lambda p, x, t, c: self.apply_fn(p, x, t, **c), params, x, t, cond_chunk)
        except _MISMATCH_ERRORS as err:  # shapes and structures that do not fit: named; other errors propagate
            raise ValueError(f"params (or conditioning {sorted(cond)}) do not fit apply_fn for x_T of shape "
                             f"{tuple(x_T.shape)}: {type(err).__name__}: {err}") from err
        if not hasattr(out, "shape") or tuple(out.shape) != tuple(x.shape):
            raise ValueError(f"apply_fn must return an array shaped like its x {tuple(x.shape)}, got {out}")
        self._checked.add(signature)

    def _check(self, info):
        if self.check_nan or self.plan.entry.adaptive:
            _raise_on_host(jax.device_get(info), self.solver, check_nan=self.check_nan,
                           adaptive=self.plan.entry.adaptive)

    def cache_size(self) -> int:
        """Compiled programs so far (one per batch shape and grid length)."""
        return self.jitted._cache_size()  # noqa: SLF001 - jax's public-by-use cache counter


def _default_timesteps(p: Plan, schedule, timesteps):
    """The full grid (with the sigma = 0 end) a sampler was built with, to re-prepare with other grid data."""
    if timesteps is not None:
        return timesteps
    times = np.asarray(p.grid["t"], np.float64)
    return np.append(times, 0.0) if p.final_zero else times


def make_param_sampler(apply_fn: Callable, *, schedule, solver: str, nfe: int | None = None, timesteps=None,
                       mesh=None, params_sharding=None, batch_size: int | None = None, **kwargs):
    """The params-as-arguments sampler: ``sampler(params, x_T, key=None, *, timesteps=None, **cond) -> x_0``.

    ``apply_fn(params, x [B, ...], t [B], **cond) -> prediction`` is the model contract shared with training,
    the adjoint and the methods (``dpmjax.nn.make_apply_fn``). params, x_T, key, ``cond`` (per-sample arrays
    with a leading batch axis, e.g. ``y=labels``) and the time grid are arguments of one jitted program: a new
    checkpoint, an EMA swap, or another ``timesteps`` grid of the same length never recompiles.

    Args:
      apply_fn: the model.
      schedule, solver, nfe, timesteps: as ``sample``; ``timesteps`` given here is the default grid, and each
        call may pass another of the same length.
      mesh: a ``jax.sharding.Mesh`` with a "data" axis (``dpmjax.sharding.make_mesh``): x_T, cond and the output
        are split over it, params placed by ``params_sharding`` (default: as they come, e.g. replicated or
        fsdp-sharded by training; or ``dpmjax.sharding.sharding_rule("fsdp", mesh, params)``). A multi-host
        global x_T whose batch equals the compiled batch passes through untouched.
      batch_size: the compiled batch; a larger x_T runs in chunks of it (chunk c > 0 uses
        ``fold_in(key, c)``), a smaller or last partial chunk is padded and sliced, never recompiled. Default:
        the batch of x_T, padded to a multiple of the data axis.
      kwargs: those of ``sample`` (prediction, spacing, t_start, t_end, final_sigma, denoise_to_zero,
        thresholding, check_nan, remat, solver options). ``check_nan`` and an adaptive solver's unfinished run
        raise after the call (``FloatingPointError``, ``SamplingError``).
    Returns:
      the sampler; ``sampler.cache_size()`` counts its compiled programs. A call may pass ``grid_options``, new
      values of the solver's grid data (its entry's ``prepared_options``: DC-Solver ``ratios``, USF ``arrays``,
      DPM-Solver-v3 ``ems``), which do not recompile when their shapes are unchanged.
    """
    compiled = _Compiled(apply_fn, schedule=schedule, solver=solver, nfe=nfe, timesteps=timesteps, mesh=mesh,
                         params_sharding=params_sharding, batch_size=batch_size, **kwargs)

    def sampler(params, x_T, key=None, *, timesteps=None, grid_options=None, **cond):
        return compiled(params, x_T, key, timesteps, cond, grid_options)

    sampler.cache_size = compiled.cache_size
    sampler.plan = compiled.plan
    return sampler


def make_sampler(model_fn: Callable, *, schedule, solver: str, nfe: int | None = None, timesteps=None,
                 mesh=None, batch_size: int | None = None, **kwargs):
    """A compiled ``fn(x_T, key=None, *, timesteps=None, **grid_options)`` for a closed-over ``model_fn(x, t)``.

    The convenient form of ``make_param_sampler``: arguments are validated now, one program is compiled per
    (batch shape, grid length); another grid of the same length (``timesteps=``), or other grid data of the same
    shapes (``grid_options``: the solver entry's ``prepared_options``, e.g. DC-Solver's ``ratios``, a USF
    search's ``arrays``), does not recompile. The model (and any params it closes over) is part of the program:
    for new params use ``make_param_sampler``.
    """
    compiled = _Compiled(lambda params, x, t: model_fn(x, t), schedule=schedule, solver=solver, nfe=nfe,
                         timesteps=timesteps, mesh=mesh, params_sharding=None, batch_size=batch_size, **kwargs)

    def fn(x_T, key=None, *, timesteps=None, **grid_options):
        return compiled(None, x_T, key, timesteps, {}, grid_options)

    fn.cache_size = compiled.cache_size
    fn.plan = compiled.plan
    return fn

