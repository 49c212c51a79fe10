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
polynomial regression); they are an option (array [N], N the number of solver steps) that becomes grid data
(``grid["ratios"]``), so they can be traced and differentiated through ``sample``, and a compiled sampler takes
new ratios without recompiling.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dpmjax.samplers.base import Solver, check_flag, check_order, combine, combine_lags, expand_like, ring_slot
from dpmjax.samplers.unipc import VARIANTS, UniPCState, step_points, unipc_order, unipc_weights


def lagrange_weights_at(times, t_query):
    """w [K(, B)] with P(t_query) = sum_k w[k] values[k] for the polynomial through (times[k], values[k]);
    times [K] or [K, B], t_query scalar or [B]."""
    k_points = times.shape[0]
    weights = []
    for k in range(k_points):
        weight = jnp.ones_like(t_query)
        for m in range(k_points):
            if m != k:
                weight = weight * (t_query - times[m]) / (times[k] - times[m])
        weights.append(weight)
    return jnp.stack(weights)


def lagrange_at(values, times, t_query):
    """P(t_query) for the polynomial through (times[k], values[k]); times [K] or [K, B], t_query scalar or [B]."""
    return combine(values, lagrange_weights_at(times, t_query))


def make_dc_solver(schedule, num_steps: int, *, dc_order: int = 2, order: int = 2, variant: str = "bh2",
                   predict_x0: bool = True, use_corrector: bool = True, lower_order_final: bool = True,
                   tail_steps: int = 0) -> Solver:
    """UniPC-p with dynamic compensation; the ratios [num_steps] are grid data (``grid["ratios"]``)."""
    name = "dc_solver"
    check_order(name, order, (1, 2, 3))
    if variant not in VARIANTS:
        raise ValueError(f"solver 'dc_solver': variant must be one of {VARIANTS}, got {variant!r}")
    if isinstance(dc_order, bool) or dc_order not in (1, 2, 3):
        raise ValueError(f"solver 'dc_solver': dc_order must be 1, 2 or 3, got {dc_order!r}")
    for flag, value in (("predict_x0", predict_x0), ("use_corrector", use_corrector),
                        ("lower_order_final", lower_order_final)):
        check_flag(name, flag, value)
    data = predict_x0
    # ring of compensated outputs; one slot more than any read reaches back, so the write of step i never
    # clobbers an entry the corrector still needs (it reads the ring after the write: no copy of the ring)
    size = max(order, dc_order + 1) + 1

    def init(x_T, key, grid):
        return UniPCState(x=x_T, x_prev=x_T, history=jnp.zeros((size,) + x_T.shape, x_T.dtype))

    def query(state, i, grid):
        return state.x, grid["t"][i]

    def update(state, i, grid, out):
        times = grid["t"]
        t_next, t_i, s, lam = step_points(schedule, times, i, order, num_steps)
        m_t = out.x0 if data else out.eps

        # dynamic compensation of the newest output (active once dc_order + 1 outputs exist): the Lagrange
        # polynomial through (t_i, m_t), (t_{i-1}, m_{i-1}), .. at t'_i; the ring keeps the compensated value
        back = jnp.clip(i - jnp.arange(dc_order + 1, dtype=i.dtype), 0, num_steps)
        nodes = times[back]  # t_i, t_{i-1}, .., t_{i-dc_order}
        rho = grid["ratios"][jnp.minimum(i, num_steps - 1)]
        t_query = nodes[0] - (1.0 - rho) * (nodes[0] - nodes[1])  # exactly t_i at rho = 1
        active = i >= dc_order
        offsets = jnp.arange(dc_order + 1, dtype=nodes.dtype).reshape((-1,) + (1,) * (nodes.ndim - 1))
        safe_nodes = jnp.where(active, nodes, nodes[0] + offsets)  # distinct nodes in the unselected branch
        weights = lagrange_weights_at(safe_nodes, t_query)
        compensated = expand_like(weights[0], m_t) * m_t + combine_lags(state.history, weights[1:], i - 1)
        history = jax.lax.dynamic_update_index_in_dim(state.history, jnp.where(active, compensated, m_t),
                                                      ring_slot(i, size), 0)

        x = state.x
        if use_corrector:  # UniC with the raw m_t, exactly as UniPC (history lag 0 = step i - 1)
            p_prev = unipc_order(jnp.maximum(i - 1, 0), order, num_steps, lower_order_final, tail_steps)
            ratio, w, w_t = unipc_weights(lam[1:].at[0].set(s.lam), s, t_i, p_prev, order, data=data,
                                          variant=variant, corrector=True)
            corrected = (expand_like(ratio, x) * state.x_prev + combine_lags(history, w, i - 1)
                         + expand_like(w_t, x) * m_t)
            x = jnp.where(i >= 1, corrected, x)

        p = unipc_order(i, order, num_steps, lower_order_final, tail_steps)
        ratio, w, _ = unipc_weights(lam[:order], t_i, t_next, p, order, data=data, variant=variant)
        x_next = expand_like(ratio, x) * x + combine_lags(history, w, i)
        return UniPCState(x=x_next, x_prev=x, history=history)

    return Solver(num_model_calls=num_steps, init=init, query=query, update=update,
                  output=lambda state: state.x, uses="x0" if data else "eps")


def prepare_dc(schedule, times, *, ratios=None, **_):
    """Grid data: the compensation ratios [N] (default all 1 = plain UniPC); traced ratios are allowed."""
    num_steps = times.shape[0] - 1
    if ratios is None:
        return {"ratios": np.ones((num_steps,))}
    if np.shape(ratios) != (num_steps,):
        raise ValueError(f"solver 'dc_solver': ratios must be {num_steps} numbers (one per solver step), got "
                         f"shape {np.shape(ratios)}")
    try:
        host = np.asarray(ratios, np.float64)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return {"ratios": ratios}  # traced (a search differentiates through them)
    if not np.all(np.isfinite(host)):
        raise ValueError("solver 'dc_solver': ratios must be finite")
    return {"ratios": host}
