"""Pseudo numerical methods (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds").

PNDM replaces the Euler increment of a classical ODE method by the DDIM "transfer" step (eq. 9 there),

    phi(x_s, e, s -> t) = (alpha_t/alpha_s) x_s - sigma_t (e^{lambda_t - lambda_s} - 1) e,

which is DDIM with eta = 0 (= DPM-Solver-1), and combines noise predictions e as a classical method combines
slopes (eqs. 11-13). With e_i the model's eps at (x_i, t_i):

  ``pndm`` (F-PNDM, eqs. 12-13): the first 3 steps are pseudo Runge-Kutta 4 (4 model calls each),
      e1 = eps(x_i, t_i),           x' = phi(x_i, e1, t_i -> m_i),
      e2 = eps(x', m_i),            x'' = phi(x_i, e2, t_i -> m_i),
      e3 = eps(x'', m_i),           x''' = phi(x_i, e3, t_i -> t_{i+1}),
      e4 = eps(x''', t_{i+1}),      x_{i+1} = phi(x_i, (e1 + 2 e2 + 2 e3 + e4)/6, t_i -> t_{i+1}),
    only e1 entering the history; afterwards pseudo linear multistep (Adams-Bashforth 4)
      x_{i+1} = phi(x_i, (55 e_i - 59 e_{i-1} + 37 e_{i-2} - 9 e_{i-3})/24, t_i -> t_{i+1}).
    NFE = steps + 9 (12 for the 3 Runge-Kutta steps + 1 per later step).
  ``s_pndm`` (S-PNDM, paper Sec. 4): first step pseudo improved Euler,
      e1 = eps(x_0, t_0), e2 = eps(phi(x_0, e1, t_0 -> t_1), t_1), x_1 = phi(x_0, (e1 + e2)/2, t_0 -> t_1),
    then pseudo AB2, e' = (3 e_i - e_{i-1})/2. NFE = steps + 1.
  ``plms``: diffusers' ``PNDMScheduler(skip_prk_steps=True)`` (the Stable Diffusion default): the same first
    step as S-PNDM, then AB2 (3, -1)/2, AB3 (23, -16, 5)/12 and from the 4th step AB4. NFE = steps + 1.

Midpoint. We use the time midpoint m_i = (t_i + t_{i+1})/2 of the continuous grid. The official code takes
(k_i + k_{i+1})/2 in integer timesteps (the model sees it unrounded, alphas_cumprod is read at its floor);
diffusers (``skip_prk_steps=False``) takes k_i - (N // steps) // 2. All three agree on a ``DiscreteVP`` grid
of integer timesteps with an even spacing; for an odd spacing diffusers' midpoint is half a training step
nearer t_i. diffusers' PNDM always steps from k to k - N // steps, so it matches ours (and is consistent at
all) only on grids with that constant spacing: "leading", or "trailing" when steps divides N; with "linspace"
it moves the sample to k - N // steps but evaluates the model at the next grid timestep.

Order. The multistep coefficients are the constant-step ones, applied on any grid (as the official code and
diffusers do). Since phi integrates dy/d(sigma_ve) = eps exactly for constant eps (y = x/alpha,
sigma_ve = sigma/alpha), the local error of a step holds the term (1/h) int (sigma_ve' - mean) (eps - mean),
which is O(h^3) unless the grid is uniform in sigma_ve: on the usual grids (logSNR, time-uniform, diffusers'
integer timesteps) all three methods are second order, F-PNDM with a much smaller constant (measured in
``tests/test_pndm_karras.py``). The time midpoint is likewise off the sigma_ve midpoint by O(h^2), which
also limits pseudo-RK4 to a local error O(h^3) (only 3 such steps are taken).

Each scan iteration makes exactly one model call: a static table maps iteration j -> (step, stage), the
time fraction of the evaluation in its step, the weight of its eps in the step's combined e', and the
multistep weights of older history entries.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dpmjax.samplers.base import Solver, at_time, combine_lags, expand_like, ring_slot

# Adams-Bashforth weights (most recent first) of the pseudo linear multistep step.
ADAMS_BASHFORTH = {
    1: (1.0,),
    2: (3.0 / 2.0, -1.0 / 2.0),
    3: (23.0 / 12.0, -16.0 / 12.0, 5.0 / 12.0),
    4: (55.0 / 24.0, -59.0 / 24.0, 37.0 / 24.0, -9.0 / 24.0),
}
RUNGE_KUTTA_STEPS = 3  # F-PNDM's pseudo-RK4 warm-up steps (official ``len(ets) > 2``; diffusers' 12 PRK calls)
METHODS = ("pndm", "s_pndm", "plms")

# One model call per stage: (fraction of the step where it evaluates, fraction where its eps moves the next
# query point (1 for the step's last stage), weight of its eps in the step's combined e').
_RK4_STAGES = ((0.0, 0.5, 1.0 / 6.0), (0.5, 0.5, 1.0 / 3.0), (0.5, 1.0, 1.0 / 3.0), (1.0, 1.0, 1.0 / 6.0))
_HEUN_STAGES = ((0.0, 1.0, 0.5), (1.0, 1.0, 0.5))


class PNDMState(NamedTuple):
    x: jax.Array        # [B, ...] sample at the start of the current step, x_i
    x_eval: jax.Array   # [B, ...] where the next model call evaluates
    acc: jax.Array      # [B, ...] weighted sum of the current step's stage outputs so far
    history: jax.Array  # [H, B, ...] ring buffer of the steps' first-stage eps (step i's in slot i % H)


class StageTable(NamedTuple):
    """Static per-iteration plan (numpy; one row per model call)."""

    step: np.ndarray        # [NFE] int32, grid interval i of the call
    first: np.ndarray       # [NFE] bool, first stage of its step (its eps enters the history)
    last: np.ndarray        # [NFE] bool, last stage of its step (the step completes)
    frac: np.ndarray        # [NFE] evaluation time t_i + frac (t_{i+1} - t_i)
    next_frac: np.ndarray   # [NFE] the next query point is phi(x_i, ., t_i -> t_i + next_frac (t_{i+1} - t_i))
    weight: np.ndarray      # [NFE] weight of this call's eps in the step's e'
    hist_weight: np.ndarray  # [NFE, H] weights of history entries 1..H-1 (entry 0 is this call's own eps)


def history_size(method: str) -> int:
    return 2 if method == "s_pndm" else 4


def stage_table(method: str, num_steps: int) -> StageTable:
    """The static plan of ``method`` over ``num_steps`` grid intervals (host-side numpy)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    size = history_size(method)
    rows = []  # (step, first, last, frac, next_frac, weight, hist_weights)
    for i in range(num_steps):
        if method == "pndm" and i < RUNGE_KUTTA_STEPS:
            stages = _RK4_STAGES
        elif method != "pndm" and i == 0:
            stages = _HEUN_STAGES
        else:
            if method == "pndm":
                order = 4
            elif method == "s_pndm":
                order = 2
            else:
                order = min(i + 1, 4)
            coefs = ADAMS_BASHFORTH[order]
            hist = np.zeros(size)
            hist[1:order] = coefs[1:]
            rows.append((i, True, True, 0.0, 1.0, coefs[0], hist))
            continue
        for k, (frac, next_frac, weight) in enumerate(stages):
            rows.append((i, k == 0, k == len(stages) - 1, frac, next_frac, weight, np.zeros(size)))
    cols = list(zip(*rows))
    return StageTable(step=np.array(cols[0], np.int32), first=np.array(cols[1], bool),
                      last=np.array(cols[2], bool), frac=np.array(cols[3]), next_frac=np.array(cols[4]),
                      weight=np.array(cols[5]), hist_weight=np.stack(cols[6]))


def num_model_calls(method: str, num_steps: int) -> int:
    if method == "pndm":
        rk = min(num_steps, RUNGE_KUTTA_STEPS)
        return 4 * rk + (num_steps - rk)
    return num_steps + 1


def transfer(x, eps, s, t):
    """PNDM's transfer phi(x_s, eps, s -> t) = DDIM: (alpha_t/alpha_s) x_s - sigma_t expm1(lambda_t - lambda_s) eps."""
    return expand_like(t.alpha / s.alpha, x) * x - expand_like(t.sigma * jnp.expm1(t.lam - s.lam), x) * eps


def make_pndm_family(schedule, num_steps: int, method: str) -> Solver:
    """One of ``METHODS`` over ``num_steps`` grid intervals (the grid, [N+1] or [N+1, B], is the step's data)."""
    table = stage_table(method, num_steps)
    size = history_size(method)
    step_of, first_of, last_of = (jnp.asarray(a) for a in (table.step, table.first, table.last))

    def time_at(times, i, frac):
        # (1 - f) t_i + f t_{i+1}: exactly t_i for f = 0 and t_{i+1} for f = 1.
        frac = frac.astype(times.dtype)
        return (1.0 - frac) * times[i] + frac * times[i + 1]

    def init(x_T, key, grid):
        zeros = jnp.zeros_like(x_T)
        return PNDMState(x=x_T, x_eval=x_T, acc=zeros, history=jnp.zeros((size,) + x_T.shape, x_T.dtype))

    def query(state, j, grid):
        return state.x_eval, time_at(grid["t"], step_of[j], jnp.asarray(table.frac)[j])

    def update(state, j, grid, out):
        x, eps, times = state.x, out.eps, grid["t"]
        i, first, last = step_of[j], first_of[j], last_of[j]
        # the step's first-stage eps enters the history ring (slot i % size), written in place
        slot = ring_slot(i, size)
        kept = jax.lax.dynamic_index_in_dim(state.history, slot, 0, keepdims=False)
        history = jax.lax.dynamic_update_index_in_dim(state.history, jnp.where(first, eps, kept), slot, 0)
        weight = jnp.asarray(table.weight)[j]
        acc = state.acc + expand_like(weight, eps) * eps
        older = jnp.asarray(table.hist_weight)[j][1:]  # lags 1.. of step i (lag 0, its own eps, is in acc)
        direction = jnp.where(last, acc + combine_lags(history, older, i - 1), eps)
        s = at_time(schedule, times[i])
        t = at_time(schedule, time_at(times, i, jnp.asarray(table.next_frac)[j]))
        x_new = transfer(x, direction, s, t)
        return PNDMState(x=jnp.where(last, x_new, x), x_eval=x_new,
                         acc=jnp.where(last, jnp.zeros_like(acc), acc), history=history)

    return Solver(num_model_calls=num_model_calls(method, num_steps), init=init, query=query, update=update,
                  output=lambda state: state.x, uses="eps")


def pndm_steps_for_nfe(nfe, **_):
    return nfe - 4 * RUNGE_KUTTA_STEPS + RUNGE_KUTTA_STEPS


def make_pndm(schedule, num_steps: int) -> Solver:
    """F-PNDM: 3 pseudo-RK4 steps, then pseudo AB4 (Liu et al. 2022, eqs. 12-13); NFE = steps + 9.

    ``nfe`` = 12 gives 3 pseudo-RK4 steps only (diffusers needs >= 4 steps, i.e. nfe >= 13); an explicit
    grid of 1 or 2 steps costs 4 calls per step.
    """
    return make_pndm_family(schedule, num_steps, "pndm")


def make_s_pndm(schedule, num_steps: int) -> Solver:
    """S-PNDM: a pseudo improved-Euler first step, then pseudo AB2 (Liu et al. 2022, Sec. 4); NFE = steps + 1."""
    return make_pndm_family(schedule, num_steps, "s_pndm")


def make_plms(schedule, num_steps: int) -> Solver:
    """PLMS as diffusers' PNDMScheduler(skip_prk_steps=True): improved-Euler first step, then AB2, AB3, AB4."""
    return make_pndm_family(schedule, num_steps, "plms")
