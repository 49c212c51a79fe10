"""UniPC: the unified predictor-corrector multistep sampler (Zhao et al. 2023), orders 1-3.

One step of order p from s = t_{i-1} (history m_0 at s, m_k at s_k = t_{i-1-k}) to t = t_i, with
h = lambda_t - lambda_s, hh = -h and (c, ratio) = (alpha_t, sigma_t / sigma_s) for data prediction
(``predict_x0=True``, m = x0) or hh = h and (c, ratio) = (sigma_t, alpha_t / alpha_s) for noise prediction:

    base = ratio x_s - c (e^{hh} - 1) m_0
    r_k  = (lambda_{s_k} - lambda_s) / h  (k = 1..p-1, negative),   D_k = (m_k - m_0) / r_k
    B(h) = hh ("bh1") or e^{hh} - 1 ("bh2")
    g_j  = j! h phi_{j+1}(hh),  h phi_1 = e^{hh} - 1,  h phi_{j+1} = h phi_j / hh - 1/j!   (j = 1..3)

  UniP-p (predictor):  x~_t = base - c B(h) sum_{k<p} rho^p_k D_k,
      rho^p solves sum_k rho_k r_k^{j-1} = g_j / B(h) for j = 1..p-1; p = 2 uses rho^p = [1/2] (the paper's
      simplified order-2 choice, which makes UniP-2/bh2 the DPM-Solver++(2M) step);
  UniC-p (corrector):  x^c_t = base - c B(h) (sum_{k<p} rho^c_k D_k + rho^c_p (m_t - m_0)),  m_t = m(x~_t, t),
      rho^c solves the same system on the nodes (r_1, .., r_{p-1}, 1) for j = 1..p; p = 1 uses rho^c = [1/2].
(Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion Models",
Sec. 3; the stored history value for t is m_t at the *uncorrected* x~_t, so UniC costs no model call.)
The linear systems are tiny Vandermonde systems, solved in closed form by Lagrange interpolation. Since the
rho's are linear in b = g / B(h), B(h) cancels from every solved coefficient: bh1 and bh2 differ only
where rho = 1/2 is hard-coded (UniP-2, UniC-1).

Scan layout (one model call per iteration): iteration i evaluates the model at the predictor's x~_{t_i};
its update (a) applies UniC-p_{i-1} to get the corrected x_{t_i} (skipped at i = 0, when
``use_corrector=False`` and when i - 1 is in ``disable_corrector``), then (b) runs UniP-p_i from the
corrected x_{t_i} to t_{i+1}. The last grid point is never corrected (it has no model call), as in the paper.

Step order p_i = min(order, i + 1) (warm-up), and with ``lower_order_final`` min(p_i, steps remaining),
counting the driver's final step to sigma = 0 (``tail_steps``). Unlike diffusers' DPM-Solver (and our
``dpm_solver`` module), the official UniPC code and diffusers' ``UniPCMultistepScheduler`` apply this
always, with no "fewer than 15 steps" gate; we follow them.

Parity with diffusers' ``UniPCMultistepScheduler`` (``solver_order``, ``solver_type``, ``predict_x0``,
``disable_corrector`` -> ``order``, ``variant``, ``predict_x0``, ``disable_corrector``; our iteration i is its
``step_index``; its ``final_sigmas_type`` "zero"/"sigma_min" is the driver's ``final_sigma`` "zero"/"t_end"):
equal to ~1e-15 in float64 (tests/test_unipc.py). Where diffusers' last step goes to sigma = 0 we do what the
step means rather than what its arithmetic gives: the driver's final call returns the x0-prediction at the
last (uncorrected) sample, which is diffusers' value whenever that is finite. diffusers 0.42 returns NaN for
"bh1" (B(h) * 0 with B(h) = hh = -inf) and inf, or a singular-matrix error at order 3, with
``lower_order_final=False`` (r_k = (lambda_{s_k} - lambda_s)/inf = 0 divides D_k); with the driver every
combination is finite.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dpmjax.samplers.base import Coefficients, Solver, at_time, check_flag, check_order, combine_lags, expand_like, \
    ring_slot

VARIANTS = ("bh1", "bh2")
_SERIES_BELOW = 0.5  # |hh| below which h phi_k comes from its Taylor series (cancellation-free)
_SERIES_TERMS = 12   # truncation error < 1e-14 relative at |hh| = 0.5


class UniPCState(NamedTuple):
    x: jax.Array        # [B, ...] predictor output x~ at t_i: where iteration i evaluates the model
    x_prev: jax.Array   # [B, ...] corrected sample at t_{i-1}: the start of the step UniC redoes
    history: jax.Array  # [order + 1, B, ...] ring buffer of model outputs (step j's in slot j % (order + 1))


def h_phis(hh):
    """(h phi_2, h phi_3, h phi_4)(hh), where h phi_{k+1}(z) = sum_{n>=1} z^n / (n + k)!.

    The upward recursion h phi_{k+1} = h phi_k / z - 1/k! cancels (its rounding error grows like eps / |z|^k:
    20% for h phi_4 in float32 at z = 0.02, i.e. 1000 steps). Below |z| = 0.5 we sum the series of h phi_4 and
    go down with h phi_k = z (h phi_{k+1} + 1/k!), which does not cancel. Both branches stay finite for any z,
    so gradients through the unselected one are not NaN.
    """
    small = jnp.abs(hh) < _SERIES_BELOW
    z = jnp.where(small, jnp.ones_like(hh), hh)    # the recursion never divides by ~0
    zs = jnp.where(small, hh, jnp.zeros_like(hh))  # the series never sees a large z
    up, value = [], jnp.expm1(z)
    for k in (1, 2, 3):
        value = value / z - 1.0 / math.factorial(k)
        up.append(value)
    series = jnp.zeros_like(zs)
    for n in range(_SERIES_TERMS, 0, -1):  # Horner: z (1/4! + z (1/5! + ...))
        series = zs * (1.0 / math.factorial(n + 3) + series)
    phi_3 = zs * (series + 1.0 / 6.0)
    down = [zs * (phi_3 + 0.5), phi_3, series]
    return tuple(jnp.where(small, d, u) for d, u in zip(down, up))


def _lagrange_weights(nodes, g):
    """w with sum_k w_k nodes_k^j = g_{j+1} for j = 0..len(nodes)-1 (1 to 3 distinct nodes).

    w_k = sum_j g_{j+1} [x^j] L_k(x), L_k the Lagrange basis polynomial of node k.
    """
    n = len(nodes)
    weights = []
    for k in range(n):
        others = [nodes[m] for m in range(n) if m != k]
        if n == 1:
            weights.append(g[0])
        elif n == 2:
            (a,) = others
            weights.append((g[1] - a * g[0]) / (nodes[k] - a))
        else:
            a, c = others
            weights.append((g[2] - (a + c) * g[1] + a * c * g[0]) / ((nodes[k] - a) * (nodes[k] - c)))
    return weights


def unipc_weights(lambdas, s, t, step_order, order: int, *, data: bool, variant: str, corrector: bool = False):
    """(ratio, w, w_t): one UniP-p step (``corrector=False``) or UniC-p correction as a linear combination

        x_t = ratio x_s + sum_k w[k] m_k (+ w_t m_t),

    with m_k the history by lag (m_0 at s, m_1, ... earlier; [order, B, ...]) and m_t the model output at the
    predicted x~_t (corrector only). ``lambdas`` [order(, B)] are lambda at the history points; s, t the
    Coefficients at both ends; ``step_order`` (traced, 1..order) selects p. History entries beyond p get weight 0.
    """
    h = t.lam - s.lam
    hh = -h if data else h
    c = t.alpha if data else t.sigma
    ratio = t.sigma / s.sigma if data else t.alpha / s.alpha
    e = jnp.expm1(hh)
    b_h = hh if variant == "bh1" else e
    g = [f * k for f, k in zip(h_phis(hh), (1.0, 2.0, 6.0))]  # g_j = j! h phi_{j+1}(hh)

    # r_k for the history points in use; unused ones get distinct placeholders (-1, r_1 - 1) so that no
    # unselected coefficient divides by zero.
    r = []
    for k in range(1, order):
        r_k = (lambdas[k] - lambdas[0]) / h
        placeholder = -1.0 if k == 1 else r[-1] - 1.0
        r.append(jnp.where(step_order > k, r_k, placeholder))

    # rho-weights (B(h) rho) of D_k = (m_k - m_0) / r_k, for each order p, selected by jnp.where on scalars.
    zero = jnp.zeros_like(h)
    w = [zero for _ in r]
    w_t = zero
    if not corrector:
        if order >= 2:
            w[0] = jnp.where(step_order == 2, 0.5 * b_h, w[0])
        if order >= 3:
            w3 = _lagrange_weights(r[:2], g)
            w = [jnp.where(step_order == 3, w3[k], w[k]) for k in range(2)]
    else:
        w_t = jnp.where(step_order == 1, 0.5 * b_h, zero)
        for p in range(2, order + 1):
            wp = _lagrange_weights(r[:p - 1] + [jnp.ones_like(h)], g)
            w = [jnp.where(step_order == p, wp[k], w[k]) if k < p - 1 else w[k] for k in range(len(r))]
            w_t = jnp.where(step_order == p, wp[-1], w_t)

    # x_t = ratio x_s - c e m_0 - c (sum_k w_k (m_k - m_0) / r_k + w_t (m_t - m_0)), regrouped by m.
    by_d = [w_k / r_k for w_k, r_k in zip(w, r)]
    lag0 = -c * e + c * (sum(by_d, zero) + w_t)
    weights = jnp.stack([lag0] + [-c * v for v in by_d])
    return ratio, weights, -c * w_t


def unipc_order(i, order: int, num_steps: int, lower_order_final: bool, tail_steps: int = 0):
    """p_i = min(order, i + 1), and with ``lower_order_final`` min(p_i, num_steps + tail_steps - i)."""
    step_order = jnp.minimum(order, i + 1)
    if lower_order_final:
        step_order = jnp.minimum(step_order, num_steps + tail_steps - i)
    return step_order


def make_unipc(schedule, num_steps: int, *, order: int = 2, variant: str = "bh2", predict_x0: bool = True,
               use_corrector: bool = True, lower_order_final: bool = True, disable_corrector=(),
               tail_steps: int = 0) -> Solver:
    """Multistep UniPC-p (UniP-p predictor + UniC-p corrector), one model call per step.

    Args:
      order: 1, 2 or 3 (diffusers' default 2 for guided sampling; the paper's CIFAR-10 recipe uses 3).
      variant: "bh2" (B(h) = e^{hh} - 1, diffusers' default) or "bh1" (B(h) = hh, the official default;
        recommended for unconditional sampling with < 10 steps).
      predict_x0: True updates with data predictions (UniPC's "data_prediction"), False with noise.
      use_corrector: False gives the plain UniP-p multistep predictor.
      lower_order_final: lower the order near the end to the number of steps left (always, as the official
        code and diffusers do).
      disable_corrector: iteration indices j whose predicted x~_{t_{j+1}} is not corrected (diffusers'
        ``disable_corrector``: at its ``step_index`` i the corrector is skipped when i - 1 is listed).
      tail_steps: steps run after this solver (the driver passes 1 for its final step to sigma = 0).
    """
    name = "unipc"
    check_order(name, order, (1, 2, 3))
    if variant not in VARIANTS:
        raise ValueError(f"solver 'unipc': variant must be one of {VARIANTS}, got {variant!r}")
    data = check_flag(name, "predict_x0", predict_x0)
    check_flag(name, "use_corrector", use_corrector)
    check_flag(name, "lower_order_final", lower_order_final)
    disabled = _check_disabled(disable_corrector)

    size = order + 1  # ring of the last order + 1 outputs: the corrector's oldest entry survives m_t's write

    def init(x_T, key, grid):
        return UniPCState(x=x_T, x_prev=x_T, history=jnp.zeros((size,) + x_T.shape, x_T.dtype))

    def query(state, i, grid):
        return state.x, grid["t"][i]

    def update(state, i, grid, out):
        t_next, t_i, s, lam = step_points(schedule, grid["t"], i, order, num_steps)
        m_t = out.x0 if data else out.eps
        # write first, read after: both combinations below read the updated ring (no copy of the history)
        history = jax.lax.dynamic_update_index_in_dim(state.history, m_t, ring_slot(i, size), 0)

        # (a) UniC-p_{i-1}: redo the step t_{i-1} -> t_i with the fresh m_t at the predicted x~_{t_i}, from the
        # outputs of steps i - 1, i - 2, .. (lag 0 = step i - 1).
        x = state.x
        if use_corrector:
            apply = i >= 1
            if disabled:
                apply = apply & ~jnp.any(i - 1 == jnp.asarray(disabled, i.dtype))
            p_prev = unipc_order(jnp.maximum(i - 1, 0), order, num_steps, lower_order_final, tail_steps)
            ratio, w, w_t = unipc_weights(lam[1:].at[0].set(s.lam), s, t_i, p_prev, order, data=data,
                                          variant=variant, corrector=True)
            corrected = (expand_like(ratio, x) * state.x_prev + combine_lags(history, w, i - 1)
                         + expand_like(w_t, x) * m_t)
            x = jnp.where(apply, corrected, x)

        # (b) UniP-p_i from the corrected x_{t_i} to t_{i+1}.
        p = unipc_order(i, order, num_steps, lower_order_final, tail_steps)
        ratio, w, _ = unipc_weights(lam[:order], t_i, t_next, p, order, data=data, variant=variant)
        x_next = expand_like(ratio, x) * x + combine_lags(history, w, i)
        return UniPCState(x=x_next, x_prev=x, history=history)

    return Solver(num_model_calls=num_steps, init=init, query=query, update=update,
                  output=lambda state: state.x, uses="x0" if data else "eps")


def step_points(schedule, times, i, order: int, num_steps: int):
    """Coefficients at t_{i+1}, t_i and t_{i-1} (at i = 0 a stand-in with lambda_i - 1, so the unselected
    corrector branch stays finite), and lambda at t_i, t_{i-1}, .., t_{i-order} ([order + 1(, B)]), from one
    ``at_time`` call on indices clamped to the grid (clamped points only feed unselected branches)."""
    idx = jnp.clip(i - jnp.arange(-1, order + 1, dtype=i.dtype), 0, num_steps)
    grid = at_time(schedule, times[idx])
    at = [Coefficients(*(field[j] for field in grid)) for j in range(3)]
    t_next, t_i = at[0], at[1]
    s = at[2]._replace(lam=jnp.where(i >= 1, at[2].lam, t_i.lam - 1.0))
    return t_next, t_i, s, grid.lam[1:]


def _check_disabled(disable_corrector):
    try:
        disabled = tuple(disable_corrector)
    except TypeError:
        disabled = None
    if disabled is None or isinstance(disable_corrector, str) or not all(
            isinstance(j, int) and not isinstance(j, bool) and j >= 0 for j in disabled):
        raise ValueError("solver 'unipc': disable_corrector must be a sequence of non-negative integer step indices, "
                         f"got {disable_corrector!r}")
    return disabled
