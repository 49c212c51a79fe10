"""Euler and Heun in the VE/EDM variables (Karras et al. 2022, "Elucidating the Design Space", Alg. 1;
k-diffusion ``sample_euler`` / ``sample_heun``; diffusers ``EulerDiscreteScheduler`` / ``HeunDiscreteScheduler``).

With y = x/alpha and sigma = sigma_t/alpha_t = e^{-lambda} (``schedule.sigma_ve``) the probability-flow ODE is
dy/dsigma = d(y, sigma) = (y - D(y, sigma))/sigma, D the x0-prediction (Karras eq. 3). From sigma_i to sigma_{i+1}:

  ``euler``: y_{i+1} = y_i + (sigma_{i+1} - sigma_i) d_i,                  d_i = d(y_i, sigma_i)
  ``heun``:  y~ = y_i + (sigma_{i+1} - sigma_i) d_i,  d' = d(y~, sigma_{i+1}),
             y_{i+1} = y_i + (sigma_{i+1} - sigma_i) (d_i + d')/2           (Alg. 1, lines 5-8),
and x = alpha y at every grid time, so the state stays in x. ``euler`` equals DDIM (eta = 0) up to rounding.

The step to sigma = 0, on which Alg. 1 takes an Euler step (y_{i+1} = D(y_i, sigma_i)), is the driver's final
x0 call (``final_sigma="zero"``), so on the solver's grid Heun always takes 2 model calls per step and
``heun`` with ``final_sigma="zero"`` costs 2 (steps - 1) + 1 calls, as in k-diffusion and diffusers. (Should a
grid given to the factory itself end at sigma = 0, that step falls back to Euler, its second call unused.)
The stochastic churn of Alg. 2 (S_churn, ...) is not implemented.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dpmjax.samplers.base import Solver, at_time, expand_like, safe_divisor


class EulerState(NamedTuple):
    x: jax.Array  # [B, ...] x at t_i


class HeunState(NamedTuple):
    x: jax.Array       # [B, ...] x at t_i (start of the current step)
    x_eval: jax.Array  # [B, ...] where the next model call evaluates
    slope: jax.Array   # [B, ...] d_i, the first slope of the current step


def _ve(schedule, t):
    """alpha and sigma_ve = e^{-lambda} at t."""
    c = at_time(schedule, t)
    return c.alpha, jnp.exp(-c.lam)


def _slope(x, x0, alpha, sigma_ve):
    """d = (y - x0)/sigma_ve with y = x/alpha."""
    return (x / expand_like(alpha, x) - x0) / expand_like(sigma_ve, x)


def make_euler(schedule, num_steps: int) -> Solver:
    """Euler in sigma_ve (Karras et al. 2022, Alg. 1 without line 6): y_{i+1} = y_i + (sigma_{i+1} - sigma_i) d_i."""

    def init(x_T, key, grid):
        return EulerState(x=x_T)

    def query(state, i, grid):
        return state.x, grid["t"][i]

    def update(state, i, grid, out):
        x = state.x
        alpha, sigma = _ve(schedule, grid["t"][i])
        alpha_next, sigma_next = _ve(schedule, grid["t"][i + 1])
        y_next = x / expand_like(alpha, x) + expand_like(sigma_next - sigma, x) * _slope(x, out.x0, alpha, sigma)
        return EulerState(x=expand_like(alpha_next, x) * y_next)

    return Solver(num_model_calls=num_steps, init=init, query=query, update=update,
                  output=lambda state: state.x, uses="x0")


def heun_steps_for_nfe(nfe, **_):
    if nfe % 2:
        raise ValueError(f"heun takes 2 model calls per step, so the NFE it spends on the grid (nfe, minus 1 with "
                         f"final_sigma='zero' or denoise_to_zero) must be even, got {nfe}")
    return nfe // 2


def make_heun(schedule, num_steps: int) -> Solver:
    """Heun's method in sigma_ve (Karras et al. 2022, Alg. 1): 2 model calls per step; iteration j makes
    call j % 2 of step j // 2."""

    def init(x_T, key, grid):
        return HeunState(x=x_T, x_eval=x_T, slope=jnp.zeros_like(x_T))

    def query(state, j, grid):
        return state.x_eval, grid["t"][j // 2 + j % 2]

    def update(state, j, grid, out):
        x = state.x
        i, second = j // 2, (j % 2) == 1
        alpha, sigma = _ve(schedule, grid["t"][i])
        alpha_next, sigma_next = _ve(schedule, grid["t"][i + 1])
        y = x / expand_like(alpha, x)
        dsigma = expand_like(sigma_next - sigma, x)
        # first call: d_i at (x_i, sigma_i); the Euler point y~ is where the second call evaluates.
        slope_first = _slope(x, out.x0, alpha, sigma)
        x_euler = expand_like(alpha_next, x) * (y + dsigma * slope_first)
        # second call: d' at (y~, sigma_{i+1}); Euler when sigma_{i+1} = 0.
        use_heun = sigma_next > 0
        slope_second = _slope(state.x_eval, out.x0, alpha_next, safe_divisor(sigma_next, use_heun))
        slope = jnp.where(expand_like(use_heun, x), 0.5 * (state.slope + slope_second), state.slope)
        x_heun = expand_like(alpha_next, x) * (y + dsigma * slope)
        return HeunState(x=jnp.where(second, x_heun, x), x_eval=jnp.where(second, x_heun, x_euler),
                         slope=jnp.where(second, state.slope, slope_first))

    return Solver(num_model_calls=2 * num_steps, init=init, query=query, update=update,
                  output=lambda state: state.x, uses="x0")
