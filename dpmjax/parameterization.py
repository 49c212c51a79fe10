"""Model parameterisations and the wrappers every sampler shares.

With x_t = alpha_t x_0 + sigma_t eps, a network may predict
  "eps"   the noise eps                          (DDPM)
  "x0"    the data x_0                           (diffusers "sample")
  "v"     v = alpha_t eps - sigma_t x_0          (Salimans & Ho 2022)
  "score" grad_x log p_t(x) = -eps / sigma_t
  "flow"  the velocity u = dx_t/dt = alpha'_t x_0 + sigma'_t eps   (flow matching: u = eps - x_0)
All are affine in the output for fixed (x, t), so guidance may mix raw outputs directly.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

PREDICTIONS = ("eps", "x0", "v", "score", "flow")

__all__ = ["PREDICTIONS", "check_prediction", "to_eps", "to_x0", "convert", "discrete_time_model",
           "classifier_free_guidance", "classifier_guidance", "dynamic_threshold", "expand_like",
           "coefficient_dtype"]


def check_prediction(prediction: str) -> str:
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    return prediction


def coefficient_dtype(dtype):
    """The dtype schedule coefficients are computed in for data of ``dtype``: at least float32 (a bfloat16 or
    float16 state gets float32 times, lambdas and step sizes), float64 for float64 data under x64."""
    dtype = jnp.dtype(dtype)
    return dtype if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits >= 32 else jnp.dtype(jnp.float32)


def expand_like(v, x):
    """Broadcast a per-sample [B] (or scalar) coefficient against x of shape [B, ...], in x's dtype."""
    v = jnp.asarray(v)
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim)).astype(x.dtype)


def _coefficients(schedule, t, x):
    t = jnp.asarray(t, coefficient_dtype(x.dtype))
    alpha = expand_like(schedule.alpha(t), x)
    sigma = expand_like(schedule.sigma(t), x)
    return t, alpha, sigma


def _flow_derivatives(schedule, t, x):
    one = jnp.ones_like(t)
    _, d_alpha = jax.jvp(schedule.alpha, (t,), (one,))
    _, d_sigma = jax.jvp(schedule.sigma, (t,), (one,))
    return expand_like(d_alpha, x), expand_like(d_sigma, x)


def to_eps(output, x, t, schedule, prediction: str):
    """Convert a model output of type ``prediction`` to the noise prediction eps."""
    check_prediction(prediction)
    if prediction == "eps":
        return output
    t, alpha, sigma = _coefficients(schedule, t, x)
    if prediction == "x0":
        return (x - alpha * output) / sigma
    if prediction == "v":
        return (alpha * output + sigma * x) / (alpha ** 2 + sigma ** 2)
    if prediction == "score":
        return -sigma * output
    d_alpha, d_sigma = _flow_derivatives(schedule, t, x)
    return (alpha * output - d_alpha * x) / (alpha * d_sigma - d_alpha * sigma)


def to_x0(output, x, t, schedule, prediction: str):
    """Convert a model output of type ``prediction`` to the data prediction x_0."""
    check_prediction(prediction)
    if prediction == "x0":
        return output
    t, alpha, sigma = _coefficients(schedule, t, x)
    if prediction == "v":
        return (alpha * x - sigma * output) / (alpha ** 2 + sigma ** 2)
    if prediction == "flow":
        d_alpha, d_sigma = _flow_derivatives(schedule, t, x)
        return (d_sigma * x - sigma * output) / (alpha * d_sigma - d_alpha * sigma)
    eps = to_eps(output, x, t, schedule, prediction)
    return (x - sigma * eps) / alpha


def convert(output, x, t, schedule, from_: str, to: str):
    """Convert between any two of ``PREDICTIONS`` through (eps, x0)."""
    check_prediction(from_)
    check_prediction(to)
    if from_ == to:
        return output
    eps = to_eps(output, x, t, schedule, from_)
    if to == "eps":
        return eps
    x0 = to_x0(output, x, t, schedule, from_)
    t, alpha, sigma = _coefficients(schedule, t, x)
    if to == "x0":
        return x0
    if to == "v":
        return alpha * eps - sigma * x0
    if to == "score":
        return -eps / sigma
    d_alpha, d_sigma = _flow_derivatives(schedule, t, x)
    return d_alpha * x0 + d_sigma * eps


def discrete_time_model(net_fn: Callable, schedule) -> Callable:
    """Wrap a network trained on integer timesteps n in [0, N) as a continuous-time model_fn(x, t).

    Feeds ``1000 * (t - 1/N)`` exactly as the official DPM-Solver ``model_wrapper`` (label 0 <-> t = 1/N).
    """
    def model_fn(x, t, *args, **kwargs):
        return net_fn(x, schedule.timestep_of_t(t), *args, **kwargs)

    return model_fn


def classifier_free_guidance(model_fn: Callable, guidance_scale: float, cond, uncond) -> Callable:
    """out = out_u + s (out_c - out_u), with both halves evaluated as one concatenated batch.

    ``model_fn(x, t, cond)`` is the conditional model; the returned ``fn(x, t)`` costs one model call
    (of doubled batch), which dpmjax counts as one NFE (Ho & Salimans 2022, eq. 6).
    With guidance_scale == 1 only the conditional half is evaluated.
    """
    if guidance_scale == 1.0:
        return lambda x, t: model_fn(x, t, cond)

    def guided(x, t):
        batch = x.shape[0]
        t = jnp.broadcast_to(jnp.asarray(t), (batch,))
        both = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                        jax.tree.map(lambda u, c: jnp.concatenate([u, c]), uncond, cond))
        out_u, out_c = both[:batch], both[batch:]
        return out_u + guidance_scale * (out_c - out_u)

    return guided


def classifier_guidance(eps_fn: Callable, log_prob_fn: Callable, schedule, scale: float) -> Callable:
    """eps~ = eps - s sigma_t grad_x log p(c | x_t, t) (Dhariwal & Nichol 2021, Alg. 2; DPM-Solver wrapper).

    ``eps_fn(x, t)`` predicts noise; ``log_prob_fn(x, t)`` returns per-sample [B] log-probabilities of the
    target class.
    """
    def guided(x, t):
        grad = jax.grad(lambda xx: jnp.sum(log_prob_fn(xx, t)))(x)
        sigma = expand_like(schedule.sigma(jnp.asarray(t, coefficient_dtype(x.dtype))), x)
        return eps_fn(x, t) - scale * sigma * grad

    return guided


def dynamic_threshold(x0, ratio: float = 0.995, max_value: float = 1.0):
    """Imagen dynamic thresholding (Saharia et al. 2022, Sec. 2.3), as the official DPM-Solver does it.

    s_b = max(quantile_ratio(|x0_b|), max_value) per sample; x0 <- clip(x0, -s_b, s_b) / s_b.
    ``ratio`` is a quantile in [0, 1] (not a percentile: the Flax-era ``jnp.percentile(.., 0.995)`` bug of
    dpm_solver_jax.py and diffusers' Flax scheduler took the 0.995th percentile, i.e. nearly the minimum).
    Note: diffusers' torch schedulers clamp s to [1, sample_max_value] instead, which with the default
    sample_max_value = 1 is plain clipping to [-1, 1].
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"thresholding ratio must be a quantile in (0, 1], got {ratio}")
    flat = jnp.abs(x0.reshape(x0.shape[0], -1))
    s = jnp.quantile(flat, jnp.asarray(ratio, flat.dtype), axis=1)
    s = expand_like(jnp.maximum(s, jnp.asarray(max_value, s.dtype)), x0)
    return jnp.clip(x0, -s, s) / s
