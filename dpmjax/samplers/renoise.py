"""Multi-step "x0 re-noise" sampling: the inference of a few-step distilled generator (DMD2, consistency models).

On a grid t_0 > t_1 > ... > t_N, starting from x_{t_0} = x_T:

    x0_i      = model x0-prediction at (x_{t_i}, t_i)                        i = 0 .. N-1
    x_{t_i+1} = alpha_{t_i+1} x0_i + sigma_{t_i+1} z_i,   z_i ~ N(0, I) fresh   i = 0 .. N-2
    output    = x0_{N-1}

This is the official DMD2 SDXL generator's loop (``scheduler.add_noise(x0, noise, t_next)`` with fresh noise,
Yin et al. 2024, Sec. 4.3 "backward simulation"), and Song et al.'s multistep consistency sampling (2023, Alg. 1).
N model calls; the last grid point t_N only closes the grid and is never evaluated. Noise z_i is
``normal(fold_in(key, i))``, the same draw ``dpmjax.methods.dmd2.backward_simulation`` makes, so the inputs a
generator was trained on are exactly those it sees here. With ``spacing="trailing"`` on a 1000-step DiscreteVP
the evaluated times are the official labels 999, 749, 499, 249 (4 steps) or 999 (1 step).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dpmjax.samplers.base import Solver, at_time, combine

__all__ = ["make_renoise", "renoise_needs_key"]


class RenoiseState(NamedTuple):
    x: jax.Array    # [B, ...]: the noisy sample at the next evaluation time
    x0: jax.Array   # [B, ...]: the last x0-prediction (the output)
    key: jax.Array  # PRNG key of the re-noising draws


def make_renoise(schedule, num_steps: int) -> Solver:
    """x0 re-noise sampling over ``num_steps`` grid intervals (``num_steps`` model calls, see the module doc)."""

    def init(x_T, key, grid):
        return RenoiseState(x=x_T, x0=jnp.zeros_like(x_T), key=key)

    def query(state, i, grid):
        return state.x, grid["t"][i]

    def update(state, i, grid, out):
        t_next = at_time(schedule, grid["t"][i + 1])
        z = jax.random.normal(jax.random.fold_in(state.key, i), state.x.shape, state.x.dtype)
        x_next = combine([out.x0, z], [t_next.alpha, t_next.sigma])
        return RenoiseState(x=x_next, x0=out.x0, key=state.key)

    return Solver(num_model_calls=num_steps, init=init, query=query, update=update,
                  output=lambda state: state.x0, uses="x0")


def renoise_needs_key(options: dict) -> bool:
    return True
