"""The solver protocol, the registry entry, and the exponential-integrator helpers every solver shares.

A solver is a pure-functional plan of exactly ``num_model_calls`` model evaluations over a time grid that is
*data*: the grid is an argument of every step (as diffrax's ``step(t0, t1, ...)`` and k-diffusion's ``sigmas``),
never closed over, so one compiled program serves every grid of the same length. ``sample`` runs a solver as
one ``jax.lax.scan`` over the iteration index i = 0 .. num_model_calls - 1:

    state          = solver.init(x_T, key, grid)
    x_eval, t_eval = solver.query(state, i, grid)         # where iteration i evaluates the model
    out            = ModelEval(eps, x0) at (x_eval, t_eval)  # one model call, both parameterisations
    state          = solver.update(state, i, grid, out)    # the solver's step (update math only, no model call)
    x_0            = solver.output(state)

``grid`` is a dict of arrays: ``grid["t"]`` the decreasing times [N+1] (or per-sample [N+1, B]) in at least
float32, plus whatever data the solver's entry ``prepare`` adds on the host (DPM-Solver-v3's coefficient tables,
DC-Solver's ratios, a USF spec's per-step choices). State is a pytree whose shapes are fixed at ``init``; every
step-dependent choice (order, warm-up, lower-order final steps) is a ``jnp.where`` on cheap scalar coefficients,
and the update itself is one linear combination of full-size arrays.

Numerics: times, lambda, step sizes and phi-functions are computed in ``coefficient_dtype(x.dtype)`` (at least
float32, float64 under x64 with a float64 state); only the final linear combination runs in the state's dtype
(``expand_like`` casts the coefficients), so a bfloat16 state never sees bfloat16 step sizes.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from dpmjax.parameterization import coefficient_dtype, expand_like

__all__ = ["Solver", "ModelEval", "SolverEntry", "Coefficients", "at_time", "coefficient_dtype", "expand_like",
           "phi_1", "phi_2", "phi_3", "check_options", "check_order", "check_flag", "safe_divisor",
           "ring_slot", "lag_to_slot", "combine", "combine_lags"]


class ModelEval(NamedTuple):
    """One model evaluation in both parameterisations (unused halves are removed by XLA)."""

    eps: jax.Array  # [B, ...]
    x0: jax.Array   # [B, ...]


class Solver(NamedTuple):
    num_model_calls: int                                       # exact NFE of the plan (static)
    init: Callable[[jax.Array, Any, dict], Any]                 # (x_T, key, grid) -> state
    query: Callable[[Any, jax.Array, dict], tuple]              # (state, i, grid) -> (x_eval, t_eval)
    update: Callable[[Any, jax.Array, dict, ModelEval], Any]    # (state, i, grid, model eval) -> state
    output: Callable[[Any], jax.Array]                          # state -> current sample
    uses: str = "eps"                                           # "eps", "x0" or "both": what the update reads


def _no_key(options: dict) -> bool:
    return False


@dataclasses.dataclass(frozen=True)
class SolverEntry:
    """A registered solver.

    Fields:
      make: ``make(schedule, num_steps, **options) -> Solver`` (static structure only: no times, no arrays).
      options: the public option names ``make`` accepts.
      steps_for_nfe: ``(nfe, **options) -> grid intervals`` that an NFE buys.
      min_nfe: ``(**options) -> smallest NFE``.
      needs_key: ``(options) -> bool``: whether a PRNG key must be given (ddim only with eta > 0).
      grid: optional host-side grid builder ``(schedule, num_steps, spacing, t_start, t_end, **options) -> times``.
      prepare: optional host-side ``(schedule, times, **options) -> dict`` of extra grid data (arrays); the
        options it consumes are not passed to ``make``.
      prepared_options: the option names ``prepare`` consumes.
      takes_tail_steps: whether ``make`` takes ``tail_steps`` (steps the driver runs after the solver's last
        step, e.g. the final step to sigma = 0), which its lower-order-final rule counts (or refuses).
      adaptive: the solver runs its own ``lax.while_loop`` (``make`` returns an ``AdaptiveSolver``).
      doc: one line for ``dpmjax solvers``.
    """

    name: str
    make: Callable[..., Any]
    options: tuple = ()
    steps_for_nfe: Callable[..., int] = lambda nfe, **_: nfe
    min_nfe: Callable[..., int] = lambda **_: 1
    needs_key: Callable[[dict], bool] = _no_key
    grid: Callable | None = None
    prepare: Callable | None = None
    prepared_options: tuple = ()
    takes_tail_steps: bool = False
    adaptive: bool = False
    doc: str = ""

    @property
    def stochastic(self) -> bool:
        """Whether the solver draws noise for some options (then ``needs_key(options)`` says when)."""
        return self.needs_key is not _no_key

    def check(self, options: dict) -> None:
        check_options(self.name, options, self.options)

    def build(self, schedule, num_steps: int, tail_steps: int = 0, **options):
        """The Solver for ``num_steps`` grid intervals (host side; validates the options)."""
        self.check(options)
        static = {k: v for k, v in options.items() if k not in self.prepared_options}
        if self.takes_tail_steps:
            static["tail_steps"] = tail_steps
        return self.make(schedule, num_steps, **static)


def check_options(solver: str, options: dict, allowed) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"solver {solver!r} got unknown option(s) {unknown}; it accepts {sorted(allowed)}")


def check_order(solver: str, order, allowed) -> int:
    if isinstance(order, bool) or order not in allowed:
        raise ValueError(f"solver {solver!r}: order must be one of {tuple(allowed)}, got {order!r}")
    return int(order)


def check_flag(solver: str, name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"solver {solver!r}: {name} must be True or False, got {value!r}")
    return value


class Coefficients(NamedTuple):
    """alpha, sigma, lambda at a time (each scalar or [B]), in the time's (coefficient) dtype."""

    t: jax.Array
    alpha: jax.Array
    sigma: jax.Array
    lam: jax.Array


def at_time(schedule, t) -> Coefficients:
    """The schedule at ``t`` in t's own dtype (the driver hands solvers times in ``coefficient_dtype``)."""
    t = jnp.asarray(t)
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


# ---------------------------------------------------------------------------------------------------------
# History ring buffers: a multistep solver keeps its last K model outputs in a [K, B, ...] buffer where the
# output of step i lives in slot i % K. Writing is one in-place dynamic update; reading multiplies every slot by
# a scalar weight (the weights of lags 0..K-1 moved to their slots), so no step copies the history. Steps write
# first and read after: XLA updates a loop-carried buffer in place only when no read of its old value is left
# to order against the write (a read of the old buffer next to the update costs a copy of the whole ring).
# ---------------------------------------------------------------------------------------------------------

def ring_slot(i, size: int):
    """The slot of step i's entry in a ring buffer of ``size``."""
    return jnp.mod(jnp.asarray(i, jnp.int32), size)


def lag_to_slot(weights, i, size: int):
    """Weights by lag ([L, ...], lag k = the entry of step i - k, L <= size) -> weights by slot ([size, ...])."""
    lags = weights.shape[0]
    i = jnp.asarray(i, jnp.int32)
    slots = jnp.mod(i - jnp.arange(lags, dtype=jnp.int32), size)                              # [L]
    onehot = (slots[:, None] == jnp.arange(size, dtype=jnp.int32)[None, :]).astype(weights.dtype)  # [L, size]
    return jnp.tensordot(onehot, weights, axes=(0, 0))


def combine(terms, weights):
    """sum_k weights[k] * terms[k]: ``terms`` a list of [B, ...] arrays or one [K, B, ...] buffer, ``weights``
    [K] or [K, B] coefficients (cast to the terms' dtype). One fused elementwise pass."""
    if isinstance(terms, (list, tuple)):
        out = expand_like(weights[0], terms[0]) * terms[0]
        for k in range(1, len(terms)):
            out = out + expand_like(weights[k], terms[k]) * terms[k]
        return out
    out = expand_like(weights[0], terms[0]) * terms[0]
    for k in range(1, terms.shape[0]):
        out = out + expand_like(weights[k], terms[k]) * terms[k]
    return out



def combine_lags(buffer, weights, i):
    """sum_k weights[k] * (ring entry of step i - k) for k < len(weights): reads only those L slots of the
    [K, B, ...] ring (each a dynamic slice that XLA fuses into the one elementwise pass)."""
    size = buffer.shape[0]
    terms = [jax.lax.dynamic_index_in_dim(buffer, ring_slot(i - k, size), 0, keepdims=False)
             for k in range(weights.shape[0])]
    return combine(terms, weights)
