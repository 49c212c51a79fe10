"""Denoising losses: eps / x0 / v targets with optional min-SNR-gamma weighting.

For x_t = alpha_t x_0 + sigma_t eps with t drawn uniformly, the model output is regressed on its target
(Ho et al. 2020 eq. 14 for eps; Salimans & Ho 2022 for v). Min-SNR-gamma (Hang et al. 2023, eq. 7)
weights each sample's loss so that the effective x0-space weight is min(SNR, gamma):
    eps target: w = min(SNR, gamma) / SNR;  x0 target: w = min(SNR, gamma);  v target: w = min(SNR, gamma)/(SNR + 1).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dpmjax.parameterization import expand_like
from dpmjax.schedules import DiscreteVP

TARGETS = ("eps", "x0", "v")


def sample_times(key, batch: int, schedule, dtype=jnp.float32):
    """Training times: integer timesteps n ~ U{0..N-1} mapped to t = (n+1)/N for a DiscreteVP (as DDPM trains),
    else t ~ U[t_eps, t_max] with t_eps = the schedule's default end time."""
    if isinstance(schedule, DiscreteVP):
        n = jax.random.randint(key, (batch,), 0, schedule.num_train_timesteps)
        return ((n + 1) / schedule.num_train_timesteps).astype(dtype)
    lo, hi = schedule.default_t_end, schedule.default_t_start
    return jax.random.uniform(key, (batch,), dtype, lo, hi)


def diffuse(x0, t, noise, schedule):
    """x_t = alpha_t x0 + sigma_t eps."""
    return expand_like(schedule.alpha(t), x0) * x0 + expand_like(schedule.sigma(t), x0) * noise


def target_for(x0, noise, t, schedule, target: str):
    if target == "eps":
        return noise
    if target == "x0":
        return x0
    return expand_like(schedule.alpha(t), x0) * noise - expand_like(schedule.sigma(t), x0) * x0


def loss_weights(t, schedule, target: str, min_snr_gamma: float | None):
    if min_snr_gamma is None:
        return jnp.ones_like(t)
    snr = jnp.exp(2.0 * schedule.lambda_(t))
    clipped = jnp.minimum(snr, min_snr_gamma)
    if target == "eps":
        return clipped / snr
    if target == "x0":
        return clipped
    return clipped / (snr + 1.0)


def denoising_loss(apply_fn, params, batch, key, schedule, *, target: str = "eps",
                   min_snr_gamma: float | None = None):
    """Mean weighted squared error of ``apply_fn(params, x_t, t, y, key)`` against the ``target``.

    ``batch`` is a dict with "image" [B, H, W, C] in [-1, 1] and optionally "label" [B] (label dropout for
    classifier-free guidance is the network's own, driven by ``key``). Returns (loss, per-sample losses).
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    x0 = batch["image"]
    k_t, k_noise, k_model = jax.random.split(key, 3)
    t = sample_times(k_t, x0.shape[0], schedule, x0.dtype)
    noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
    x_t = diffuse(x0, t, noise, schedule)
    out = apply_fn(params, x_t, t, batch.get("label"), k_model).astype(x0.dtype)
    per_sample = jnp.mean((out - target_for(x0, noise, t, schedule, target)) ** 2, axis=tuple(range(1, x0.ndim)))
    per_sample = per_sample * loss_weights(t, schedule, target, min_snr_gamma)
    return jnp.mean(per_sample), per_sample
