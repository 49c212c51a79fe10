"""The probability-flow ODE in AdjointDPM's exponential-integrator variables, solved with diffrax.

With y = x / alpha_t and rho = sigma_t / alpha_t = e^{-lambda_t} (AdjointDPM, Pan et al. ICLR 2024, eq. 6;
DPM-Solver eq. 3.4 after the change of variables) the probability-flow ODE loses its linear drift:

    dy/drho = eps_theta(alpha(rho) y, t(rho), c),       t(rho) = t_of_lambda(-log rho),

integrated from rho_T = rho(t_start) down to rho_0 = rho(t_end); x_0 = alpha(t_end) y(rho_0). Euler on a rho
grid is exactly DDIM on the same time grid. Gradients come from a diffrax adjoint: ``BacksolveAdjoint``
(the paper's continuous adjoint: the augmented state [y, a_y, a_theta] is solved backwards in the same rho
variables, so memory does not grow with the number of steps) or ``RecursiveCheckpointAdjoint``
(discretise-then-optimise with binomial checkpointing: the exact gradient of the forward discretisation).

Steps: a fixed grid of ``num_steps`` intervals (``spacing`` of ``dpmjax.time_grid``, mapped to rho; the
default "logSNR" is geometric in rho) when ``rtol``/``atol`` are None, else an adaptive PID-controlled
solve. Differentiable inputs (x_T via y0, and the model params / conditioning via diffrax ``args``) follow
diffrax's rule that ``BacksolveAdjoint`` can only differentiate ``y0`` and ``args``, never closed-over arrays.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from dpmjax import parameterization
from dpmjax.schedules import SPACINGS, time_grid

__all__ = ["ODE_SOLVERS", "RhoGrid", "rho_grid", "rho_vector_field", "make_ode_solver", "solve_rho_ode",
           "failure_message"]

ODE_SOLVERS = {
    "euler": diffrax.Euler, "heun": diffrax.Heun, "midpoint": diffrax.Midpoint, "ralston": diffrax.Ralston,
    "bosh3": diffrax.Bosh3, "tsit5": diffrax.Tsit5, "dopri5": diffrax.Dopri5, "dopri8": diffrax.Dopri8,
}


@dataclasses.dataclass(frozen=True)
class RhoGrid:
    """Where the solve runs, computed on the host in float64 before anything is traced.

    rho: [N+1] decreasing rho values of a fixed grid (None for an adaptive solve).
    """

    rho_start: float
    rho_end: float
    alpha_start: float
    alpha_end: float
    rho: np.ndarray | None


def rho_grid(schedule, *, num_steps: int | None, spacing: str, t_start=None, t_end=None,
             adaptive: bool) -> RhoGrid:
    """The rho interval (and the fixed grid unless ``adaptive``) for sampling from t_start to t_end."""
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    t_start = schedule.default_t_start if t_start is None else float(t_start)
    t_end = schedule.default_t_end if t_end is None else float(t_end)
    with jax.ensure_compile_time_eval(), jax.default_device(jax.local_devices(backend="cpu")[0]), jax.enable_x64(True):
        if adaptive:
            schedule.check_times(np.array([t_start, t_end]), name="t_start/t_end")
            if not t_start > t_end:
                raise ValueError(f"t_start must be greater than t_end, got t_start={t_start}, t_end={t_end}")
            times = np.array([t_start, t_end])
        else:
            times = time_grid(schedule, num_steps, spacing, t_start=t_start, t_end=t_end)
        rho = np.exp(-np.asarray(schedule.lambda_(jnp.asarray(times, jnp.float64)), np.float64))
        alphas = np.asarray(schedule.alpha(jnp.asarray(times[[0, -1]], jnp.float64)), np.float64)
    if not np.all(np.isfinite(rho)) or np.any(rho <= 0) or np.any(np.diff(rho) >= 0):
        raise ValueError(f"the times from t_start={times[0]} to t_end={times[-1]} do not give a strictly decreasing "
                         f"positive rho = sigma/alpha (got {rho}); sigma = 0 ends are not supported")
    return RhoGrid(float(rho[0]), float(rho[-1]), float(alphas[0]), float(alphas[-1]),
                   None if adaptive else rho)


def rho_vector_field(apply_fn: Callable, schedule, prediction: str, frozen: tuple[bool, bool]) -> Callable:
    """f(rho, y, args=(params, cond)) = eps(alpha(rho) y, t(rho), **cond): the right-hand side of dy/drho.

    ``apply_fn(params, x, t, **cond)`` is the library's model contract; ``cond`` a dict of keyword arrays or None.

    ``frozen`` marks (params, cond) that are not differentiated: they pass through ``lax.stop_gradient`` so
    the adjoint's VJP never computes their cotangents (diffrax still carries a zero adjoint for every
    floating ``arg``, but no weight-gradient work is done).
    """
    def vector_field(rho, y, args):
        params, cond = args
        params = jax.lax.stop_gradient(params) if frozen[0] else params
        cond = jax.lax.stop_gradient(cond) if frozen[1] else cond
        t = schedule.t_of_lambda(-jnp.log(rho))
        alpha = schedule.alpha(t).astype(y.dtype)
        x = alpha * y
        t_vec = jnp.broadcast_to(t, y.shape[:1]).astype(y.dtype)
        out = jnp.asarray(apply_fn(params, x, t_vec, **(cond or {}))).astype(y.dtype)
        return parameterization.to_eps(out, x, t_vec, schedule, prediction)

    return vector_field


def make_ode_solver(solver, adaptive: bool) -> diffrax.AbstractSolver:
    """A diffrax solver from a name in ``ODE_SOLVERS`` or an instance; adaptive solves need an error estimate."""
    if solver is None:
        solver = "tsit5" if adaptive else "heun"
    if isinstance(solver, str):
        if solver not in ODE_SOLVERS:
            raise ValueError(f"solver for the ODE methods must be one of {sorted(ODE_SOLVERS)} or a diffrax "
                             f"solver instance, got {solver!r}")
        solver = ODE_SOLVERS[solver]()
    if not isinstance(solver, diffrax.AbstractSolver):
        raise ValueError(f"solver must be a name in {sorted(ODE_SOLVERS)} or a diffrax solver, got {solver!r}")
    if adaptive and not isinstance(solver, diffrax.AbstractAdaptiveSolver):
        raise ValueError(f"solver {type(solver).__name__} has no error estimate, so rtol/atol cannot be used: "
                         "give a fixed grid (rtol=atol=None, num_steps=N) or an embedded solver "
                         "(heun, bosh3, tsit5, dopri5, dopri8)")
    return solver


def solve_rho_ode(vector_field: Callable, y0, args, grid: RhoGrid, *, solver: diffrax.AbstractSolver,
                  method: str, rtol, atol, max_steps: int, checkpoints: int | None = None):
    """Solve dy/drho = f from rho_start to rho_end; returns (y(rho_end), status) with status a dict of
    scalars: ``ok`` (bool), ``result`` (diffrax result code), ``num_steps`` (accepted + rejected).

    The forward solve never throws (``throw=False``): the caller turns ``status`` into an error that names
    the cause. The backward solve of "backsolve" does not throw either; if it fails its output is inf and
    the caller reports the non-finite gradient.
    """
    dtype = y0.dtype
    term = diffrax.ODETerm(vector_field)
    if grid.rho is None:
        controller = diffrax.PIDController(rtol=rtol, atol=atol)
        backward_controller = controller
        dt0 = None
        steps_cap = max_steps
    else:
        rho = jnp.asarray(grid.rho, dtype)
        controller = diffrax.StepTo(ts=rho)
        # The backward solve walks the grid the other way. diffrax hands BacksolveAdjoint's backward solve times
        # in its internal coordinates, which for a decreasing (t1 < t0) forward solve are negated: -rho.
        backward_controller = diffrax.StepTo(ts=-rho[::-1])
        dt0 = None
        steps_cap = int(grid.rho.shape[0] - 1)
    if method == "backsolve":
        adjoint = diffrax.BacksolveAdjoint(solver=solver, stepsize_controller=backward_controller, throw=False)
    elif method == "checkpoint":
        adjoint = diffrax.RecursiveCheckpointAdjoint(checkpoints=checkpoints)
    else:
        raise ValueError(f"unknown ODE adjoint method {method!r}")
    sol = diffrax.diffeqsolve(
        term, solver, t0=jnp.asarray(grid.rho_start, dtype), t1=jnp.asarray(grid.rho_end, dtype), dt0=dt0,
        y0=y0, args=args, stepsize_controller=controller, adjoint=adjoint, max_steps=steps_cap,
        saveat=diffrax.SaveAt(t1=True), throw=False)
    status = {"ok": diffrax.is_successful(sol.result), "result": sol.result._value,
              "num_steps": sol.stats["num_steps"]}
    return sol.ys[-1], status


def failure_message(result_code: int) -> str:
    """diffrax's own text for a result code (e.g. 'The maximum number of solver steps was reached...')."""
    try:
        return str(diffrax.RESULTS._index_to_message[int(result_code)])
    except (AttributeError, IndexError, KeyError, TypeError):  # private table moved: fall back to the code
        return f"diffrax result code {int(result_code)}"


def describe(grid: RhoGrid, rtol: Any, atol: Any, max_steps: int) -> str:
    steps = ("adaptive, rtol=%g, atol=%g, max_steps=%d" % (rtol, atol, max_steps) if grid.rho is None
             else f"fixed grid of {grid.rho.shape[0] - 1} steps")
    return f"rho from {grid.rho_start:.4g} to {grid.rho_end:.4g} ({steps})"
