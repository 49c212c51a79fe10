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
reused unchanged: the wrapper keeps a per-sample grid [N+1, B] in its state and hands it to the base solver's
steps as their grid (the grid is an argument of every solver step, never built into the solver).

Design: one wrapper (``time_shifted``) over any factory with the ``x`` field as the sample at the start of the
current step, registered under ``ts_<base>``; ``window=0`` or a cutoff at or above T reproduces the base
sampler (to rounding: the base then runs on a per-sample grid; tests/test_time_shift.py).

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
from dpmjax.samplers.base import Solver

DEFAULTS = {"ddim": (30, 300), "s_pndm": (30, 300), "pndm": (5, 550), "dpm_solver": (30, 300)}


class TimeShiftState(NamedTuple):
    base: tuple      # the base solver's state
    grid: jax.Array  # [N+1, B] per-sample times, shifted entries written as the steps reach them


def _train_steps(schedule) -> int:
    return int(getattr(schedule, "num_train_timesteps", 1000))


def check_window(window, cutoff, name):
    """Validate the types of (window, cutoff): ValueError naming the argument."""
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 0:
        raise ValueError(f"solver {name!r}: window must be a non-negative integer (training steps), got {window!r}")
    if isinstance(cutoff, bool) or not isinstance(cutoff, (int, float, np.integer, np.floating)):
        raise ValueError(f"solver {name!r}: cutoff must be a number (training-step index), got {cutoff!r}")


def check_window_fits(schedule, times, window, cutoff, name):
    """On a concrete grid: half the window must stay below the grid intervals around every shifted step."""
    if window == 0:
        return
    n_train = _train_steps(schedule)
    grid = np.asarray(times, np.float64)
    grid = grid if grid.ndim == 1 else grid[:, 0]
    k = grid * n_train - 1.0
    shifted = k[:-1] > cutoff
    if np.any(shifted):
        gaps = np.abs(np.diff(k))  # gaps[i]: training steps between t_i and t_{i+1}
        # a shifted t_i must stay between its neighbours t_{i-1} and t_{i+1}
        gap = np.minimum(gaps, np.concatenate([[np.inf], gaps[:-1]]))[shifted].min()
        if window / 2 >= gap:
            raise ValueError(f"solver {name!r}: window={window} is larger than the steps it shifts: half the window "
                             f"must be below the smallest grid interval of a shifted step ({gap:g} training steps); "
                             "use a smaller window or fewer steps")


def shift_times(schedule, x, t, window: int, cutoff):
    """Per-sample t' (shape [B]) of the window around t (scalar or [B]) matching Var(x_b) (see module doc)."""
    n_train = _train_steps(schedule)
    batch = x.shape[0]
    t = jnp.broadcast_to(jnp.asarray(t), (batch,))
    if window == 0:
        return t
    lo, hi = schedule.time_range
    offsets = jnp.arange(-(window // 2), window // 2 + 1, dtype=t.dtype) / n_train
    cand = jnp.clip(t[:, None] + offsets[None, :], lo, hi)                       # [B, W]
    var = jnp.var(x.reshape(batch, -1).astype(t.dtype), axis=1)                 # [B]
    noise = jnp.exp(2.0 * schedule.log_sigma(cand))                              # sigma^2 = 1 - alpha_bar
    best = jnp.take_along_axis(cand, jnp.argmin((var[:, None] - noise) ** 2, axis=1)[:, None], 1)[:, 0]
    active = t * n_train - 1.0 > cutoff
    return jnp.where(active, best, t)


def time_shifted(schedule, num_steps: int, base: Solver, *, window: int, cutoff, step_of, name: str) -> Solver:
    """Wrap the ``base`` solver; ``step_of(j) -> (step i, first call of the step)`` for iteration j.

    The state carries a per-sample grid [N+1, B]; at the first call of step i its row i is replaced by the
    shifted times, and that grid is what the base solver's query and update see.
    """
    check_window(window, cutoff, name)

    def init(x_T, key, grid):
        times = grid["t"]
        per_sample = jnp.broadcast_to(times.reshape(times.shape[0], -1), (times.shape[0], x_T.shape[0]))
        return TimeShiftState(base=base.init(x_T, key, grid), grid=per_sample)

    def grid_now(state, j, grid):
        i, first = step_of(j)
        new = shift_times(schedule, state.base.x, grid["t"][i], window, cutoff)
        return {**grid, "t": state.grid.at[i].set(jnp.where(first, new, state.grid[i]))}

    def query(state, j, grid):
        return base.query(state.base, j, grid_now(state, j, grid))

    def update(state, j, grid, out):
        shifted = grid_now(state, j, grid)
        return TimeShiftState(base=base.update(state.base, j, shifted, out), grid=shifted["t"])

    return Solver(num_model_calls=base.num_model_calls, init=init, query=query, update=update,
                  output=lambda state: base.output(state.base), uses=base.uses)


def _every_call(j):
    return j, jnp.asarray(True)


def _pndm_steps(method, num_steps):
    table = pndm.stage_table(method, num_steps)
    return lambda j: (jnp.asarray(table.step)[j], jnp.asarray(table.first)[j])


def make_ts_ddim(schedule, num_steps: int, window: int = DEFAULTS["ddim"][0], cutoff=DEFAULTS["ddim"][1]) -> Solver:
    """TS-DDIM: deterministic DDIM (eta = 0) with per-sample shifted times."""
    return time_shifted(schedule, num_steps, ddim.make_ddim(schedule, num_steps), window=window, cutoff=cutoff,
                        step_of=_every_call, name="ts_ddim")


def make_ts_pndm(schedule, num_steps: int, window: int = DEFAULTS["pndm"][0], cutoff=DEFAULTS["pndm"][1]) -> Solver:
    """TS-F-PNDM (the paper's headline sampler)."""
    return time_shifted(schedule, num_steps, pndm.make_pndm_family(schedule, num_steps, "pndm"), window=window,
                        cutoff=cutoff, step_of=_pndm_steps("pndm", num_steps), name="ts_pndm")


def make_ts_s_pndm(schedule, num_steps: int, window: int = DEFAULTS["s_pndm"][0],
                   cutoff=DEFAULTS["s_pndm"][1]) -> Solver:
    """TS-S-PNDM."""
    return time_shifted(schedule, num_steps, pndm.make_pndm_family(schedule, num_steps, "s_pndm"), window=window,
                        cutoff=cutoff, step_of=_pndm_steps("s_pndm", num_steps), name="ts_s_pndm")


def make_ts_dpm_solver(schedule, num_steps: int, window: int = DEFAULTS["dpm_solver"][0],
                       cutoff=DEFAULTS["dpm_solver"][1], order: int = 2, lower_order_final: bool = True,
                       tail_steps: int = 0) -> Solver:
    """TS-DPM-Solver: multistep DPM-Solver (noise prediction, ``order`` 1-3) with shifted times."""
    base = dpm_solver.make_multistep(schedule, num_steps, order=order, data=False, lower_order_final=lower_order_final,
                                     tail_steps=tail_steps, name="ts_dpm_solver")
    return time_shifted(schedule, num_steps, base, window=window, cutoff=cutoff, step_of=_every_call,
                        name="ts_dpm_solver")


def prepare_time_shift(name: str):
    """The ``prepare`` hook of a Time-Shift entry: validates the window against a concrete grid (no data)."""
    default_window, default_cutoff = DEFAULTS[name[3:] if name != "ts_dpm_solver" else "dpm_solver"]

    def prepare(schedule, times, *, window=default_window, cutoff=default_cutoff, **_):
        check_window(window, cutoff, name)
        try:
            host = np.asarray(times, np.float64)
        except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
            return {}  # a traced grid: the window cannot be checked against it
        check_window_fits(schedule, host, window, cutoff, name)
        return {}

    return prepare
