"""Multistep DPM-Solver (noise prediction) and DPM-Solver++ (data prediction), orders 1-3.

From s = t_i to t = t_{i+1}, h = lambda_t - lambda_s, with history m_0 (at t_i), m_1, m_2 (earlier),
r_0 = (lambda_i - lambda_{i-1})/h, r_1 = (lambda_{i-1} - lambda_{i-2})/h, D1_0 = (m_0 - m_1)/r_0:

  noise (DPM-Solver, Lu et al. 2022a, eq. 3.7 and App. B):  hh = h,  c = sigma_t, x_t = (alpha_t/alpha_s) x_s ...
  data  (DPM-Solver++, Lu et al. 2022b, Alg. 2):              hh = -h, c = alpha_t, x_t = (sigma_t/sigma_s) x_s ...
      ... - c (e^{hh} - 1) m_0 - c * correction,
  order 2 "dpmsolver" (diffusers' "midpoint"): correction = 1/2 (e^{hh} - 1) D1_0
  order 2 "taylor" (diffusers' "heun"):        correction = phi_2(hh) D1_0,  phi_2(z) = (e^z - 1)/z - 1
  order 3: D1 = D1_0 + r_0/(r_0 + r_1)(D1_0 - D1_1), D2 = (D1_0 - D1_1)/(r_0 + r_1),
           correction = phi_2(hh) D1 + phi_3(hh) D2,  phi_3(z) = phi_2(z)/z - 1/2.
The order-3 update is the official code's (and diffusers'): there D2 ~ h^2 m''/2, while the Taylor expansion
(DPM-Solver eq. 3.6: sum_n h^{n+1} phi_{n+1}(h) m^(n)) needs h^2 m'', so the "3M" methods are second order in
practice (measured slope ~2.1 on the oracle). ``exact_third_order=True`` uses 2 D2 and measures ~3.0; the
default keeps parity with the official code and diffusers, which produced the published numbers.
Warm-up: order min(order, i + 1). ``lower_order_final`` (default on, when the total number of steps is
below 15 as in diffusers; the official code gates at 10): order min(order, steps remaining).
One model call per step; the model is never evaluated after the last step.

Implementation: every update is linear in (x, m_0, m_1, m_2), so the step computes the scalar weight of each
history entry for its order (``multistep_weights``, a few flops) and applies one fused linear combination; the
history is a ring buffer (``base.ring_slot``) written in place, never shifted.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dpmjax.samplers.base import Solver, at_time, check_flag, check_order, combine_lags, expand_like, \
    phi_1, phi_2, phi_3, ring_slot, safe_divisor

__all__ = ["make_multistep", "multistep_order", "multistep_weights", "SOLVER_TYPES", "LOWER_ORDER_FINAL_BELOW"]

LOWER_ORDER_FINAL_BELOW = 15
SOLVER_TYPES = ("dpmsolver", "taylor")


class MultistepState(NamedTuple):
    x: jax.Array        # [B, ...] current sample x_{t_i}
    history: jax.Array  # [order, B, ...] ring buffer of model outputs: step j's in slot j % order


def multistep_order(i, order: int, num_steps: int, lower_order_final: bool, tail_steps: int = 0):
    """The order used at step i: warm-up, then ``order``, lowered near the end if asked."""
    step_order = jnp.minimum(order, i + 1)
    if lower_order_final and num_steps + tail_steps < LOWER_ORDER_FINAL_BELOW:
        step_order = jnp.minimum(step_order, num_steps + tail_steps - i)
    return step_order


def multistep_weights(lambdas, s, t, step_order, order: int, *, data: bool, solver_type: str,
                      exact_third_order: bool = False):
    """(ratio, w): x_t = ratio x_s + sum_k w[k] m_k for the multistep step of ``step_order``.

    ``lambdas`` [order(, B)] are lambda at the history points (lag 0 = t_i first); s, t the Coefficients at
    both ends. Returns ratio (scalar or [B]) and w [order(, B)] by lag.
    """
    h = t.lam - s.lam
    hh = -h if data else h
    c = t.alpha if data else t.sigma
    ratio = t.sigma / s.sigma if data else t.alpha / s.alpha
    zero = jnp.zeros_like(h)
    e1 = phi_1(hh)
    first = [-c * e1] + [zero] * (order - 1)
    if order == 1:
        return ratio, jnp.stack(first)
    use2 = step_order >= 2
    r0 = safe_divisor((lambdas[0] - lambdas[1]) / h, use2)
    d1_0 = [1.0 / r0, -1.0 / r0] + [zero] * (order - 2)   # D1_0 = (m_0 - m_1) / r_0, by lag
    k2 = 0.5 * e1 if solver_type == "dpmsolver" else phi_2(hh)
    second = [f - c * k2 * d for f, d in zip(first, d1_0)]
    w = jnp.where(use2, jnp.stack(second), jnp.stack(first))
    if order == 2:
        return ratio, w
    use3 = step_order >= 3
    r1 = safe_divisor((lambdas[1] - lambdas[2]) / h, use3)
    d1_1 = [zero, 1.0 / r1, -1.0 / r1]                      # D1_1 = (m_1 - m_2) / r_1
    diff = [a - b for a, b in zip(d1_0, d1_1)]
    d1 = [a + r0 / (r0 + r1) * d for a, d in zip(d1_0, diff)]
    d2 = [d / (r0 + r1) * (2.0 if exact_third_order else 1.0) for d in diff]
    third = [f - c * (phi_2(hh) * a + phi_3(hh) * b) for f, a, b in zip(first, d1, d2)]
    return ratio, jnp.where(use3, jnp.stack(third), w)


def make_multistep(schedule, num_steps: int, *, order: int, data: bool, solver_type: str = "dpmsolver",
                   lower_order_final: bool = True, exact_third_order: bool = False, tail_steps: int = 0,
                   name: str = "") -> Solver:
    """Multistep DPM-Solver(++) of ``order`` over ``num_steps`` grid intervals (``tail_steps``: steps the
    driver runs after this solver, counted by ``lower_order_final``)."""
    check_order(name, order, (1, 2, 3))
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"solver {name!r}: solver_type must be one of {SOLVER_TYPES}, got {solver_type!r}")
    check_flag(name, "lower_order_final", lower_order_final)
    check_flag(name, "exact_third_order", exact_third_order)

    def init(x_T, key, grid):
        return MultistepState(x=x_T, history=jnp.zeros((order,) + x_T.shape, x_T.dtype))

    def query(state, i, grid):
        return state.x, grid["t"][i]

    def update(state, i, grid, out):
        times = grid["t"]
        m = out.x0 if data else out.eps
        # write first, read after: the step's reads then follow the in-place update (no copy of the history)
        history = jax.lax.dynamic_update_index_in_dim(state.history, m, ring_slot(i, order), 0)
        lambdas = jnp.stack([at_time(schedule, times[jnp.maximum(i - k, 0)]).lam for k in range(order)])
        s, t = at_time(schedule, times[i]), at_time(schedule, times[i + 1])
        step_order = multistep_order(i, order, num_steps, lower_order_final, tail_steps)
        ratio, w = multistep_weights(lambdas, s, t, step_order, order, data=data, solver_type=solver_type,
                                     exact_third_order=exact_third_order)
        x_next = expand_like(ratio, state.x) * state.x + combine_lags(history, w, i)
        return MultistepState(x=x_next, history=history)

    return Solver(num_model_calls=num_steps, init=init, query=query, update=update,
                  output=lambda state: state.x, uses="x0" if data else "eps")
