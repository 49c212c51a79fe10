"""DPM-Solver-v3 (Zheng, Lu, Chen, Zhu 2023): multistep predictor-corrector with empirical model statistics.

With EMS l, s, b (``dpmjax.ems``) and, on the EMS grid, L = int l, S = int s, B = int e^{-S} b (from lambda_T),
the model enters through f = (sigma eps - l x)/alpha = (1 - l) x/alpha - x0 and g_i = e^{S_s - S_i} f_i -
e^{S_s}(B_i - B_s) (eq. 8, relative to the step's start s). One step s -> t of order n + 1 (eq. 12-14, App. C.1.2):

    x_t = (alpha_t/alpha_s) e^{L_s - L_t} x_s - alpha_t e^{L_s - L_t} [ E_0 g_s + F + sum_{k=1..n} E_k g^(k)_s ]
    E_k = int_s^t e^{(L+S)(lam) - (L+S)(lam_s)} (lam - lam_s)^k / k! dlam,
    F   = int_s^t e^{(L+S)(lam) - (L+S)(lam_s)} e^{S_s} (B(lam) - B_s) dlam,

all by the trapezoid rule on the EMS grid (the official quadrature). The derivatives g^(k)_s come from the n other
points: exactly (the Vandermonde system, eq. 13) or, with ``p_pseudo`` / ``c_pseudo``, from Newton divided
differences g^(k) = k! g[lam_s, .., lam_k] (the pseudo-order solver, eq. 15-16, Theorem 3.4).
Predictor at step i (Alg. 2): s = t_i, others t_{i-1}, .., t_{i-n}. Corrector (UniPC-style, no extra NFE): after
the model call at the predicted x_{t_i}, redo t_{i-1} -> t_i with the fresh value, others t_i, t_{i-2}, ..; its
order is the predictor order of that step, +1 with ``c_pseudo`` (the official code's "pseudo (n+1)-th order
corrector"); f_i is kept (Alg. 2 line 13: the cached eps is shifted so that g_i is unchanged). Orders: warm-up
min(order, i + 1); ``lower_order_final``: min(., steps left), always (no "< 10 steps" gate, as the official code).

``half``: the paper (Sec. 3.3) and README: "use the corrector only in the time region t <= 0.5". The official
code applies it where ``t > 0.5`` instead. We follow the paper's text: corrector only at t_i <= 0.5.

Without ``ems`` the statistics are degenerate (l = 1, s = b = 0, the official ``degenerated=True``): then f = -x0,
E_k reduce to closed forms (h^{k+1} phi_{k+1}(-h)) and the solver is DPM-Solver++ in its Taylor form (order 1 =
DDIM, order 2 = dpmpp_2m with solver_type="taylor"; order 3 uses the exact Taylor coefficient of the second
derivative, twice the one in DPM-Solver's 3M code, so it is not dpmpp_3m).

Time steps are snapped to the EMS grid (index = round(N (lam - lam_T)/(lam_0 - lam_T)), as the official code);
the model is evaluated at the snapped times. A grid built from ``nfe`` is snapped before the driver sees it and
defaults to the EMS range. Departure from the dpmjax convention "time coefficients in-loop via at_time": all
step coefficients are computed once on the host in float64 (they need quadrature over the EMS grid between
snapped indices) and reduce each step to x_t = A x_s + sum_j M_j f_j + c, indexed by the step in the scan.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dpmjax.ems import EMS, schedule_at
from dpmjax.samplers.base import Solver, check_order, ring_slot
from dpmjax.schedules import time_grid

HALF_T = 0.5  # the half-corrector boundary (paper Sec. 3.3)
_MAX_K = 3    # derivatives up to the 3rd (pseudo 4th-order corrector with order 3)


class V3State(NamedTuple):
    x: jax.Array        # [B, ...] predicted x at t_i: where iteration i evaluates the model
    x_prev: jax.Array   # [B, ...] corrected x at t_{i-1}: the start of the step the corrector redoes
    history: jax.Array  # [order + 1, B, ...] ring buffer of f (step j's in slot j % (order + 1))


# ---------------------------------------------------------------------------------------------------
# Host-side (float64) coefficients.
# ---------------------------------------------------------------------------------------------------

def h_phi(h, k: int):
    """int_0^h e^{-v} (h - v)^k / k! dv = h^{k+1} phi_{k+1}(-h), for h >= 0 (series below 1, else recursion)."""
    h = np.asarray(h, np.float64)
    series = sum((-h) ** n / math.factorial(n + k + 1) for n in range(30)) * h ** (k + 1)
    value = -np.expm1(-h)
    for j in range(1, k + 1):  # I_j = h^j / j! - I_{j-1}
        value = h ** j / math.factorial(j) - value
    return np.where(h < 1.0, series, value)


def derivative_weights(deltas, pseudo: bool) -> np.ndarray:
    """W [n, n] with g^(k)_s = sum_j W[k-1, j-1] (g_j - g_s), from the offsets deltas_j = lam_j - lam_s.

    Exact: the Vandermonde system sum_k deltas_j^k g^(k)/k! = g_j - g_s (eq. 13). Pseudo: the k-th derivative
    from the first k other points only, k! times the divided difference over (0, delta_1, .., delta_k) (eq. 16).
    """
    deltas = np.asarray(deltas, np.float64)
    n = deltas.shape[0]
    fact = np.array([math.factorial(k) for k in range(1, n + 1)], np.float64)
    if not pseudo:
        vander = deltas[:, None] ** np.arange(1, n + 1)[None, :]
        return fact[:, None] * np.linalg.inv(vander)
    nodes = np.concatenate([[0.0], deltas])
    weights = np.zeros((n, n))
    for k in range(1, n + 1):
        for j in range(1, k + 1):
            denom = np.prod([nodes[j] - nodes[m] for m in range(k + 1) if m != j])
            weights[k - 1, j - 1] = fact[k - 1] / denom
    return weights


def _cumtrapz(y, x):
    xs = x.reshape((-1,) + (1,) * (y.ndim - 1))
    steps = 0.5 * (xs[1:] - xs[:-1]) * (y[1:] + y[:-1])
    return np.concatenate([np.zeros_like(y[:1]), np.cumsum(steps, axis=0)])


class _EMSIntegrals:
    """Segment integrals on the EMS grid between grid indices (trapezoid rule, as the official code)."""

    def __init__(self, ems: EMS):
        self.lam = ems.lambda_grid
        self.l = ems.l
        self.L = _cumtrapz(ems.l, self.lam)
        self.S = _cumtrapz(ems.s, self.lam)
        self.B = _cumtrapz(np.exp(-self.S) * ems.b, self.lam)
        self.shape = ems.shape
        self.idx = None

    def at(self, idx):
        """The same cumulative integrals, addressed by the grid indices ``idx`` of one time column."""
        column = object.__new__(_EMSIntegrals)
        column.__dict__.update(self.__dict__, idx=np.asarray(idx))
        return column

    def one_minus_l(self, p):
        return 1.0 - self.l[self.idx[p]]

    def segment(self, p_s, p_t):
        """ratio = e^{L_s - L_t}, [e^{L_s - L_t} E_k for k = 0..3], e^{L_s - L_t} F."""
        js, jt = self.idx[p_s], self.idx[p_t]
        lam = self.lam[js:jt + 1]
        offset = (lam - lam[0]).reshape((-1,) + (1,) * len(self.shape))
        weight = np.exp((self.L[js:jt + 1] - self.L[jt]) + (self.S[js:jt + 1] - self.S[js]))
        moments = [np.trapezoid(weight * offset ** k / math.factorial(k), lam, axis=0) for k in range(_MAX_K + 1)]
        bias = np.trapezoid(weight * np.exp(self.S[js]) * (self.B[js:jt + 1] - self.B[js]), lam, axis=0)
        return np.exp(self.L[js] - self.L[jt]), moments, bias

    def g_of_f(self, p_s, p_j):
        """(U, V) with g_j = U f_j - V relative to s: U = e^{S_s - S_j}, V = e^{S_s}(B_j - B_s)."""
        js, jj = self.idx[p_s], self.idx[p_j]
        return np.exp(self.S[js] - self.S[jj]), np.exp(self.S[js]) * (self.B[jj] - self.B[js])


class _DegenerateIntegrals:
    """l = 1, s = b = 0 in closed form: L = lam - lam_T, S = B = 0."""

    shape = ()

    def __init__(self, lams):
        self.lams = lams

    def one_minus_l(self, p):
        return np.float64(0.0)

    def segment(self, p_s, p_t):
        h = self.lams[p_t] - self.lams[p_s]
        return np.exp(-h), [h_phi(h, k) for k in range(_MAX_K + 1)], np.float64(0.0)

    def g_of_f(self, p_s, p_j):
        return np.float64(1.0), np.float64(0.0)


def _local_update(integrals, lams, alphas, s, t, base_pos, other_pos, point_of, pseudo, width):
    """(A, M [width, ...], c) with x_t = A x_s + sum_m M[m] F[m] + c, F[m] = f at point ``point_of(m)``."""
    ratio, moments, bias = integrals.segment(s, t)
    alpha_t = alphas[t]
    a = alpha_t / alphas[s] * ratio
    mix = np.zeros((width,) + integrals.shape)
    const = -alpha_t * bias * np.ones(integrals.shape)
    mix[base_pos] -= alpha_t * moments[0]
    if other_pos:
        points = [point_of(m) for m in other_pos]
        weights = derivative_weights(np.array([lams[p] - lams[s] for p in points]), pseudo)
        for j, (m, p) in enumerate(zip(other_pos, points)):
            coef = sum(moments[k] * weights[k - 1, j] for k in range(1, len(points) + 1))
            u, v = integrals.g_of_f(s, p)
            mix[m] -= alpha_t * coef * u
            mix[base_pos] += alpha_t * coef
            const = const + alpha_t * coef * v
    return a * np.ones(integrals.shape), mix, const


def _column_tables(integrals, lams, alphas, times, *, order, p_pseudo, use_corrector, c_pseudo,
                   lower_order_final, half, tail_steps):
    """Per-step coefficient tables for one time column (M steps, M + 1 snapped points)."""
    steps = lams.shape[0] - 1
    width = order + 1
    shape = integrals.shape
    tables = {"f_coef": np.zeros((steps,) + shape), "c_self": np.ones((steps,) + shape),
              "c_a": np.zeros((steps,) + shape), "c_m": np.zeros((steps, width) + shape),
              "c_c": np.zeros((steps,) + shape), "p_a": np.zeros((steps,) + shape),
              "p_m": np.zeros((steps, width) + shape), "p_c": np.zeros((steps,) + shape)}
    p_order = [min(order, i + 1) for i in range(steps)]
    if lower_order_final:
        p_order = [min(p, steps + tail_steps - i) for i, p in enumerate(p_order)]
    for i in range(steps):
        point_of = lambda m, i=i: i - m  # noqa: E731  (position m in the f history -> time point)
        tables["f_coef"][i] = integrals.one_minus_l(i) / alphas[i]
        if use_corrector and i >= 1 and (not half or times[i] <= HALF_T):
            c_order = p_order[i - 1] + int(c_pseudo)
            if c_order >= 2:  # order 1 would use g at s only: the corrector would repeat the predictor
                others = ([0] + list(range(2, order + 1)))[:c_order - 1]
                a, mix, const = _local_update(integrals, lams, alphas, i - 1, i, 1, others, point_of, c_pseudo, width)
                tables["c_self"][i] = 0.0
                tables["c_a"][i], tables["c_m"][i], tables["c_c"][i] = a, mix, const
        others = list(range(1, p_order[i]))
        a, mix, const = _local_update(integrals, lams, alphas, i, i + 1, 0, others, point_of, p_pseudo, width)
        tables["p_a"][i], tables["p_m"][i], tables["p_c"][i] = a, mix, const
    return tables


# ---------------------------------------------------------------------------------------------------
# Snapping to the EMS grid.
# ---------------------------------------------------------------------------------------------------

def snap_to_ems(ems: EMS, times):
    """(indices, snapped times) of decreasing ``times`` ([M+1] or [M+1, B]) on the EMS lambda grid.

    Raises ``ValueError`` if a time lies outside the EMS range or two times snap to the same grid point.
    """
    times = np.asarray(times, np.float64)
    lo, hi = ems.t_end * (1 - 1e-6), ems.t_start * (1 + 1e-6)
    if np.min(times) < lo or np.max(times) > hi:
        raise ValueError(
            f"dpm_solver_v3: sampling times span t in [{times.min():g}, {times.max():g}] but the EMS cover only "
            f"[{ems.t_end:g}, {ems.t_start:g}] (EMS for another range); compute the statistics over the sampling "
            "range (dpmjax.ems.compute_ems(..., t_start=, t_end=)) or sample within it")
    n = ems.num_grid
    # Fractional grid position by interpolation over the EMS's own (t, index) table: lambda is monotone in t
    # and the grid is fine, so the nearest lambda point is found without evaluating the schedule.
    pos = np.interp(times.ravel(), ems.t_grid[::-1], np.arange(n, -1, -1, dtype=np.float64)).reshape(times.shape)
    idx = np.clip(np.round(pos), 0, n).astype(np.int64)
    same = np.diff(idx, axis=0) <= 0
    if np.any(same):
        k = int(np.flatnonzero(same.reshape(same.shape[0], -1).any(axis=1))[0])
        raise ValueError(
            f"dpm_solver_v3: the EMS grid (N={n} intervals in lambda) is too coarse for {times.shape[0] - 1} "
            f"steps: times {k} and {k + 1} snap to the same grid point; use statistics with a finer grid "
            "(compute_ems(num_grid=...)) or fewer steps")
    return idx, ems.t_grid[idx]


def grid_dpm_solver_v3(schedule, num_steps, spacing, t_start, t_end, ems=None, **_):
    """The driver's grid for ``nfe``: the EMS range by default, snapped to the EMS grid."""
    if isinstance(ems, EMS):
        ems.check_schedule(schedule)
        t_start = ems.t_start if t_start is None else t_start
        t_end = ems.t_end if t_end is None else t_end
        ems.check_range(float(t_start), float(t_end))
    grid = time_grid(schedule, num_steps, spacing, t_start=t_start, t_end=t_end)
    if isinstance(ems, EMS):
        grid = snap_to_ems(ems, grid)[1]
    return grid


# ---------------------------------------------------------------------------------------------------
# The solver.
# ---------------------------------------------------------------------------------------------------

OPTIONS = ("ems", "order", "p_pseudo", "use_corrector", "c_pseudo", "lower_order_final", "half")
PREPARED_OPTIONS = ("ems", "p_pseudo", "use_corrector", "c_pseudo", "lower_order_final", "half")
_LEAD = {"c_m": 2, "p_m": 2}  # table axes before the batch axis: [steps, (width,) batch or 1, *stat_shape]


def _check_bool(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"solver 'dpm_solver_v3': {name} must be True or False, got {value!r}")
    return bool(value)


def make_dpm_solver_v3(schedule, num_steps: int, *, order: int = 3) -> Solver:
    """DPM-Solver-v3 multistep predictor(-corrector), one model call per step.

    Every step is x_t = A x_c + sum_j M_j f_j + c with f-history and corrector tables computed on the host by
    ``prepare_dpm_solver_v3`` (grid data ``grid["tables"]``, ``grid["stat_shape"]`` is implied by their shape).
    """
    name = "dpm_solver_v3"
    order = check_order(name, order, (1, 2, 3))
    width = order + 1

    def tables(grid, x):
        out = {}
        for k, v in grid["tables"].items():
            lead = _LEAD.get(k, 1)
            stat_ndim = v.ndim - lead - 1
            extra = x.ndim - 1 - stat_ndim
            out[k] = v.reshape(v.shape[:lead + 1] + (1,) * extra + v.shape[lead + 1:])
        return out

    def init(x_T, key, grid):
        stat_shape = grid["tables"]["f_coef"].shape[2:]
        if stat_shape and tuple(x_T.shape[1:]) != tuple(stat_shape):
            raise ValueError(f"solver {name!r}: x_T has data shape {tuple(x_T.shape[1:])} but the EMS were "
                             f"computed for {tuple(stat_shape)}")
        return V3State(x=x_T, x_prev=x_T, history=jnp.zeros((order + 1,) + x_T.shape, x_T.dtype))

    def query(state, i, grid):
        return state.x, grid["t"][i]

    def update(state, i, grid, out):
        tab = {k: v[i] for k, v in tables(grid, state.x).items()}
        f_i = tab["f_coef"].astype(state.x.dtype) * state.x - out.x0
        # write first, read after (no copy of the ring): f at t_i, t_{i-1}, .., t_{i-order} by lag
        history = jax.lax.dynamic_update_index_in_dim(state.history, f_i, ring_slot(i, order + 1), 0)
        f_all = [jax.lax.dynamic_index_in_dim(history, ring_slot(i - k, order + 1), 0, keepdims=False)
                 for k in range(width)]
        cast = {k: v.astype(state.x.dtype) for k, v in tab.items()}
        x_c = (cast["c_self"] * state.x + cast["c_a"] * state.x_prev
               + sum(cast["c_m"][m] * f_all[m] for m in range(width)) + cast["c_c"])  # corrector at t_i (or x_i)
        x_next = cast["p_a"] * x_c + sum(cast["p_m"][m] * f_all[m] for m in range(width)) + cast["p_c"]
        return V3State(x=x_next, x_prev=x_c, history=history)

    return Solver(num_model_calls=num_steps, init=init, query=query, update=update,
                  output=lambda state: state.x, uses="x0")


def prepare_dpm_solver_v3(schedule, times, *, ems: EMS | None = None, order: int = 3, p_pseudo: bool = False,
                          use_corrector: bool = True, c_pseudo: bool = True, lower_order_final: bool = True,
                          half: bool = False, tail_steps: int = 0) -> dict:
    """Grid data of DPM-Solver-v3: the times snapped to the EMS grid and the per-step coefficient tables.

    Args:
      ems: ``dpmjax.ems.EMS`` for this model and schedule; None: degenerate statistics (DPM-Solver++ form).
      order: predictor order 1, 2 or 3 (official default 3 unconditional, 2 guided).
      p_pseudo: pseudo-order predictor (divided differences; the paper's choice at 5 NFE on CIFAR-10).
      use_corrector: apply the corrector (official default on; "turn it off when the number of steps is large").
      c_pseudo: corrector of order predictor + 1 with pseudo-order derivatives (official default on); off:
        corrector of the predictor's order with exact derivatives.
      lower_order_final: lower the order near the end to the steps left (official default on).
      half: corrector only at t <= 0.5 (the paper's text; the official code uses t > 0.5, see module doc).
    The tables are computed on the host in float64 (quadrature over the EMS grid between snapped indices), so the
    times must be concrete; another grid of the same length gives new tables of the same shapes (no recompile).
    """
    name = "dpm_solver_v3"
    order = check_order(name, order, (1, 2, 3))
    flags = {k: _check_bool(k, v) for k, v in (("p_pseudo", p_pseudo), ("use_corrector", use_corrector),
                                                ("c_pseudo", c_pseudo), ("lower_order_final", lower_order_final),
                                                ("half", half))}
    if ems is not None and not isinstance(ems, EMS):
        raise ValueError(f"solver {name!r}: ems must be a dpmjax.ems.EMS (compute_ems / load_ems) or None, "
                         f"got {type(ems).__name__}")
    try:
        times = np.asarray(times, np.float64)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        raise ValueError(f"solver {name!r} needs concrete timesteps (they are snapped to the EMS grid and its "
                         "coefficients are computed on the host); do not pass traced timesteps") from None
    if ems is not None:
        ems.check_schedule(schedule)
        idx, times = snap_to_ems(ems, times)
        lams, alphas = ems.lambda_grid[idx], np.exp(ems.log_alpha_grid[idx])
    else:
        idx = None
        lams, log_alpha, _ = schedule_at(schedule, times)
        alphas = np.exp(log_alpha)
    per_sample = times.ndim == 2
    columns = range(times.shape[1]) if per_sample else [None]
    built = []
    cumulative = _EMSIntegrals(ems) if ems is not None else None
    for col in columns:
        pick = (lambda a: a[:, col]) if per_sample else (lambda a: a)  # noqa: E731
        integrals = cumulative.at(pick(idx)) if ems is not None else _DegenerateIntegrals(pick(lams))
        built.append(_column_tables(integrals, pick(lams), pick(alphas), pick(times), order=order,
                                    tail_steps=int(tail_steps), **flags))
    # Host layout [steps, (width,) batch or 1, *stat_shape]; trailing unit axes are added at trace time.
    host = {k: np.stack([b[k] for b in built], axis=_LEAD.get(k, 1)) for k in built[0]}
    return {"t": times, "tables": host}
