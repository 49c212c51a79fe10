"""DDIM (Song et al. 2021) and DDPM ancestral sampling.

DDIM, from s to t (eq. 12, written for any schedule with h = lambda_t - lambda_s):
    x_t = alpha_t x0_s + sqrt(sigma_t^2 - c^2) eps_s + c z,   c = eta sigma_t sqrt(1 - e^{-2h}),
where c^2 = eta^2 times the DDPM posterior variance; eta = 0 is deterministic (and equals DPM-Solver-1),
eta = 1 is DDPM's ancestral step with the "fixed small" posterior variance (``ddpm``).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dpmjax.samplers.base import Solver, at_time, combine

__all__ = ["make_ddim", "make_ddpm", "ddim_needs_key"]


class DDIMState(NamedTuple):
    x: jax.Array    # [B, ...]
    key: jax.Array  # PRNG key


def _check_eta(eta):
    if isinstance(eta, bool) or not isinstance(eta, (int, float, np.integer, np.floating)) \
            or not 0.0 <= float(eta) <= 1.0:
        raise ValueError(f"solver 'ddim': eta must be a number in [0, 1], got {eta!r}")
    return float(eta)


def make_ddim(schedule, num_steps: int, eta: float = 0.0) -> Solver:
    """DDIM over ``num_steps`` grid intervals; deterministic for eta = 0 (no key needed), stochastic for eta > 0."""
    eta = _check_eta(eta)

    def init(x_T, key, grid):
        return DDIMState(x=x_T, key=key)

    def query(state, i, grid):
        return state.x, grid["t"][i]

    def update(state, i, grid, out):
        x = state.x
        s, t = at_time(schedule, grid["t"][i]), at_time(schedule, grid["t"][i + 1])
        h = t.lam - s.lam
        noise_std = eta * t.sigma * jnp.sqrt(-jnp.expm1(-2.0 * h))
        direction = jnp.sqrt(jnp.maximum(t.sigma ** 2 - noise_std ** 2, 0.0))
        x_next = combine([out.x0, out.eps], [t.alpha, direction])
        if eta > 0:
            z = jax.random.normal(jax.random.fold_in(state.key, i), x.shape, x.dtype)
            x_next = x_next + combine([z], [noise_std])
        return DDIMState(x=x_next, key=state.key)

    return Solver(num_model_calls=num_steps, init=init, query=query, update=update,
                  output=lambda state: state.x, uses="both")


def make_ddpm(schedule, num_steps: int) -> Solver:
    """DDPM ancestral sampling (Ho et al. 2020, Alg. 2) on any grid: DDIM with eta = 1."""
    return make_ddim(schedule, num_steps, eta=1.0)


def ddim_needs_key(options: dict) -> bool:
    return _check_eta(options.get("eta", 0.0)) > 0
