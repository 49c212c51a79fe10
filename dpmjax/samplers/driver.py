"""``sample``: the one public entry that runs any registered solver as a single ``jax.lax.scan``.

Everything that is the same for all solvers lives here, once: the time grid from ``nfe`` and ``spacing``,
conversion of the model's prediction to (eps, x0), dynamic thresholding, the final step to sigma = 0 and
``denoise_to_zero``, NaN reporting, the trajectory, and validation of every argument before tracing.

Final step to sigma = 0 (``final_sigma="zero"``, diffusers' ``final_sigmas_type="zero"``, k-diffusion):
the last grid point is read as sigma = 0; the solver runs to the one before it and the last step is
x_0 = x0-prediction(x_{N-1}, t_{N-1}), i.e. a first-order step to sigma = 0 (one model call), as diffusers,
k-diffusion and DPM-Solver's ``denoise_to_zero`` do. ``denoise_to_zero=True`` keeps the whole grid and adds
that same call at t_end (+1 NFE). A grid whose last time has sigma = 0 is run the same way.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dpmjax import parameterization
from dpmjax.samplers.base import SOLVERS, ModelEval, Solver, at_time, expand_like
from dpmjax.schedules import time_grid, validate_timesteps

__all__ = ["sample", "make_sampler", "make_param_sampler", "plan"]

FINAL_SIGMAS = ("t_end", "zero")


def _solver_entry(solver: str):
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {sorted(SOLVERS)}")
    return SOLVERS[solver]


def plan(schedule, solver: str, *, nfe=None, timesteps=None, spacing: str = "time_uniform", t_start=None,
         t_end=None, final_sigma: str = "t_end", denoise_to_zero: bool = False, **solver_options):
    """Validate arguments and build the solver: returns (Solver, solver grid, final_denoise: bool).

    Runs on the host before anything is traced; every error names the argument and the allowed values.
    """
    entry = _solver_entry(solver)
    if final_sigma not in FINAL_SIGMAS:
        raise ValueError(f"final_sigma must be one of {FINAL_SIGMAS}, got {final_sigma!r}")
    if (nfe is None) == (timesteps is None):
        raise ValueError("give exactly one of nfe (with spacing) or timesteps")
    final_zero = final_sigma == "zero"
    extra_calls = int(final_zero or denoise_to_zero)
    if final_zero and denoise_to_zero:
        raise ValueError("final_sigma='zero' already ends at sigma = 0; do not also set denoise_to_zero")

    if timesteps is None:
        if not isinstance(nfe, (int, np.integer)) or isinstance(nfe, bool):
            raise ValueError(f"nfe must be an integer, got {nfe!r}")
        min_nfe = entry.min_nfe(**solver_options) + extra_calls
        if nfe < min_nfe:
            raise ValueError(f"nfe={nfe} is too small for solver {solver!r} with these options: "
                             f"it needs nfe >= {min_nfe}")
        steps = entry.steps_for_nfe(nfe - extra_calls, **solver_options)
        builder = entry.grid or (lambda sch, n, sp, ts, te, **_: time_grid(sch, n, sp, t_start=ts, t_end=te))
        grid = builder(schedule, steps + int(final_zero), spacing, t_start, t_end, **solver_options)
    else:
        if final_zero and not isinstance(timesteps, jax.core.Tracer):
            # the last point only marks the sigma = 0 end: it may be 0 even where the schedule starts at 1/N
            ends = np.asarray(timesteps, np.float64)
            validate_timesteps(schedule, ends[:-1], min_points=2)
            if ends.ndim != 1 and ends.ndim != 2 or not np.all((ends[-1] >= 0) & (ends[-1] < ends[-2])):
                raise ValueError("timesteps: with final_sigma='zero' the last point (the sigma = 0 end) must be "
                                 ">= 0 and below the one before it")
            grid = ends
        else:
            grid = validate_timesteps(schedule, timesteps, min_points=2 + int(final_zero))
        if not isinstance(grid, jax.core.Tracer):
            with jax.ensure_compile_time_eval():
                end_sigma = np.asarray(schedule.sigma(jnp.asarray(grid[-1], jnp.float32)))
            if np.all(end_sigma == 0) and not final_zero:
                final_zero = True
                extra_calls = 1
    solver_grid = grid[:-1] if final_zero else grid
    if solver_grid.shape[0] < 2:
        raise ValueError("final_sigma='zero' needs at least 3 time points (2 + the sigma = 0 end)")
    if final_zero and "_tail_steps" in entry.options:
        solver_options = {**solver_options, "_tail_steps": 1}  # the sigma = 0 step counts for lower_order_final
    if isinstance(solver_grid, jax.core.Tracer):
        grid_array = solver_grid
    else:
        with jax.ensure_compile_time_eval():  # a concrete array even while an outer jit traces
            grid_array = jnp.asarray(solver_grid)
    built = entry(schedule, grid_array, **solver_options)
    return built, solver_grid, bool(final_zero or denoise_to_zero)


def sample(model_fn: Callable, x_T, *, schedule, solver: str, nfe: int | None = None, timesteps=None,
           prediction: str = "eps", spacing: str = "time_uniform", t_start=None, t_end=None, key=None,
           return_trajectory: bool = False, final_sigma: str = "t_end", denoise_to_zero: bool = False,
           thresholding: bool = False, threshold_ratio: float = 0.995, threshold_max: float = 1.0,
           check_nan: bool = False, remat: bool = False, **solver_options):
    """Sample x_0 from x_T with a registered solver, in ``nfe`` model evaluations (counted exactly).

    Args:
      model_fn: ``model_fn(x [B, ...], t [B]) -> prediction`` in continuous time of ``schedule``.
      x_T: [B, ...] initial noise (at ``t_start``, default the schedule's start).
      schedule: a ``dpmjax.schedules`` schedule.
      solver: a name in ``dpmjax.samplers.SOLVERS``.
      nfe: number of model evaluations; with ``spacing``, ``t_start`` and ``t_end`` it builds the grid.
      timesteps: explicit decreasing times [N+1] (or per-sample [N+1, B]), endpoints included; overrides nfe.
      prediction: what ``model_fn`` returns: "eps", "x0", "v", "score" or "flow".
      spacing: "logSNR", "time_uniform", "time_quadratic", "karras", "linspace", "leading", "trailing".
      key: a ``jax.random.key`` for stochastic solvers (ddpm, ddim with eta > 0, sde_dpmpp_2m).
      return_trajectory: also return the current sample after every model call, [NFE, B, ...].
      final_sigma: "t_end" (stop at the last time) or "zero" (last step to sigma = 0).
      denoise_to_zero: after reaching t_end, return the x0-prediction there (+1 NFE).
      thresholding: Imagen dynamic thresholding of every x0-prediction (quantile ``threshold_ratio``,
        floor ``threshold_max``), for data-prediction solvers.
      check_nan: raise (with the step) if the model returns NaN/inf; off by default.
      remat: rematerialise each scan step under reverse-mode differentiation (``jax.checkpoint`` on the
        step): backprop then stores only the solver state per step, not the model's activations, and
        recomputes each step once. No effect on the value, nor on solvers with their own loop.
      **solver_options: the solver's own options (order, lower_order_final, eta, variant, ...).
    Returns:
      x_0 [B, ...] in the dtype of x_T, or (x_0, trajectory) when ``return_trajectory``.
    """
    parameterization.check_prediction(prediction)
    x_T = jnp.asarray(x_T)
    if not jnp.issubdtype(x_T.dtype, jnp.floating):
        raise ValueError(f"x_T must be a floating-point array, got dtype {x_T.dtype}")
    if x_T.ndim < 1:
        raise ValueError(f"x_T must have a batch dimension, got shape {x_T.shape}")
    built, grid, final_denoise = plan(
        schedule, solver, nfe=nfe, timesteps=timesteps, spacing=spacing, t_start=t_start, t_end=t_end,
        final_sigma=final_sigma, denoise_to_zero=denoise_to_zero, **solver_options)
    if hasattr(built, "run") and (return_trajectory or check_nan):
        raise ValueError(f"solver {solver!r} runs its own adaptive loop: return_trajectory and check_nan are not "
                         "supported (see dpmjax.samplers.adaptive.sample_adaptive for its NFE)")
    if thresholding and built.uses == "eps":
        raise ValueError(f"thresholding acts on x0-predictions; solver {solver!r} (with these options) "
                         "updates with eps only. Use a data-prediction solver (dpmpp_*, unipc, ddim, ...).")
    if _solver_entry(solver).stochastic and key is None and _needs_key(solver, solver_options):
        raise ValueError(f"solver {solver!r} is stochastic: pass key=jax.random.key(seed)")
    grid = jnp.asarray(grid, x_T.dtype) if not isinstance(grid, jax.core.Tracer) else grid
    batch = x_T.shape[0]
    if grid.ndim == 2 and grid.shape[1] != batch:
        raise ValueError(f"per-sample timesteps must have shape [N+1, {batch}], got {grid.shape}")
    _check_model(model_fn, x_T, grid, batch)

    evaluate = functools.partial(_evaluate, model_fn, schedule, prediction, thresholding, threshold_ratio,
                                 threshold_max, batch)
    return _run(built, evaluate, x_T, key, grid, final_denoise, return_trajectory, check_nan, remat)


def _needs_key(solver: str, options: dict) -> bool:
    return not (solver == "ddim" and float(options.get("eta", 0.0)) == 0.0)


def _check_model(model_fn, x_T, grid, batch):
    t0 = jnp.broadcast_to(grid[0], (batch,))
    try:
        out = jax.eval_shape(model_fn, x_T, t0)
    except Exception as err:  # noqa: BLE001 - re-raised with the context a user needs
        raise ValueError(f"model_fn failed on x_T of shape {x_T.shape} and dtype {x_T.dtype} with t of "
                         f"shape {t0.shape}: {type(err).__name__}: {err}") from err
    if not hasattr(out, "shape") or tuple(out.shape) != tuple(x_T.shape):
        raise ValueError(f"model_fn must return an array shaped like x_T {x_T.shape}, got {out}")


def _evaluate(model_fn, schedule, prediction, thresholding, ratio, max_value, batch, x, t):
    """One model call at (x, t) -> ModelEval(eps, x0) in x's dtype (a bfloat16 model is upcast)."""
    t_vec = jnp.broadcast_to(jnp.asarray(t, x.dtype), (batch,))
    out = jnp.asarray(model_fn(x, t_vec)).astype(x.dtype)
    eps = parameterization.to_eps(out, x, t_vec, schedule, prediction)
    x0 = parameterization.to_x0(out, x, t_vec, schedule, prediction)
    if thresholding:
        c = at_time(schedule, t_vec, x.dtype)
        x0 = parameterization.dynamic_threshold(x0, ratio, max_value)
        eps = (x - expand_like(c.alpha, x) * x0) / expand_like(c.sigma, x)
    return ModelEval(eps=eps, x0=x0)


def _run(built: Solver, evaluate, x_T, key, grid, final_denoise, return_trajectory, check_nan, remat=False):
    key = jax.random.key(0) if key is None else key
    if hasattr(built, "run"):  # a solver with its own (while) loop: dpm_solver_adaptive
        x, _ = built.run(evaluate, x_T, key)
        return evaluate(x, grid[-1]).x0 if final_denoise else x

    def body(carry, i):
        state, first_bad = carry
        x_eval, t_eval = built.query(state, i)
        out = evaluate(x_eval, t_eval)
        if check_nan:
            bad = ~(jnp.all(jnp.isfinite(out.eps)) & jnp.all(jnp.isfinite(out.x0)))
            first_bad = jnp.where(bad & (first_bad < 0), i, first_bad)
        state = built.update(state, i, out)
        return (state, first_bad), (built.output(state) if return_trajectory else None)

    if remat:  # prevent_cse=False is safe (and faster) inside scan, see jax.checkpoint's docs
        body = jax.checkpoint(body, prevent_cse=False)
    state = built.init(x_T, key)
    (state, first_bad), trajectory = jax.lax.scan(
        body, (state, jnp.asarray(-1, jnp.int32)), jnp.arange(built.num_model_calls, dtype=jnp.int32))
    x = built.output(state)
    if final_denoise:
        out = evaluate(x, grid[-1])
        if check_nan:
            bad = ~jnp.all(jnp.isfinite(out.x0))
            first_bad = jnp.where(bad & (first_bad < 0), built.num_model_calls, first_bad)
        x = out.x0
        if return_trajectory:
            trajectory = jnp.concatenate([trajectory, x[None]])
    if check_nan:
        jax.debug.callback(_raise_if_bad, first_bad)
    return (x, trajectory) if return_trajectory else x


def _raise_if_bad(first_bad):
    if int(first_bad) >= 0:
        raise FloatingPointError(f"model output became NaN/inf at model call {int(first_bad)} (0-based)")


def make_sampler(model_fn: Callable, *, schedule, solver: str, **kwargs) -> Callable:
    """A jitted ``fn(x_T, key=None)`` for one (model, schedule, solver, nfe): compiles once per shape.

    Arguments are validated now; ``kwargs`` are those of ``sample``.
    """
    plan(schedule, solver, **{k: v for k, v in kwargs.items() if k not in _SAMPLE_ONLY})

    @jax.jit
    def run(x_T, key=None):
        return sample(model_fn, x_T, schedule=schedule, solver=solver, key=key, **kwargs)

    return run


_SAMPLE_ONLY = ("prediction", "return_trajectory", "thresholding", "threshold_ratio", "threshold_max",
                "check_nan", "remat")


def make_param_sampler(apply_fn: Callable, *, schedule, solver: str, nfe: int | None = None, timesteps=None,
                       mesh=None, params_sharding=None, batch_size: int | None = None, **kwargs):
    """The params-as-arguments sampler: ``sampler(params, x_T, key=None, *, timesteps=None, **cond) -> x_0``.

    ``apply_fn(params, x [B, ...], t [B], **cond) -> prediction`` is the model contract shared with training and
    the methods (``dpmjax.nn.make_apply_fn``). One jitted program per (batch shape, grid length): a new
    checkpoint, an EMA swap, or another ``timesteps`` grid of the same length runs without recompiling.

    Args:
      mesh: a ``jax.sharding.Mesh`` with a "data" axis (``dpmjax.sharding.make_mesh``): x_T, cond and the output
        are split over it, params placed by ``params_sharding`` (default replicated).
      batch_size: the compiled batch; a larger x_T runs in chunks of it, a smaller (or the last partial) chunk
        is padded and sliced. Default: the batch of x_T, padded to a multiple of the data axis.
      kwargs: those of ``sample`` (prediction, spacing, final_sigma, solver options, check_nan, ...).
    """
    from dpmjax import sharding

    built, grid, _ = plan(schedule, solver, nfe=nfe, timesteps=timesteps,
                          **{k: v for k, v in kwargs.items() if k not in _SAMPLE_ONLY})
    default_grid = np.asarray(timesteps if timesteps is not None else _full_grid(schedule, solver, nfe, kwargs))
    needs_key = _solver_entry(solver).stochastic and _needs_key(solver, kwargs)
    shards = 1 if mesh is None else sharding.data_axis_size(mesh)
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1 or batch_size % shards):
        raise ValueError(f"batch_size must be a positive multiple of the mesh's data axis ({shards}), "
                         f"got {batch_size!r}")

    def run(params, x_T, key, grid, cond):
        def model_fn(x, t):
            return apply_fn(params, x, t, **cond)
        return sample(model_fn, x_T, schedule=schedule, solver=solver, timesteps=grid, key=key, **kwargs)

    if mesh is None:
        jitted = jax.jit(run)
    else:
        data, repl = sharding.data_sharding(mesh), sharding.replicated(mesh)
        jitted = jax.jit(run, in_shardings=(params_sharding or repl, data, repl, repl, data), out_shardings=data)

    def sampler(params, x_T, key=None, *, timesteps=None, **cond):
        if needs_key and key is None:
            raise ValueError(f"solver {solver!r} is stochastic: pass key=jax.random.key(seed)")
        grid = default_grid if timesteps is None else np.asarray(timesteps)
        if grid.shape[0] != default_grid.shape[0]:
            raise ValueError(f"timesteps: this sampler was built for {default_grid.shape[0]} time points, got "
                             f"{grid.shape[0]} (build another sampler for another grid length)")
        x_T = jnp.asarray(x_T)
        total = x_T.shape[0]
        chunk = batch_size or -(-total // shards) * shards
        key = jax.random.key(0) if key is None else key
        out = []
        for c, start in enumerate(range(0, total, chunk)):
            size = min(chunk, total - start)
            part = [sharding.pad_to_multiple(v[start:start + size], chunk)[0] for v in (x_T,)]
            part_cond = {k: sharding.pad_to_multiple(jnp.asarray(v)[start:start + size], chunk)[0]
                         for k, v in cond.items()}
            chunk_key = key if c == 0 else jax.random.fold_in(key, c)
            out.append(jitted(params, part[0], chunk_key, grid, part_cond)[:size])
        return out[0] if len(out) == 1 else jnp.concatenate(out)

    sampler.jitted = jitted
    return sampler


def _full_grid(schedule, solver, nfe, kwargs):
    """The grid ``sample`` builds for ``nfe`` (final sigma = 0 end included), to pass back as ``timesteps``."""
    options = {k: v for k, v in kwargs.items() if k not in _SAMPLE_ONLY}
    entry = _solver_entry(solver)
    final_sigma = options.pop("final_sigma", "t_end")
    extra = int(final_sigma == "zero" or options.pop("denoise_to_zero", False))
    spacing = options.pop("spacing", "time_uniform")
    t_start, t_end = options.pop("t_start", None), options.pop("t_end", None)
    steps = entry.steps_for_nfe(nfe - extra, **options)
    builder = entry.grid or (lambda sch, n, sp, ts, te, **_: time_grid(sch, n, sp, t_start=ts, t_end=te))
    grid = builder(schedule, steps + int(final_sigma == "zero"), spacing, t_start, t_end, **options)
    return grid
