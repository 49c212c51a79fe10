"""Adaptive step-size DPM-Solver: DPM-Solver-12 (order 2) and DPM-Solver-23 (order 3) (Lu et al. 2022a, Sec. 4.2
and Alg. 6), in noise ("dpmsolver") or data ("dpmsolver++", the official default) prediction.

Each trial from s with a step h in lambda (t = lambda^{-1}(lambda_s + h)) runs a lower-order and a higher-order
singlestep solver that share their model calls (``dpm_solver_singlestep``):
  order 2: x_low = DPM-Solver-1, x_high = DPM-Solver-2 (r_1 = 1/2)                     -> 2 model calls;
  order 3: x_low = DPM-Solver-2 (r_1 = 1/3), x_high = DPM-Solver-3 (r_1 = 1/3, r_2 = 2/3) -> 3 model calls.
Error control (Jolicoeur-Martineau et al. 2021, as the official code):
  delta = max(atol, rtol max(|x_low|, |x_prev|)),  E = max over the batch of RMS((x_high - x_low)/delta);
  accept if E <= 1 (x <- x_high, x_prev <- x_low, s <- t);  h <- min(theta h E^{-1/order}, lambda_end - lambda_s);
  NFE += order for every trial, accepted or not; stop when |s - t_end| <= t_err.
One step size and one time for the whole batch (as the official code).

Running it. The loop is a ``jax.lax.while_loop`` (its trip count is data-dependent), so the factory returns an
``AdaptiveSolver`` with a ``run(evaluate, x_T, key, grid) -> (x, AdaptiveInfo)`` field that ``sample`` calls
instead of its scan; ``num_model_calls`` is the static cap ``max_nfe`` (the loop stops before a trial would
pass it; ``AdaptiveInfo.finished`` says whether t_end was reached). Through ``sample`` only the start and end
of the grid are used: pass ``nfe`` (any value >= 1; it does not limit the loop, ``max_nfe`` does) or
``timesteps=[t_start, t_end]``. ``sample_adaptive`` returns the sample and the ``AdaptiveInfo`` (real NFE).
Not supported: ``return_trajectory``, ``check_nan``, ``final_sigma="zero"`` (use ``denoise_to_zero=True``),
per-sample time grids, and reverse-mode gradients (``while_loop``; forward mode works).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dpmjax.samplers.base import at_time, check_order
from dpmjax.samplers.dpm_solver_singlestep import SOLVER_TYPES, first_order_update, second_order_update, \
    third_order_stage, third_order_update

__all__ = ["AdaptiveSolver", "AdaptiveInfo", "make_adaptive", "sample_adaptive", "ALGORITHMS"]

ALGORITHMS = ("dpmsolver", "dpmsolver++")


class AdaptiveInfo(NamedTuple):
    nfe: jax.Array           # int32 []: model calls made (every trial's, accepted or rejected)
    num_accepted: jax.Array  # int32 []
    num_rejected: jax.Array  # int32 []
    t_final: jax.Array       # []: the time reached
    finished: jax.Array      # bool []: |t_final - t_end| <= t_err (False if max_nfe stopped the loop)


class AdaptiveSolver(NamedTuple):
    num_model_calls: int                    # the static cap max_nfe (the real count is AdaptiveInfo.nfe)
    run: Callable[..., tuple]               # (evaluate, x_T, key, grid) -> (x, AdaptiveInfo)
    uses: str = "x0"                        # "eps" or "x0": what the updates read


class _Carry(NamedTuple):
    x: jax.Array         # [B, ...] accepted sample at s
    x_prev: jax.Array    # [B, ...] the lower-order solution of the last accepted trial
    s: jax.Array         # [] current time
    h: jax.Array         # [] next trial's step in lambda
    nfe: jax.Array       # int32 []
    accepted: jax.Array  # int32 []
    rejected: jax.Array  # int32 []


def _check_positive(name, value, *, allow_zero=False):
    ok = value >= 0 if allow_zero else value > 0
    if not (isinstance(value, (int, float, np.integer, np.floating)) and np.isfinite(value) and ok):
        raise ValueError(f"dpm_solver_adaptive: {name} must be a {'non-negative' if allow_zero else 'positive'} "
                         f"finite number, got {value!r}")


def make_adaptive(schedule, num_steps: int, *, order: int = 2, algorithm: str = "dpmsolver++",
                  solver_type: str = "dpmsolver", rtol: float = 0.05, atol: float = 0.0078, h_init: float = 0.05,
                  theta: float = 0.9, t_err: float = 1e-5, max_nfe: int = 1000, tail_steps: int = 0) -> AdaptiveSolver:
    """DPM-Solver-12 (order=2, the official default) or -23 (order=3) from ``grid["t"][0]`` to ``grid["t"][-1]``."""
    name = "dpm_solver_adaptive"
    order = check_order(name, order, (2, 3))
    if algorithm not in ALGORITHMS:
        raise ValueError(f"solver {name!r}: algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"solver {name!r}: solver_type must be one of {SOLVER_TYPES}, got {solver_type!r}")
    for option, value in (("rtol", rtol), ("atol", atol)):
        _check_positive(option, value, allow_zero=True)
    if rtol == 0 and atol == 0:
        raise ValueError(f"solver {name!r}: rtol and atol cannot both be 0")
    for option, value in (("h_init", h_init), ("theta", theta), ("t_err", t_err)):
        _check_positive(option, value)
    if theta > 1:
        raise ValueError(f"solver {name!r}: theta must lie in (0, 1], got {theta}")
    if not isinstance(max_nfe, (int, np.integer)) or isinstance(max_nfe, bool) or max_nfe < order:
        raise ValueError(f"solver {name!r}: max_nfe must be an integer >= order={order}, got {max_nfe!r}")
    if tail_steps:
        raise ValueError(f"solver {name!r} does not support final_sigma='zero' (or a grid ending at sigma = 0); "
                         "use denoise_to_zero=True for a last x0-prediction at t_end")
    data = algorithm == "dpmsolver++"

    def trial(model, x, s, h):
        """One trial s -> lambda^{-1}(lambda_s + h): (x_low, x_high, t)."""
        t = at_time(schedule, schedule.t_of_lambda(s.lam + h))
        h = t.lam - s.lam

        def stage(r):
            c = at_time(schedule, schedule.t_of_lambda(s.lam + r * h))
            return c, (c.lam - s.lam) / h

        m0 = model(x, s)
        s1, r1 = stage(0.5 if order == 2 else 1.0 / 3.0)
        m1 = model(first_order_update(x, m0, s, s1, data=data), s1)
        x_2 = second_order_update(x, m0, m1, s, t, r1, data=data, solver_type=solver_type)
        if order == 2:
            return first_order_update(x, m0, s, t, data=data), x_2, t
        s2, r2 = stage(2.0 / 3.0)
        m2 = model(third_order_stage(x, m0, m1, s, s2, r1, r2, data=data), s2)
        return x_2, third_order_update(x, m0, m1, m2, s, t, r1, r2, data=data, solver_type=solver_type), t

    def run(evaluate, x_T, key, grid):
        t_start, t_end = grid["t"][0], grid["t"][-1]  # times in the coefficient dtype (>= float32)
        lam_end = at_time(schedule, t_end).lam

        def model(x, c):
            out = evaluate(x, c.t)
            return out.x0 if data else out.eps

        def cond(carry):
            return (jnp.abs(carry.s - t_end) > t_err) & (carry.nfe + order <= max_nfe)

        def body(carry):
            s = at_time(schedule, carry.s)
            x_low, x_high, t = trial(model, carry.x, s, carry.h)
            delta = jnp.maximum(atol, rtol * jnp.maximum(jnp.abs(x_low), jnp.abs(carry.x_prev)))
            err = ((x_high - x_low) / delta).reshape(x_T.shape[0], -1)
            err = jnp.max(jnp.sqrt(jnp.mean(err ** 2, axis=-1))).astype(carry.h.dtype)
            accept = err <= 1.0
            lam_s = jnp.where(accept, t.lam, s.lam)
            # E = 0 (exact agreement) would give an infinite factor: the min below then takes the rest of the way.
            grow = jnp.maximum(err, jnp.finfo(err.dtype).tiny) ** (-1.0 / order)
            h = jnp.minimum(theta * carry.h * grow, lam_end - lam_s)
            return _Carry(x=jnp.where(accept, x_high, carry.x), x_prev=jnp.where(accept, x_low, carry.x_prev),
                          s=jnp.where(accept, t.t, carry.s), h=h, nfe=carry.nfe + order,
                          accepted=carry.accepted + accept.astype(jnp.int32),
                          rejected=carry.rejected + (~accept).astype(jnp.int32))

        zero = jnp.asarray(0, jnp.int32)
        init = _Carry(x=x_T, x_prev=x_T, s=t_start, h=jnp.asarray(h_init, t_start.dtype), nfe=zero, accepted=zero,
                      rejected=zero)
        final = jax.lax.while_loop(cond, body, init)
        info = AdaptiveInfo(nfe=final.nfe, num_accepted=final.accepted, num_rejected=final.rejected,
                            t_final=final.s, finished=jnp.abs(final.s - t_end) <= t_err)
        return final.x, info

    return AdaptiveSolver(num_model_calls=int(max_nfe), run=run, uses="x0" if data else "eps")


def prepare_adaptive(schedule, times, **_):
    """No grid data beyond start and end; refuses per-sample grids (one step size for the batch)."""
    if times.ndim != 1:
        raise ValueError(f"solver 'dpm_solver_adaptive' needs one time grid for the batch, got timesteps of shape "
                         f"{times.shape}")
    return {}


def sample_adaptive(model_fn: Callable, x_T, *, schedule, prediction: str = "eps", t_start=None, t_end=None,
                    **options):
    """Adaptive DPM-Solver from t_start to t_end; returns (x_0, AdaptiveInfo) with the NFE actually used.

    Args are those of ``sample`` (the time range instead of ``nfe``/``timesteps``: denoise_to_zero,
    thresholding, check_nan, ...) and of ``make_adaptive`` (order, algorithm, solver_type, rtol, atol, h_init,
    theta, t_err, max_nfe). ``denoise_to_zero`` adds one x0-prediction at t_end (counted in ``info.nfe``).
    Jittable; an unfinished solve is reported by ``info.finished`` (not raised).
    """
    from dpmjax.samplers.driver import sample

    t_start = schedule.default_t_start if t_start is None else float(t_start)
    t_end = schedule.default_t_end if t_end is None else float(t_end)
    x, info = sample(model_fn, x_T, schedule=schedule, solver="dpm_solver_adaptive", prediction=prediction,
                     timesteps=np.array([t_start, t_end]), return_info=True, **options)
    trials = (info.nfe - int(bool(options.get("denoise_to_zero", False)))) // int(options.get("order", 2))
    return x, AdaptiveInfo(nfe=info.nfe, num_accepted=trials - info.num_rejected, num_rejected=info.num_rejected,
                           t_final=info.t_final, finished=info.finished)
