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

from dpmjax.samplers.base import Solver, at_time, expand_like, register


class DDIMState(NamedTuple):
    x: jax.Array    # [B, ...]
    key: jax.Array  # PRNG key


def _make_ddim(schedule, timesteps, eta: float = 0.0) -> Solver:
    if not 0.0 <= float(eta) <= 1.0:
        raise ValueError(f"ddim: eta must lie in [0, 1], got {eta}")
    num_steps = timesteps.shape[0] - 1

    def init(x_T, key):
        return DDIMState(x=x_T, key=key)

    def query(state, i):
        return state.x, timesteps[i]

    def update(state, i, out):
        x = state.x
        s = at_time(schedule, timesteps[i], x.dtype)
        t = at_time(schedule, timesteps[i + 1], x.dtype)
        h = t.lam - s.lam
        noise_std = eta * t.sigma * jnp.sqrt(-jnp.expm1(-2.0 * h))
        direction = jnp.sqrt(jnp.maximum(t.sigma ** 2 - noise_std ** 2, 0.0))
        x_next = expand_like(t.alpha, x) * out.x0 + expand_like(direction, x) * out.eps
        if eta > 0:
            z = jax.random.normal(jax.random.fold_in(state.key, i), x.shape, x.dtype)
            x_next = x_next + expand_like(noise_std, x) * z
        return DDIMState(x=x_next, key=state.key)

    return Solver(num_model_calls=num_steps, init=init, query=query, update=update,
                  output=lambda state: state.x, uses="both")


@register("ddim", options=("eta",), stochastic=True)
def make_ddim(schedule, timesteps, eta: float = 0.0) -> Solver:
    """DDIM; deterministic for eta = 0 (no key needed), stochastic for eta > 0."""
    return _make_ddim(schedule, timesteps, eta)


@register("ddpm", options=(), stochastic=True)
def make_ddpm(schedule, timesteps) -> Solver:
    """DDPM ancestral sampling (Ho et al. 2020, Alg. 2) on any grid: DDIM with eta = 1."""
    return _make_ddim(schedule, timesteps, eta=1.0)
