"""The stochastic sampler as a Gaussian policy: trajectories with exact per-step log-probabilities (DDPO, PRDP).

Reward finetuning treats each step of a stochastic sampler as an action of a policy pi_theta (Black et al. 2023,
DDPO, Sec. 4.2; Deng et al. 2024, PRDP, Sec. 3). On a grid t_0 > t_1 > ... > t_T, the step from s = t_i to
t = t_{i+1} is DDIM with eta > 0 (Song et al. 2021, eq. 12, written with h = lambda_t - lambda_s):

    pi_theta(x_t | x_s, c) = N(x_t; mu_theta(x_s, s, c), std^2 I)
    mu_theta = alpha_t x0_theta(x_s, s, c) + sqrt(sigma_t^2 - std^2) eps_theta(x_s, s, c)
    std      = eta sigma_t sqrt(1 - e^{-2h})                        (eta = 1: DDPM's posterior variance)

    log pi_theta(x_t | x_s, c) = -||x_t - mu_theta||^2 / (2 std^2) - D log std - (D / 2) log 2 pi

with D the pixels of one image. std does not depend on theta, so log-ratios between two parameter sets are
differences of the squared distances; the constant terms are kept so that the numbers are densities.

A ``Trajectory`` stores only the states x_{t_0} .. x_{t_T} ([T + 1, B, H, W, C]) and the log-probabilities
the sampling params gave them ([T, B]); ``trajectory_log_probs`` recomputes every step's log-probability under
any params (one jitted program for any params: they are an argument). The noise of step i is
``normal(fold_in(key, i))``, the registry's ``ddim`` solver's convention: the last state equals
``dpmjax.sample(..., solver="ddim", eta=eta, key=key)`` on the same grid.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dpmjax.parameterization import coefficient_dtype
from dpmjax.samplers.base import at_time, combine
from dpmjax.samplers.driver import make_evaluate

__all__ = ["Trajectory", "check_eta", "check_policy", "step_distribution", "gaussian_log_prob", "sample_trajectory",
           "trajectory_log_probs"]


class Trajectory(NamedTuple):
    """One batch of sampled trajectories."""

    states: jax.Array     # [T + 1, B, H, W, C]: x_{t_0} (the noise) ... x_{t_T} (the sample)
    log_probs: jax.Array  # [T, B]: log pi(x_{t_{i+1}} | x_{t_i}) under the params that sampled them


def check_eta(eta) -> None:
    """Raise ``ValueError`` unless ``eta`` is in (0, 1] (host-side)."""
    if isinstance(eta, bool) or not isinstance(eta, (int, float, np.integer, np.floating)) \
            or not 0.0 < float(eta) <= 1.0:
        raise ValueError(f"eta must be a number in (0, 1] (eta = 0 is deterministic: no policy to take "
                         f"log-probabilities of), got {eta!r}")


def check_policy(times, eta) -> None:
    """Raise ``ValueError`` unless ``eta`` is in (0, 1] and ``times`` a strictly decreasing grid of >= 2 points
    (host-side: call it before compiling)."""
    check_eta(eta)
    grid = np.asarray(times, np.float64)
    if grid.ndim != 1 or grid.size < 2 or not np.all(np.diff(grid) < 0):
        raise ValueError(f"times must be a strictly decreasing 1-D grid of at least 2 points, got {grid}")


def step_distribution(evaluate: Callable, x, s, t, *, schedule, eta: float):
    """(mean [B, ...], std scalar) of pi(x_t | x_s): ``evaluate(x, s) -> ModelEval`` (``make_evaluate``)."""
    out = evaluate(x, s)
    c_s, c_t = at_time(schedule, s), at_time(schedule, t)
    std = eta * c_t.sigma * jnp.sqrt(-jnp.expm1(-2.0 * (c_t.lam - c_s.lam)))
    direction = jnp.sqrt(jnp.maximum(c_t.sigma ** 2 - std ** 2, 0.0))
    return combine([out.x0, out.eps], [c_t.alpha, direction]), std


def gaussian_log_prob(x, mean, std):
    """log N(x; mean, std^2 I) per sample [B], summed over every axis but the first (float32 or wider)."""
    x, mean = jnp.asarray(x), jnp.asarray(mean)
    dtype = coefficient_dtype(x.dtype)  # float32 for bfloat16 / float16 states, else the states' own
    x, mean, std = x.astype(dtype), mean.astype(dtype), jnp.asarray(std, dtype)
    dims = math.prod(x.shape[1:])
    squared = jnp.sum(((x - mean) / std).reshape(x.shape[0], -1) ** 2, axis=1)
    return -0.5 * squared - dims * jnp.log(std) - 0.5 * dims * math.log(2.0 * math.pi)


def _evaluator(apply_fn, params, schedule, prediction, cond):
    cond = {} if cond is None else dict(cond)
    return make_evaluate(lambda x, t: apply_fn(params, x, t, **cond), schedule, prediction)


def sample_trajectory(apply_fn: Callable, params, x_T, key, times, *, schedule, prediction: str = "eps",
                      eta: float = 1.0, cond: dict | None = None) -> Trajectory:
    """Sample ``len(times) - 1`` policy steps from ``x_T`` and record each step's log-probability.

    Args:
      apply_fn: ``apply_fn(params, x, t, **cond)`` in the schedule's continuous time (``dpmjax.nn.make_apply_fn``).
      params: the network's variables (an argument: any params, one program).
      x_T: [B, H, W, C] starting noise; key: ``jax.random.key`` of the step noise.
      times: [T + 1] strictly decreasing grid (e.g. ``dpmjax.samplers.plan(schedule, "ddim", nfe=T).grid["t"]``).
      prediction: what the network predicts ("eps", "x0", "v"); eta: in (0, 1]; cond: model keywords, e.g.
        ``{"y": labels}``.
    """
    times = jnp.asarray(times, coefficient_dtype(x_T.dtype))  # the driver's convention (float32 for bfloat16)
    evaluate = _evaluator(apply_fn, params, schedule, prediction, cond)

    def body(x, i):
        mean, std = step_distribution(evaluate, x, times[i], times[i + 1], schedule=schedule, eta=eta)
        z = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
        x_next = (mean + std * z).astype(x.dtype)
        return x_next, (x_next, gaussian_log_prob(x_next, mean, std))

    _, (states, log_probs) = jax.lax.scan(body, x_T, jnp.arange(times.shape[0] - 1))
    return Trajectory(states=jnp.concatenate([x_T[None], states]), log_probs=log_probs)


def trajectory_log_probs(apply_fn: Callable, params, states, times, *, schedule, prediction: str = "eps",
                         eta: float = 1.0, cond: dict | None = None):
    """log pi_params(x_{t_{i+1}} | x_{t_i}) [T, B] of stored ``states`` [T + 1, B, ...] (``Trajectory.states``)
    under ``params``: differentiable in params; the states are data (no gradient flows into them)."""
    times = jnp.asarray(times, coefficient_dtype(states.dtype))
    evaluate = _evaluator(apply_fn, params, schedule, prediction, cond)
    states = jax.lax.stop_gradient(states)

    def one(i):
        mean, std = step_distribution(evaluate, states[i], times[i], times[i + 1], schedule=schedule, eta=eta)
        return gaussian_log_prob(states[i + 1], mean, std)

    return jax.lax.map(one, jnp.arange(times.shape[0] - 1))
