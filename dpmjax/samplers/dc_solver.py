"""DC-Solver: UniPC with dynamic compensation (Zhao et al., ECCV 2024, "DC-Solver: Improving
Predictor-Corrector Diffusion Sampler via Dynamic Compensation").

Predictor-corrector samplers reuse m(x~_{t_i}, t_i), evaluated at the *uncorrected* x~_{t_i}, for the step
from the corrected x_{t_i}: a misalignment. DC replaces that newest model output by the Lagrange polynomial
P (in t, not lambda) through the last K = dc_order + 1 outputs (m_i, m_{i-1}, .., at t_i, t_{i-1}, ..),
evaluated at a per-step shifted time (the paper's eq. for t'; LDM code writes rho t_i + (1 - rho) t_{i-1}):

    m_i <- P(t'_i),   t'_i = t_{i-1} + rho_i (t_i - t_{i-1}),

then runs the usual UniP step from the corrected x_{t_i} (and stores the compensated m_i in the history).
rho_i = 1 gives P(t_i) = m_i: plain UniPC. DC is active only once K outputs exist (i >= dc_order), as in the
LDM code. With ``use_corrector=False`` and order 2 / "bh2" it is the plug-in on DPM-Solver++(2M).

The ratios come from ``dpmjax.search.dc`` (gradient search against a reference trajectory, or the cascade
polynomial regression); they are an option (array [N], N the number of solver steps), so they can be traced
and differentiated through ``sample``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dpmjax.samplers.base import Coefficients, Solver, at_time, check_order, expand_like, register
from dpmjax.samplers.unipc import VARIANTS, UniPCState, unipc_order, unipc_step


def lagrange_at(values, times, t_query):
    """P(t_query) for the polynomial through (times[k], values[k]); times [K] or [K, B], t_query scalar or [B]."""
    k_points = values.shape[0]
    out = jnp.zeros_like(values[0])
    for k in range(k_points):
        weight = jnp.ones_like(t_query)
        for m in range(k_points):
            if m != k:
                weight = weight * (t_query - times[m]) / (times[k] - times[m])
        out = out + expand_like(weight, values[0]) * values[k]
    return out


def make_dc_solver(schedule, timesteps, *, ratios=None, dc_order: int = 2, order: int = 2, variant: str = "bh2",
                   predict_x0: bool = True, use_corrector: bool = True, lower_order_final: bool = True,
                   _tail_steps: int = 0) -> Solver:
    """UniPC-p with dynamic compensation; ``ratios`` [num_steps] (None = all 1 = UniPC)."""
    check_order("dc_solver", order, (1, 2, 3))
    if variant not in VARIANTS:
        raise ValueError(f"dc_solver: variant must be one of {VARIANTS}, got {variant!r}")
    if dc_order not in (1, 2, 3):
        raise ValueError(f"dc_solver: dc_order must be 1, 2 or 3, got {dc_order!r}")
    for flag, value in (("predict_x0", predict_x0), ("use_corrector", use_corrector),
                        ("lower_order_final", lower_order_final)):
        if not isinstance(value, bool):
            raise ValueError(f"dc_solver: {flag} must be True or False, got {value!r}")
    num_steps = timesteps.shape[0] - 1
    if ratios is None:
        ratios = jnp.ones((num_steps,))
    if not isinstance(ratios, jax.core.Tracer):
        ratios = np.asarray(ratios, np.float64)
        if ratios.shape != (num_steps,) or not np.all(np.isfinite(ratios)):
            raise ValueError(f"dc_solver: ratios must be {num_steps} finite numbers (one per solver step), got "
                             f"shape {ratios.shape}")
    data = predict_x0
    keep = max(order, dc_order + 1)

    def init(x_T, key):
        return UniPCState(x=x_T, x_prev=x_T, history=jnp.zeros((keep,) + x_T.shape, x_T.dtype))

    def query(state, i):
        return state.x, timesteps[i]

    def update(state, i, out):
        dtype = state.x.dtype
        idx = jnp.clip(i - jnp.arange(-1, keep + 1, dtype=i.dtype), 0, num_steps)
        grid = at_time(schedule, timesteps[idx], dtype)
        at = [Coefficients(*(field[j] for field in grid)) for j in range(keep + 2)]
        t_next, t_i, lam = at[0], at[1], grid.lam[1:]
        m_t = out.x0 if data else out.eps

        x = state.x
        if use_corrector:  # UniC with the raw m_t, exactly as UniPC
            s = at[2]._replace(lam=jnp.where(i >= 1, at[2].lam, t_i.lam - 1.0))
            p_prev = unipc_order(jnp.maximum(i - 1, 0), order, num_steps, lower_order_final, _tail_steps)
            corrected = unipc_step(state.x_prev, state.history[:order], lam[1:order + 1].at[0].set(s.lam), s,
                                   t_i, p_prev, data=data, variant=variant, m_t=m_t)
            x = jnp.where(i >= 1, corrected, x)

        history = jnp.concatenate([m_t[None], state.history[:-1]])
        # dynamic compensation of the newest output (active once dc_order + 1 outputs exist)
        times = grid.t[1:dc_order + 2]  # t_i, t_{i-1}, ..
        rho = jnp.asarray(ratios, dtype)[jnp.minimum(i, num_steps - 1)]
        t_query = times[0] - (1.0 - rho) * (times[0] - times[1])  # exactly t_i at rho = 1
        active = i >= dc_order
        safe_times = jnp.where(active, times, times[0] + jnp.arange(dc_order + 1, dtype=dtype).reshape(
            (-1,) + (1,) * (times.ndim - 1)))  # distinct nodes in the unselected branch
        compensated = lagrange_at(history[:dc_order + 1], safe_times, t_query)
        history = history.at[0].set(jnp.where(active, compensated, history[0]))

        p = unipc_order(i, order, num_steps, lower_order_final, _tail_steps)
        x_next = unipc_step(x, history[:order], lam[:order], t_i, t_next, p, data=data, variant=variant)
        return UniPCState(x=x_next, x_prev=x, history=history)

    return Solver(num_model_calls=num_steps, init=init, query=query, update=update,
                  output=lambda state: state.x, uses="x0" if data else "eps")


register("dc_solver", options=("ratios", "dc_order", "order", "variant", "predict_x0", "use_corrector",
                               "lower_order_final", "_tail_steps"), min_nfe=lambda **_: 1)(make_dc_solver)
