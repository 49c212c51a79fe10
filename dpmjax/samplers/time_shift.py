"""Time-Shift sampler (Li et al., ICLR 2024, "Alleviating Exposure Bias in Diffusion Models through Sampling
with Shifted Time Steps"): ``ts_ddim``, ``ts_s_pndm``, ``ts_pndm`` (F-PNDM) and ``ts_dpm_solver``.

Exposure bias makes the variance of a generated x_{t_i} differ from the noise level sigma_{t_i}^2 that the
network expects there. Before step i (at the first model call of the step), if the grid time t_i lies above
the cutoff, each sample b is given its own time

    t'_{i,b} = argmin_{t' in window(t_i)} (Var(x_{i,b}) - sigma_{t'}^2)^2,
    window(t_i) = {t_i + m / T : m = -w/2 .. w/2, inside the schedule's time range},

with Var over all entries of the sample and T the number of training steps (1000 for continuous schedules).
On a ``DiscreteVP`` with t = (k + 1)/T this is the paper's rule on integer timesteps k (the official code's
window [k - w/2, k + w/2], cutoff on k). t'_{i,b} replaces t_i for that sample everywhere the base solver uses
it: the model-evaluation time, the start time of the step (alpha_s, sigma_s, lambda_s), and, for multistep
methods, the stored history time (the official DPM-Solver integration does likewise). The base solvers are
reused unchanged: the wrapper keeps a per-sample grid [N+1, B] in its state and rebuilds the base solver's
closures on that grid (the factories only read ``timesteps.shape`` at build time).

Design: one wrapper (``time_shifted``) over any factory with the ``x`` field as the sample at the start of the
current step, registered under ``ts_<base>``; ``window=0`` or a cutoff at or above T reproduces the base
sampler exactly (tests/test_time_shift.py).

Defaults (samplers.md sec. 7, the official README): F-PNDM window 5, cutoff 550 (100 steps); DPM-Solver
window 30, cutoff 300 (5 steps). For DDIM and S-PNDM, which the README gives no low-step setting for, we use
the DPM-Solver setting (window 30, cutoff 300), meant for few steps.
The ES (epsilon scaling) companion option of the official code is not implemented.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dpmjax.samplers import ddim, dpm_solver, pndm
from dpmjax.samplers.base import Solver, register

DEFAULTS = {"ddim": (30, 300), "s_pndm": (30, 300), "pndm": (5, 550), "dpm_solver": (30, 300)}


class TimeShiftState(NamedTuple):
    base: tuple      # the base solver's state
    grid: jax.Array  # [N+1, B] per-sample times, shifted entries written as the steps reach them


def _train_steps(schedule) -> int:
    return int(getattr(schedule, "num_train_timesteps", 1000))


def check_window(schedule, timesteps, window, cutoff, name):
    """Validate (window, cutoff) on the host: ValueError naming the argument."""
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 0:
        raise ValueError(f"{name}: window must be a non-negative integer (training steps), got {window!r}")
    if isinstance(cutoff, bool) or not isinstance(cutoff, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name}: cutoff must be a number (training-step index), got {cutoff!r}")
    if isinstance(timesteps, jax.core.Tracer) or window == 0:
        return
    n_train = _train_steps(schedule)
    grid = np.asarray(timesteps, np.float64)
    grid = grid if grid.ndim == 1 else grid[:, 0]
    k = grid * n_train - 1.0
    shifted = k[:-1] > cutoff
    if np.any(shifted):
        gaps = np.abs(np.diff(k))  # gaps[i]: training steps between t_i and t_{i+1}
        # a shifted t_i must stay between its neighbours t_{i-1} and t_{i+1}
        gap = np.minimum(gaps, np.concatenate([[np.inf], gaps[:-1]]))[shifted].min()
        if window / 2 >= gap:
            raise ValueError(f"{name}: window={window} is larger than the steps it shifts: half the window must be "
                             f"below the smallest grid interval of a shifted step ({gap:g} training steps); use "
                             "a smaller window or fewer steps")


def shift_times(schedule, x, t, window: int, cutoff):
    """Per-sample t' (shape [B]) of the window around t (scalar or [B]) matching Var(x_b) (see module doc)."""
    n_train = _train_steps(schedule)
    batch = x.shape[0]
    t = jnp.broadcast_to(jnp.asarray(t, x.dtype), (batch,))
    if window == 0:
        return t
    lo, hi = schedule.time_range if hasattr(schedule, "time_range") else (1.0 / n_train, 1.0)
    offsets = jnp.arange(-(window // 2), window // 2 + 1, dtype=x.dtype) / n_train
    cand = jnp.clip(t[:, None] + offsets[None, :], lo, hi)                       # [B, W]
    var = jnp.var(x.reshape(batch, -1), axis=1)                                    # [B]
    noise = jnp.exp(2.0 * schedule.log_sigma(cand)).astype(x.dtype)             # sigma^2 = 1 - alpha_bar
    best = jnp.take_along_axis(cand, jnp.argmin((var[:, None] - noise) ** 2, axis=1)[:, None], 1)[:, 0]
    active = t * n_train - 1.0 > cutoff
    return jnp.where(active, best, t)


def time_shifted(schedule, timesteps, make_base, *, window: int, cutoff, step_of, name: str) -> Solver:
    """Wrap ``make_base(schedule, grid)``; ``step_of(j) -> (step i, first call of the step)`` for iteration j."""
    check_window(schedule, timesteps, window, cutoff, name)
    probe = make_base(schedule, timesteps)

    def base_on(grid):
        return make_base(schedule, grid)

    def init(x_T, key):
        grid = jnp.broadcast_to(timesteps.reshape(timesteps.shape[0], -1), (timesteps.shape[0], x_T.shape[0]))
        return TimeShiftState(base=probe.init(x_T, key), grid=grid.astype(x_T.dtype))

    def grid_now(state, j):
        i, first = step_of(j)
        x = state.base.x
        new = shift_times(schedule, x, timesteps[i], window, cutoff)
        return state.grid.at[i].set(jnp.where(first, new, state.grid[i]))

    def query(state, j):
        return base_on(grid_now(state, j)).query(state.base, j)

    def update(state, j, out):
        grid = grid_now(state, j)
        return TimeShiftState(base=base_on(grid).update(state.base, j, out), grid=grid)

    return Solver(num_model_calls=probe.num_model_calls, init=init, query=query, update=update,
                  output=lambda state: probe.output(state.base), uses=probe.uses)


def _every_call(j):
    return j, jnp.asarray(True)


def _pndm_steps(method, timesteps):
    table = pndm.stage_table(method, timesteps.shape[0] - 1)
    return lambda j: (jnp.asarray(table.step)[j], jnp.asarray(table.first)[j])


@register("ts_ddim", options=("window", "cutoff"))
def make_ts_ddim(schedule, timesteps, window: int = DEFAULTS["ddim"][0], cutoff=DEFAULTS["ddim"][1]) -> Solver:
    """TS-DDIM: deterministic DDIM (eta = 0) with per-sample shifted times."""
    return time_shifted(schedule, timesteps, lambda s, g: ddim.make_ddim(s, g), window=window, cutoff=cutoff,
                        step_of=_every_call, name="ts_ddim")


@register("ts_pndm", options=("window", "cutoff"), steps_for_nfe=pndm._pndm_steps_for_nfe,
          min_nfe=lambda **_: 4 * pndm.RUNGE_KUTTA_STEPS)
def make_ts_pndm(schedule, timesteps, window: int = DEFAULTS["pndm"][0], cutoff=DEFAULTS["pndm"][1]) -> Solver:
    """TS-F-PNDM (the paper's headline sampler)."""
    return time_shifted(schedule, timesteps, lambda s, g: pndm.make_pndm_family(s, g, "pndm"), window=window,
                        cutoff=cutoff, step_of=_pndm_steps("pndm", timesteps), name="ts_pndm")


@register("ts_s_pndm", options=("window", "cutoff"), steps_for_nfe=lambda nfe, **_: nfe - 1,
          min_nfe=lambda **_: 2)
def make_ts_s_pndm(schedule, timesteps, window: int = DEFAULTS["s_pndm"][0],
                   cutoff=DEFAULTS["s_pndm"][1]) -> Solver:
    """TS-S-PNDM."""
    return time_shifted(schedule, timesteps, lambda s, g: pndm.make_pndm_family(s, g, "s_pndm"), window=window,
                        cutoff=cutoff, step_of=_pndm_steps("s_pndm", timesteps), name="ts_s_pndm")


@register("ts_dpm_solver", options=("window", "cutoff", "order", "lower_order_final", "_tail_steps"))
def make_ts_dpm_solver(schedule, timesteps, window: int = DEFAULTS["dpm_solver"][0],
                       cutoff=DEFAULTS["dpm_solver"][1], order: int = 2, lower_order_final: bool = True,
                       _tail_steps: int = 0) -> Solver:
    """TS-DPM-Solver: multistep DPM-Solver (noise prediction, ``order`` 1-3) with shifted times."""
    def make(s, g):
        return dpm_solver.make_multistep(s, g, order=order, data=False, lower_order_final=lower_order_final,
                                         _tail_steps=_tail_steps, name="ts_dpm_solver")
    return time_shifted(schedule, timesteps, make, window=window, cutoff=cutoff, step_of=_every_call,
                        name="ts_dpm_solver")
