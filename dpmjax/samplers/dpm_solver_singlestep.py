"""Singlestep DPM-Solver-1/2/3 (noise prediction) and DPM-Solver++(2S) (data prediction).

One outer step s -> t of order k makes k model calls at s = s_0 < s_1 < ... < s_{k-1} (intermediate times
between s and t in lambda), h = lambda_t - lambda_s, r_j = (lambda_{s_j} - lambda_s) / h, m_j the model output
(eps for DPM-Solver, x0 for DPM-Solver++) at the j-th stage point u_j (u_0 = x_s). Unified notation as in
``dpm_solver.py``: noise hh = h, c = sigma, a_{s->t} = alpha_t/alpha_s; data hh = -h, c = alpha,
a_{s->t} = sigma_t/sigma_s; first(x_s -> t) = a_{s->t} x_s - c_t (e^{hh} - 1) m_0; phi_2(z) = (e^z - 1)/z - 1,
phi_3(z) = phi_2(z)/z - 1/2 (``base.phi_2``, ``base.phi_3``).

  DPM-Solver-1 (Lu et al. 2022a, eq. 3.7; = DDIM):  x_t = first(x_s -> t).
  DPM-Solver-2 (Alg. 4; ++(2S): Lu et al. 2022b, Alg. 1):  u_1 = first(x_s -> s_1),
      "dpmsolver": x_t = first(x_s -> t) - c_t/(2 r_1) (e^{hh} - 1) (m_1 - m_0)
      "taylor":    x_t = first(x_s -> t) - c_t/r_1 phi_2(hh) (m_1 - m_0)
  DPM-Solver-3 (Alg. 5):  u_1 = first(x_s -> s_1),
      u_2 = first(x_s -> s_2) - c_{s_2} (r_2/r_1) phi_2(r_2 hh) (m_1 - m_0),
      "dpmsolver": x_t = first(x_s -> t) - c_t/r_2 phi_2(hh) (m_2 - m_0)
      "taylor":    D1_0 = (m_1 - m_0)/r_1, D1_1 = (m_2 - m_0)/r_2, D1 = (r_2 D1_0 - r_1 D1_1)/(r_2 - r_1),
                   D2 = 2 (D1_1 - D1_0)/(r_2 - r_1),  x_t = first(x_s -> t) - c_t (phi_2(hh) D1 + phi_3(hh) D2).

Order mixing ("DPM-Solver-fast", official ``method='singlestep'``): NFE = N model calls run as outer steps
of orders ``singlestep_orders(N, order)`` (order 3: [3]*(K-2)+[2,1] if N%3 == 0, [3]*(K-1)+[1] if N%3 == 1,
[3]*(K-1)+[2] if N%3 == 2, K = N//3 + 1; order 2: [2]*(N/2) or [2]*(N//2)+[1]).

The grid. Every model call happens at a grid point: the solver walks a grid of N + 1 times t_0 > ... > t_N
whose points at cumsum(orders) are the outer times and whose other points are the stage times s_j; r_j is
read from the grid in-loop, so per-sample grids [N+1, B] work. ``steps_for_nfe`` therefore returns N = nfe
(not the number K of outer steps: the factory only sees the grid, and K alone does not determine the NFE
when nfe is not a multiple of the order). The grid builder (``singlestep_grid``) reproduces the official
code exactly: for "logSNR" the K + 1 outer times are uniform in lambda and each outer interval is split
uniformly in lambda (r = 1/2; 1/3, 2/3 as in the paper); for every other spacing the official code takes the
outer times from the N-step grid at cumsum(orders) and splits each outer interval with the same spacing,
which gives back exactly the points of the N-step grid (time-uniform, time-quadratic and Karras grids nest),
so the N-step grid is used as is. Explicit ``timesteps`` are read the same way (N + 1 times, N calls).

The scan runs N iterations with one model call each; a static table maps iteration i to (stage j, order of
its outer step, index of the outer start). The state carries the outer start x_s, the earlier stage
outputs and the point the next call evaluates. ``return_trajectory`` records that point (stage points
included). No step divides by sigma = 0: the driver ends the run at sigma > 0 (``final_sigma="zero"`` is its
own first-order x0 step).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dpmjax.samplers.base import Coefficients, Solver, at_time, expand_like, phi_1, phi_2, phi_3, safe_divisor
from dpmjax.schedules import lambda_on_host, t_of_lambda_on_host, time_grid

__all__ = ["singlestep_orders", "singlestep_grid", "make_singlestep", "first_order_update",
           "second_order_update", "third_order_stage", "third_order_update", "SOLVER_TYPES"]

SOLVER_TYPES = ("dpmsolver", "taylor")


def singlestep_orders(num_evals: int, order: int) -> list[int]:
    """Orders of the outer steps for ``num_evals`` model calls (official DPM-Solver-fast rule)."""
    n = int(num_evals)
    if order == 1:
        return [1] * n
    if order == 2:
        return [2] * (n // 2) + [1] * (n % 2)
    k = n // 3 + 1
    if n % 3 == 0:
        return [3] * (k - 2) + [2, 1]
    if n % 3 == 1:
        return [3] * (k - 1) + [1]
    return [3] * (k - 1) + [2]


# ----------------------------------------------------------------------------------------------
# The update equations, shared with the adaptive solver. s, t, ...: ``Coefficients``; m_j: [B, ...].
# ----------------------------------------------------------------------------------------------

def _signed_h(s: Coefficients, t: Coefficients, data: bool):
    h = t.lam - s.lam
    return -h if data else h


def first_order_update(x_s, m0, s: Coefficients, t: Coefficients, *, data: bool):
    """DPM-Solver-1 / DPM-Solver++(1) from s to t: a_{s->t} x_s - c_t (e^{hh} - 1) m_0."""
    ratio = t.sigma / s.sigma if data else t.alpha / s.alpha
    c = t.alpha if data else t.sigma
    return expand_like(ratio, x_s) * x_s - expand_like(c * phi_1(_signed_h(s, t, data)), x_s) * m0


def second_order_update(x_s, m0, m1, s, t, r1, *, data: bool, solver_type: str):
    """Singlestep second order from s to t with m_1 at lambda_s + r_1 h (DPM-Solver-2 / ++(2S))."""
    hh = _signed_h(s, t, data)
    c = t.alpha if data else t.sigma
    if solver_type == "dpmsolver":
        coef = 0.5 * phi_1(hh) / r1
    else:
        coef = phi_2(hh) / r1
    return first_order_update(x_s, m0, s, t, data=data) - expand_like(c * coef, x_s) * (m1 - m0)


def third_order_stage(x_s, m0, m1, s, s2, r1, r2, *, data: bool):
    """The second stage point u_2 at s_2 = lambda_s + r_2 h of DPM-Solver-3 (both solver types)."""
    hh2 = _signed_h(s, s2, data)  # = r_2 hh
    c = s2.alpha if data else s2.sigma
    return first_order_update(x_s, m0, s, s2, data=data) - expand_like(c * (r2 / r1) * phi_2(hh2), x_s) * (m1 - m0)


def third_order_update(x_s, m0, m1, m2, s, t, r1, r2, *, data: bool, solver_type: str, r_gap=None):
    """Singlestep third order from s to t with m_1, m_2 at lambda_s + r_1 h, lambda_s + r_2 h.

    ``r_gap`` (= r_2 - r_1, made safe by the caller when the branch may be unselected) is used by "taylor".
    """
    hh = _signed_h(s, t, data)
    c = t.alpha if data else t.sigma
    base = first_order_update(x_s, m0, s, t, data=data)
    if solver_type == "dpmsolver":
        return base - expand_like(c * phi_2(hh) / r2, x_s) * (m2 - m0)
    r_gap = r2 - r1 if r_gap is None else r_gap
    r1e, r2e, gap = (expand_like(v, x_s) for v in (r1, r2, r_gap))
    d1_0 = (m1 - m0) / r1e
    d1_1 = (m2 - m0) / r2e
    d1 = (r2e * d1_0 - r1e * d1_1) / gap
    d2 = 2.0 * (d1_1 - d1_0) / gap
    return base - expand_like(c * phi_2(hh), x_s) * d1 - expand_like(c * phi_3(hh), x_s) * d2


# ----------------------------------------------------------------------------------------------
# The grid and the scan plan.
# ----------------------------------------------------------------------------------------------

def singlestep_grid(order: int):
    """The ``grid`` hook: N + 1 times for N model calls, as the official code places them (module doc)."""
    def build(schedule, num_evals, spacing, t_start, t_end, **_options):
        if spacing != "logSNR" or order == 1:
            return time_grid(schedule, num_evals, spacing, t_start=t_start, t_end=t_end)
        orders = singlestep_orders(num_evals, order)
        outer = time_grid(schedule, len(orders), "logSNR", t_start=t_start, t_end=t_end)
        lams = lambda_on_host(schedule, outer)
        points = [outer[:1]]
        for k, step_order in enumerate(orders):
            inner = np.linspace(lams[k], lams[k + 1], step_order + 1)[1:-1]
            if inner.size:
                points.append(t_of_lambda_on_host(schedule, inner))
            points.append(outer[k + 1:k + 2])
        return np.concatenate(points)
    return build


class SinglestepState(NamedTuple):
    x: jax.Array       # [B, ...] the point the next model call evaluates (stage point or outer point)
    x_s: jax.Array     # [B, ...] the sample at the start of the current outer step
    stages: jax.Array  # [max(order - 1, 1), B, ...] model outputs of the earlier stages of the current step


def _stage_table(num_evals: int, order: int):
    """Per iteration: (stage j, order of its outer step, grid index of the outer start), int32 numpy."""
    stage, step_order, start = [], [], []
    index = 0
    for k in singlestep_orders(num_evals, order):
        stage += list(range(k))
        step_order += [k] * k
        start += [index] * k
        index += k
    return tuple(np.asarray(a, np.int32) for a in (stage, step_order, start))


def make_singlestep(schedule, num_evals: int, *, order: int, data: bool, solver_type: str = "dpmsolver",
                    name: str = "") -> Solver:
    """Singlestep DPM-Solver(++) of ``order`` over a grid of N + 1 times (N = ``num_evals`` model calls)."""
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"solver {name!r}: solver_type must be one of {SOLVER_TYPES}, got {solver_type!r}")
    stage_np, order_np, start_np = _stage_table(num_evals, order)
    max_order = int(order_np.max())
    stage_tab, order_tab, start_tab = (jnp.asarray(a) for a in (stage_np, order_np, start_np))
    num_stored = max(max_order - 1, 1)

    def init(x_T, key, grid):
        return SinglestepState(x=x_T, x_s=x_T, stages=jnp.zeros((num_stored,) + x_T.shape, x_T.dtype))

    def query(state, i, grid):
        return state.x, grid["t"][i]

    def update(state, i, grid, out):
        m = out.x0 if data else out.eps
        timesteps = grid["t"]
        stage, step_order, j0 = stage_tab[i], order_tab[i], start_tab[i]
        first = stage == 0
        x_s = jnp.where(first, state.x, state.x_s)
        m0 = jnp.where(first, m, state.stages[0])
        s = at_time(schedule, timesteps[j0])
        nxt = at_time(schedule, timesteps[i + 1])  # every call's result lives at the next grid point
        # stage 0: u_1 (or x_t for an order-1 step); both are first-order steps from x_s.
        x_next = first_order_update(x_s, m0, s, nxt, data=data)
        if max_order >= 2:
            end = at_time(schedule, timesteps[j0 + step_order])
            h = end.lam - s.lam
            later = stage >= 1
            s1 = at_time(schedule, timesteps[j0 + 1])
            r1 = safe_divisor((s1.lam - s.lam) / safe_divisor(h, later), later)
            m1 = jnp.where(stage == 1, m, state.stages[num_stored - 1])
            final2 = (stage == 1) & (step_order == 2)
            x_next = jnp.where(final2, second_order_update(x_s, m0, m1, s, nxt, r1, data=data,
                                                           solver_type=solver_type), x_next)
        if max_order >= 3:
            use3 = later & (step_order == 3)
            s2 = at_time(schedule, timesteps[jnp.minimum(j0 + 2, num_evals)])
            r2 = safe_divisor((s2.lam - s.lam) / safe_divisor(h, use3), use3)
            u2 = third_order_stage(x_s, m0, m1, s, nxt, r1, r2, data=data)
            final3 = use3 & (stage == 2)
            x_t = third_order_update(x_s, m0, m1, m, s, nxt, r1, r2, data=data, solver_type=solver_type,
                                     r_gap=safe_divisor(r2 - r1, final3))
            x_next = jnp.where(use3 & (stage == 1), u2, jnp.where(final3, x_t, x_next))
        stages = jax.lax.dynamic_update_index_in_dim(state.stages, m, jnp.minimum(stage, num_stored - 1), 0)
        return SinglestepState(x=x_next, x_s=x_s, stages=stages)

    return Solver(num_model_calls=num_evals, init=init, query=query, update=update,
                  output=lambda state: state.x, uses="x0" if data else "eps")
