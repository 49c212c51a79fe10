"""Gradients of a loss on generated samples w.r.t. x_T, the conditioning and the model params (AdjointDPM).

AdjointDPM (Pan, Liew, Tan, Feng, Yan; ICLR 2024, arXiv 2307.10711) differentiates L(x_0) with
x_0 = Phi_theta(x_T, c) the probability-flow ODE map by the adjoint sensitivity method (Chen et al. 2018):
in the exponential-integrator variables y = x/alpha, rho = sigma/alpha the forward ODE is
dy/drho = eps_theta(alpha y, t(rho), c) (paper eq. 6) and the augmented state [y, a_y, a_theta] with

    d a_y / d rho = -a_y^T d eps/d y,      d a_theta / d rho = -a_y^T d eps/d theta      (paper eq. 7-8)

is solved from rho_0 back to rho_T, starting from a_y(rho_0) = alpha_0 dL/dx_0; then dL/dx_T = a_y(rho_T)/alpha_T
and dL/dtheta = a_theta(rho_T) (theta = params or conditioning). Three interchangeable methods:

  "backsolve"   diffrax ``BacksolveAdjoint`` on that ODE: the paper's continuous adjoint. Memory does not grow
                with the number of steps; the gradient is approximate (the backward re-solve of y is not the
                forward trajectory; error ~ the solver's error, both directions).
  "checkpoint"  diffrax ``RecursiveCheckpointAdjoint`` on the same ODE: the exact gradient of the forward
                discretisation (discretise-then-optimise), binomial checkpointing (memory ~ log of max_steps).
  "scan"        plain backprop through ``dpmjax.sample`` (any registered solver at a fixed NFE) with
                ``remat=True``: each step is recomputed in the backward pass, so memory per step is the
                solver state only (linear in NFE, but with no activations).

Departures from the official code: it wraps ``torchdiffeq.odeint_adjoint`` around a shifted/scaled rho; here
rho itself is the ODE time and diffrax provides the adjoint. Errors that the official code leaves silent
(non-scalar loss, NaN gradients, tolerances not met within max_steps) are raised with their cause.
"""
from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dpmjax import parameterization
from dpmjax.adjoint import rho_ode
from dpmjax.samplers import SOLVERS
from dpmjax.samplers.driver import sample

__all__ = ["METHODS", "INPUTS", "value_and_grad_through_sampling", "generate"]

METHODS = ("backsolve", "checkpoint", "scan")
INPUTS = ("x_T", "cond", "params")


def _normalise_wrt(wrt, cond) -> tuple[str, ...]:
    if cond is not None and not isinstance(cond, Mapping):
        raise ValueError(f"cond must be a dict of keyword arrays for apply_fn(params, x, t, **cond) (e.g. "
                         f"{{'y': labels}}) or None, got {type(cond).__name__}")
    names = (wrt,) if isinstance(wrt, str) else tuple(wrt)
    if not names:
        raise ValueError(f"wrt must name at least one of {INPUTS}")
    bad = [n for n in names if n not in INPUTS]
    if bad or len(set(names)) != len(names):
        raise ValueError(f"wrt must be distinct names from {INPUTS}, got {wrt!r}")
    if "cond" in names:
        leaves = jax.tree.leaves(cond)
        if cond is None or not leaves:
            raise ValueError("wrt contains 'cond' but cond is None: pass the conditioning to differentiate")
        if not all(jnp.issubdtype(jnp.result_type(leaf), jnp.inexact) for leaf in leaves):
            raise ValueError("wrt contains 'cond' but cond has non-floating leaves (e.g. integer class labels): "
                             "differentiate a floating embedding instead")
    return names


def _plan(method, schedule, num_steps, solver, rtol, atol, spacing, t_start, t_end, solver_options):
    """Validate every option on the host; returns what ``generate`` needs for the method."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "scan":
        if rtol is not None or atol is not None:
            raise ValueError("method='scan' runs a fixed number of model calls: rtol/atol apply only to the "
                             "ODE methods 'backsolve' and 'checkpoint'")
        solver = "dpmpp_2m" if solver is None else solver
        if not isinstance(solver, str) or solver not in SOLVERS:
            raise ValueError(f"solver for method='scan' must be one of {sorted(SOLVERS)}, got {solver!r}")
        if not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool) or num_steps < 1:
            raise ValueError(f"num_steps (the NFE for method='scan') must be a positive integer, got {num_steps!r}")
        return solver, None
    if solver_options:
        raise ValueError("solver_options apply only to method='scan' (a dpmjax solver's own options)")
    adaptive = rtol is not None or atol is not None
    if adaptive:
        rtol = atol if rtol is None else rtol
        atol = rtol if atol is None else atol
        if not (float(rtol) > 0 and float(atol) > 0):
            raise ValueError(f"rtol and atol must be positive, got rtol={rtol}, atol={atol}")
    elif not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer for a fixed-grid solve, got {num_steps!r}")
    grid = rho_ode.rho_grid(schedule, num_steps=num_steps, spacing=spacing, t_start=t_start, t_end=t_end,
                            adaptive=adaptive)
    return rho_ode.make_ode_solver(solver, adaptive), (grid, rtol, atol)


def generate(apply_fn: Callable, params, x_T, cond=None, *, schedule, method: str = "backsolve",
             num_steps: int | None = 20, solver=None, rtol: float | None = None, atol: float | None = None,
             max_steps: int = 4096, spacing: str = "logSNR", t_start=None, t_end=None, prediction: str = "eps",
             checkpoints: int | None = None, key=None, solver_options: dict | None = None,
             frozen: tuple[bool, bool] = (False, False)):
    """x_0 from x_T by the probability-flow ODE, differentiable by ``jax.grad`` with the chosen ``method``.

    Arguments are those of ``value_and_grad_through_sampling``; ``frozen`` = (params, cond) flags for inputs
    that will not be differentiated (their cotangents are then never computed). Returns (x_0, status), status a
    dict of scalars: ``ok`` (the forward solve succeeded), ``result`` (diffrax result code), ``num_steps``
    (solver steps taken). Any ``jax.grad``/``jax.vjp`` of a function of x_0 gets the method's gradient and memory
    behaviour; ``value_and_grad_through_sampling`` adds the failure and NaN checks on top.
    """
    parameterization.check_prediction(prediction)
    solver, ode = _plan(method, schedule, num_steps, solver, rtol, atol, spacing, t_start, t_end, solver_options)
    x_T = jnp.asarray(x_T)
    if not jnp.issubdtype(x_T.dtype, jnp.floating) or x_T.ndim < 1:
        raise ValueError(f"x_T must be a floating array with a batch dimension, got {x_T.dtype} {x_T.shape}")
    if method == "scan":
        frozen_params = jax.lax.stop_gradient(params) if frozen[0] else params
        frozen_cond = jax.lax.stop_gradient(cond) if frozen[1] else cond

        def scan_model(x, t):
            return apply_fn(frozen_params, x, t, **(frozen_cond or {}))

        x_0 = sample(scan_model, x_T, schedule=schedule, solver=solver, nfe=int(num_steps), prediction=prediction,
                     spacing=spacing, t_start=t_start, t_end=t_end, key=key, remat=True, **(solver_options or {}))
        status = {"ok": jnp.asarray(True), "result": jnp.asarray(0, jnp.int32),
                  "num_steps": jnp.asarray(num_steps, jnp.int32)}
        return x_0, status
    grid, rtol, atol = ode
    if not isinstance(max_steps, (int, np.integer)) or max_steps < 1:
        raise ValueError(f"max_steps must be a positive integer, got {max_steps!r}")
    vector_field = rho_ode.rho_vector_field(apply_fn, schedule, prediction, frozen)
    y0 = x_T / jnp.asarray(grid.alpha_start, x_T.dtype)
    y_end, status = rho_ode.solve_rho_ode(vector_field, y0, (params, cond), grid, solver=solver, method=method,
                                          rtol=rtol, atol=atol, max_steps=int(max_steps), checkpoints=checkpoints)
    return jnp.asarray(grid.alpha_end, x_T.dtype) * y_end, status


def value_and_grad_through_sampling(
        loss_fn: Callable, apply_fn: Callable, params, x_T, cond=None, *, schedule, method: str = "backsolve",
        wrt=("x_T",), num_steps: int | None = 20, solver=None, rtol: float | None = None,
        atol: float | None = None, max_steps: int = 4096, spacing: str = "logSNR", t_start=None, t_end=None,
        prediction: str = "eps", has_aux: bool = False, check_finite: bool = True, checkpoints: int | None = None,
        key=None, solver_options: dict | None = None):
    """L(x_0) for x_0 sampled from x_T by the probability-flow ODE, and dL/d{x_T, cond, params} (AdjointDPM).

    Not jitted: wrap the call in ``jax.jit`` (closing over ``loss_fn``, ``apply_fn`` and the options) for
    speed; it works under ``jit`` and ``vmap``.

    Args:
      loss_fn: ``loss_fn(x_0 [B, ...]) -> scalar`` (or ``(scalar, aux)`` with ``has_aux``).
      apply_fn: ``apply_fn(params, x [B, ...], t [B], **cond) -> prediction`` in continuous time of ``schedule``
        (the library's model contract, ``dpmjax.nn.make_apply_fn``); params and cond enter explicitly so that
        every method can differentiate them.
      params: the model's parameters (any pytree), cond: the conditioning, a dict of keyword arrays (e.g.
        ``{"embedding": e}``) or None.
      x_T: [B, ...] initial noise at ``t_start``.
      schedule: a ``dpmjax.schedules`` schedule.
      method: "backsolve" (continuous adjoint, flat memory), "checkpoint" (exact gradient of the discretised
        ODE) or "scan" (backprop through ``dpmjax.sample`` with rematerialised steps).
      wrt: names to differentiate, from ("x_T", "cond", "params") (a str or a tuple).
      num_steps: ODE methods: number of fixed-grid solver steps (each costs the solver's stages: euler 1,
        heun 2, ...) when rtol/atol are None; method="scan": the NFE of the dpmjax solver.
      solver: ODE methods: a name in ``rho_ode.ODE_SOLVERS`` or a diffrax solver (default heun on a fixed
        grid, tsit5 adaptive); "scan": a name in ``dpmjax.SOLVERS`` (default "dpmpp_2m").
      rtol, atol: ODE methods only: adaptive PID step control in rho (one given -> the other equals it).
      max_steps: step budget of an adaptive solve (a fixed grid uses exactly num_steps).
      spacing: time spacing of the fixed grid (``dpmjax.time_grid``); "logSNR" is geometric in rho.
      t_start, t_end: the sampling interval (default the schedule's); sigma(t_end) must be > 0.
      prediction: what apply_fn returns ("eps", "x0", "v", "score", "flow").
      has_aux: ``loss_fn`` returns (loss, aux).
      check_finite: raise if the loss or a gradient is NaN/inf (one host callback under jit).
      checkpoints: "checkpoint" only: number of diffrax checkpoints (default: chosen from max_steps).
      key: "scan" with a stochastic solver only.
      solver_options: "scan" only: the dpmjax solver's own options (e.g. {"order": 3}).
    Returns:
      (loss, grads) or ((loss, aux), grads) with ``grads`` a dict {name: gradient} for the names in ``wrt``.
    Raises:
      ValueError on bad options or a non-scalar loss (at trace time); RuntimeError when the forward ODE solve
      fails (diffrax's reason, the steps taken, the rho interval); FloatingPointError on non-finite
      loss/gradients, naming the inputs and the likely cause. Under ``jit`` these arrive wrapped in JAX's
      runtime error with the same message.
    """
    names = _normalise_wrt(wrt, cond)
    frozen = ("params" not in names, "cond" not in names)
    options = dict(schedule=schedule, method=method, num_steps=num_steps, solver=solver, rtol=rtol, atol=atol,
                   max_steps=max_steps, spacing=spacing, t_start=t_start, t_end=t_end, prediction=prediction,
                   checkpoints=checkpoints, key=key, solver_options=solver_options, frozen=frozen)
    _, ode = _plan(method, schedule, num_steps, solver, rtol, atol, spacing, t_start, t_end, solver_options)
    inputs = {"x_T": x_T, "cond": cond, "params": params}

    def objective(diff):
        merged = {**inputs, **diff}
        x_0, status = generate(apply_fn, merged["params"], merged["x_T"], merged["cond"], **options)
        out = loss_fn(x_0)
        loss, aux = out if has_aux else (out, None)
        loss = jnp.asarray(loss)
        if loss.shape != () or not jnp.issubdtype(loss.dtype, jnp.floating):
            raise ValueError(f"loss_fn must return a real scalar{' (as the first of (loss, aux))' if has_aux else ''}"
                             f", got shape {loss.shape} dtype {loss.dtype}: reduce it (e.g. jnp.mean) first")
        status["x0_finite"] = jnp.all(jnp.isfinite(x_0))
        return loss, (aux, status)

    loss, backward, (aux, status) = jax.vjp(objective, {n: inputs[n] for n in names}, has_aux=True)
    context = (method, rho_ode.describe(ode[0], ode[1], ode[2], max_steps) if ode else
               f"{num_steps} model calls of {solver or 'dpmpp_2m'}")
    forward = (status["ok"], status["result"], status["num_steps"], status["x0_finite"], loss)
    if not any(isinstance(v, jax.core.Tracer) for v in forward):
        _report(context, check_finite, *forward, {})  # eager: a failed forward solve raises before the backward
    (grads,) = backward(jnp.ones_like(loss))
    finite = {n: _all_finite(grads[n]) for n in names} if check_finite else {}
    _report(context, check_finite, *forward, finite)
    return ((loss, aux) if has_aux else loss), grads


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _report(context, check_finite, ok, result, num_steps, x0_finite, loss, finite: dict):
    """Raise on the host (directly when values are concrete, through ``jax.debug.callback`` under tracing)."""
    names = tuple(finite)

    def check(ok, result, num_steps, x0_finite, loss, *finite_flags):
        method, where = context
        ok, result, num_steps = np.asarray(ok), np.asarray(result), np.asarray(num_steps)
        if not np.all(ok):
            code = int(result.reshape(-1)[np.argmin(ok.reshape(-1))])
            raise RuntimeError(
                f"method={method!r}: the forward probability-flow ODE solve failed after "
                f"{int(np.max(num_steps))} steps, integrating {where}: {rho_ode.failure_message(code)} "
                "Loosen rtol/atol or raise max_steps.")
        if not check_finite:
            return
        if not np.all(np.asarray(x0_finite)):
            raise FloatingPointError(f"method={method!r}: the generated x_0 is not finite (NaN/inf from the model "
                                     f"in the forward pass), {where}")
        if not np.all(np.isfinite(np.asarray(loss))):
            raise FloatingPointError(f"method={method!r}: loss_fn returned a non-finite value on a finite x_0")
        bad = [n for n, flag in zip(names, finite_flags) if not np.all(np.asarray(flag))]
        if bad:
            cause = ("the backward adjoint solve (BacksolveAdjoint) most likely failed: it hit the step budget or "
                     "met NaN in the model's VJP (diffrax does not report where its backward solve stopped); raise "
                     "max_steps, loosen rtol/atol, or use method='checkpoint'" if method == "backsolve" else
                     "NaN/inf came from the model's or the loss's derivative (e.g. sqrt or log at 0)")
            raise FloatingPointError(f"method={method!r}: the gradient w.r.t. {', '.join(bad)} is not finite although "
                                     f"the forward solve and the loss are; {cause}. ({where})")

    values = (ok, result, num_steps, x0_finite, loss) + tuple(finite[n] for n in names)
    if any(isinstance(v, jax.core.Tracer) for v in values):
        jax.debug.callback(check, *values)
    else:
        check(*values)
