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

from dpmjax.samplers.base import Solver, at_time, expand_like, register, safe_divisor
from dpmjax.samplers.dpm_solver import multistep_order

__all__ = ["make_sde_dpmpp_2m", "SOLVER_TYPES"]

# diffusers' names first; the multistep solvers' names are accepted as aliases.
SOLVER_TYPES = ("midpoint", "heun", "dpmsolver", "taylor")
_ALIASES = {"dpmsolver": "midpoint", "taylor": "heun"}


class SDEMultistepState(NamedTuple):
    x: jax.Array        # [B, ...] current sample x_{t_i}
    history: jax.Array  # [2, B, ...] x0-predictions at t_i, t_{i-1}
    key: jax.Array      # PRNG key


@register("sde_dpmpp_2m", options=("solver_type", "lower_order_final", "_tail_steps"), stochastic=True)
def make_sde_dpmpp_2m(schedule, timesteps, *, solver_type: str = "midpoint", lower_order_final: bool = True,
                      _tail_steps: int = 0) -> Solver:
    """SDE-DPM-Solver++(2M) (stochastic: pass ``key``); options ``solver_type``, ``lower_order_final``."""
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"sde_dpmpp_2m: solver_type must be one of {SOLVER_TYPES}, got {solver_type!r}")
    solver_type = _ALIASES.get(solver_type, solver_type)
    num_steps = timesteps.shape[0] - 1

    def init(x_T, key):
        return SDEMultistepState(x=x_T, history=jnp.zeros((2,) + x_T.shape, x_T.dtype), key=key)

    def query(state, i):
        return state.x, timesteps[i]

    def update(state, i, out):
        x = state.x
        history = jnp.stack([out.x0, state.history[0]])
        prev = at_time(schedule, timesteps[jnp.maximum(i - 1, 0)], x.dtype)
        s = at_time(schedule, timesteps[i], x.dtype)
        t = at_time(schedule, timesteps[i + 1], x.dtype)
        h = t.lam - s.lam
        one_minus = -jnp.expm1(-2.0 * h)  # 1 - e^{-2h}
        decay = t.sigma / s.sigma * jnp.exp(-h)
        z = jax.random.normal(jax.random.fold_in(state.key, i), x.shape, x.dtype)
        x_next = (expand_like(decay, x) * x + expand_like(t.alpha * one_minus, x) * history[0]
                  + expand_like(t.sigma * jnp.sqrt(one_minus), x) * z)
        use2 = multistep_order(i, 2, num_steps, lower_order_final, _tail_steps) >= 2
        r0 = safe_divisor((s.lam - prev.lam) / h, use2)
        d1 = (history[0] - history[1]) / expand_like(r0, x)
        if solver_type == "midpoint":
            coef = 0.5 * t.alpha * one_minus
        else:
            coef = t.alpha * (one_minus / (-2.0 * h) + 1.0)
        x_next = jnp.where(use2, x_next + expand_like(coef, x) * d1, x_next)
        return SDEMultistepState(x=x_next, history=history, key=state.key)

    return Solver(num_model_calls=num_steps, init=init, query=query, update=update,
                  output=lambda state: state.x, uses="x0")
