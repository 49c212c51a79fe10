"""SDE-DPM-Solver++(2M): the stochastic multistep data-prediction solver (diffusers' "sde-dpmsolver++").

From s = t_i to t = t_{i+1}, h = lambda_t - lambda_s, m_0 = x0-prediction at t_i, m_1 at t_{i-1},
r_0 = (lambda_i - lambda_{i-1})/h, D1 = (m_0 - m_1)/r_0, z ~ N(0, I) (Lu et al. 2022b, App. "SDE-DPM-Solver++";
first order = the exact solution of the variance-preserving reverse SDE with x0 held constant):

  order 1:  x_t = (sigma_t/sigma_s) e^{-h} x_s + alpha_t (1 - e^{-2h}) m_0 + sigma_t sqrt(1 - e^{-2h}) z
  order 2:  ... + c D1,  "midpoint": c = 1/2 alpha_t (1 - e^{-2h});
                         "heun":     c = alpha_t ((1 - e^{-2h})/(-2h) + 1)   (diffusers' two solver types).

Warm-up (order 1 at the first step) and ``lower_order_final`` follow the multistep solvers
(``dpm_solver.multistep_order``). The noise of step i is drawn from ``jax.random.fold_in(key, i)``.
With ``final_sigma="zero"`` the driver's last step x_0 = x0-prediction is this update at sigma_t = 0
(no noise is added there), as diffusers' ``final_sigmas_type="zero"``.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dpmjax.samplers.base import Solver, at_time, check_flag, combine, combine_lags, ring_slot, safe_divisor
from dpmjax.samplers.dpm_solver import multistep_order

__all__ = ["make_sde_dpmpp_2m", "SOLVER_TYPES"]

# diffusers' names first; the multistep solvers' names are accepted as aliases.
SOLVER_TYPES = ("midpoint", "heun", "dpmsolver", "taylor")
_ALIASES = {"dpmsolver": "midpoint", "taylor": "heun"}


class SDEMultistepState(NamedTuple):
    x: jax.Array        # [B, ...] current sample x_{t_i}
    history: jax.Array  # [2, B, ...] ring buffer of x0-predictions (step j's in slot j % 2)
    key: jax.Array      # PRNG key


def make_sde_dpmpp_2m(schedule, num_steps: int, *, solver_type: str = "midpoint", lower_order_final: bool = True,
                      tail_steps: int = 0) -> Solver:
    """SDE-DPM-Solver++(2M) (stochastic: pass ``key``); options ``solver_type``, ``lower_order_final``."""
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"solver 'sde_dpmpp_2m': solver_type must be one of {SOLVER_TYPES}, got {solver_type!r}")
    check_flag("sde_dpmpp_2m", "lower_order_final", lower_order_final)
    solver_type = _ALIASES.get(solver_type, solver_type)

    def init(x_T, key, grid):
        return SDEMultistepState(x=x_T, history=jnp.zeros((2,) + x_T.shape, x_T.dtype), key=key)

    def query(state, i, grid):
        return state.x, grid["t"][i]

    def update(state, i, grid, out):
        x, times = state.x, grid["t"]
        history = jax.lax.dynamic_update_index_in_dim(state.history, out.x0, ring_slot(i, 2), 0)
        prev = at_time(schedule, times[jnp.maximum(i - 1, 0)])
        s, t = at_time(schedule, times[i]), at_time(schedule, times[i + 1])
        h = t.lam - s.lam
        one_minus = -jnp.expm1(-2.0 * h)  # 1 - e^{-2h}
        decay = t.sigma / s.sigma * jnp.exp(-h)
        use2 = multistep_order(i, 2, num_steps, lower_order_final, tail_steps) >= 2
        r0 = safe_divisor((s.lam - prev.lam) / h, use2)
        if solver_type == "midpoint":
            coef = 0.5 * t.alpha * one_minus
        else:
            coef = t.alpha * (one_minus / (-2.0 * h) + 1.0)
        coef = jnp.where(use2, coef / r0, jnp.zeros_like(coef))  # of D1 = (m_0 - m_1) / r_0
        weights = jnp.stack([t.alpha * one_minus + coef, -coef])  # by lag: m_0, m_1
        z = jax.random.normal(jax.random.fold_in(state.key, i), x.shape, x.dtype)
        x_next = combine([x, z], [decay, t.sigma * jnp.sqrt(one_minus)]) + combine_lags(history, weights, i)
        return SDEMultistepState(x=x_next, history=history, key=state.key)

    return Solver(num_model_calls=num_steps, init=init, query=query, update=update,
                  output=lambda state: state.x, uses="x0")
