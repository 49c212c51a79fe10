"""The solver protocol, the registry, and the exponential-integrator helpers every solver shares.

A solver is a pure-functional plan of exactly ``num_model_calls`` model evaluations. ``sample`` runs it as
one ``jax.lax.scan`` over the iteration index i = 0 .. num_model_calls - 1:

    x_eval, t_eval = solver.query(state, i)          # where iteration i evaluates the model
    out            = ModelEval(eps, x0) at (x_eval, t_eval)   # one model call, both parameterisations
    state          = solver.update(state, i, out)    # the solver's step (update math only, no model call)
    x_0            = solver.output(state)

State is a pytree whose shapes are fixed at ``init``; every step-dependent choice (order, warm-up,
lower-order final steps) is a ``jnp.where`` on cheap coefficients, never a host round-trip.
A factory ``make(schedule, timesteps, **options) -> Solver`` closes over the grid (a [N+1] or per-sample
[N+1, B] array of decreasing times) and the options; ``steps_for_nfe`` says how many grid intervals a
given NFE buys.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from dpmjax.parameterization import expand_like

__all__ = ["Solver", "ModelEval", "SolverEntry", "SOLVERS", "register", "expand_like", "at_time",
           "phi_1", "phi_2", "phi_3", "check_options"]


class ModelEval(NamedTuple):
    """One model evaluation in both parameterisations (unused halves are removed by XLA)."""

    eps: jax.Array  # [B, ...]
    x0: jax.Array   # [B, ...]


class Solver(NamedTuple):
    num_model_calls: int                                # exact NFE of the plan (static)
    init: Callable[[jax.Array, Any], Any]               # (x_T, key) -> state
    query: Callable[[Any, jax.Array], tuple]            # (state, i) -> (x_eval, t_eval)
    update: Callable[[Any, jax.Array, ModelEval], Any]  # (state, i, model eval) -> state
    output: Callable[[Any], jax.Array]                  # state -> current sample
    uses: str = "eps"                                   # "eps", "x0" or "both": what the update reads


@dataclasses.dataclass(frozen=True)
class SolverEntry:
    """A registered solver: its factory, how many grid intervals an NFE buys, and its minimum NFE."""

    name: str
    make: Callable[..., Solver]
    steps_for_nfe: Callable[..., int]
    min_nfe: Callable[..., int]
    options: tuple  # names of the options ``make`` accepts
    stochastic: bool = False
    grid: Callable | None = None  # optional custom grid builder (schedule, nfe, spacing, t_start, t_end, opts)

    def __call__(self, schedule, timesteps, **options) -> Solver:
        check_options(self.name, options, self.options)
        return self.make(schedule, timesteps, **options)


SOLVERS: dict[str, SolverEntry] = {}


def register(name: str, *, options=(), steps_for_nfe=None, min_nfe=None, stochastic=False, grid=None):
    """Decorator adding a factory to ``SOLVERS`` under ``name``."""
    def wrap(make):
        SOLVERS[name] = SolverEntry(
            name=name, make=make, options=tuple(options),
            steps_for_nfe=steps_for_nfe or (lambda nfe, **_: nfe),
            min_nfe=min_nfe or (lambda **_: 1), stochastic=stochastic, grid=grid)
        return make
    return wrap


def check_options(solver: str, options: dict, allowed) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        public = sorted(name for name in allowed if not name.startswith("_"))
        raise ValueError(f"solver {solver!r} got unknown option(s) {unknown}; it accepts {public}")


def check_order(solver: str, order, allowed) -> int:
    if order not in allowed:
        raise ValueError(f"solver {solver!r}: order must be one of {tuple(allowed)}, got {order!r}")
    return int(order)


class Coefficients(NamedTuple):
    """alpha, sigma, lambda at a time (each scalar or [B])."""

    t: jax.Array
    alpha: jax.Array
    sigma: jax.Array
    lam: jax.Array


def at_time(schedule, t, dtype) -> Coefficients:
    t = jnp.asarray(t, dtype)
    log_alpha, log_sigma = schedule.log_alpha(t), schedule.log_sigma(t)
    return Coefficients(t, jnp.exp(log_alpha), jnp.exp(log_sigma), log_alpha - log_sigma)


# phi-functions of the exponential integrators (DPM-Solver++ App. B): phi_1(h) = (e^h - 1)/h, ...
# They are written as "h * phi" forms with expm1 for accuracy at small h.

def phi_1(h):
    """expm1(h) = h phi_1(h)."""
    return jnp.expm1(h)


def phi_2(h):
    """expm1(h)/h - 1 = h phi_2(h)."""
    return jnp.expm1(h) / h - 1.0


def phi_3(h):
    """(expm1(h)/h - 1)/h - 1/2 = h phi_3(h)."""
    return phi_2(h) / h - 0.5


def safe_divisor(d, use):
    """``d`` where ``use`` holds, 1 elsewhere: keeps unselected branches of a ``jnp.where`` finite (and their
    gradients free of NaN)."""
    return jnp.where(use, d, jnp.ones_like(d))
