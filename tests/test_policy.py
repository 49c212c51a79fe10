"""The sampler as a Gaussian policy (dpmjax/samplers/policy.py): per-step log-probabilities against the closed-form
density written out in numpy, recomputation under other params, gradients, and the registry's DDIM sampler."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpmjax
from dpmjax.samplers import policy
from dpmjax.samplers import plan
from dpmjax.schedules import DiscreteVP

SCHEDULE = DiscreteVP.from_name("linear")


def linear_eps(params, x, t, y=None):
    """A toy eps-network: w x + b + 0.1 t (+ 0.05 y per sample), enough to make every coefficient matter."""
    out = params["w"] * x + params["b"] + 0.1 * t[:, None, None, None]
    if y is not None:
        out = out + 0.05 * y.astype(x.dtype)[:, None, None, None]
    return out


def numpy_log_prob(params, x_s, x_t, s, t, eta, y=None):
    """log N(x_t; mu, std^2 I) per sample in float64 numpy, from the DDIM step written out (module docstring)."""
    alpha = lambda u: float(np.exp(SCHEDULE.log_alpha(jnp.float64(u))))  # noqa: E731
    sigma = lambda u: float(np.exp(SCHEDULE.log_sigma(jnp.float64(u))))  # noqa: E731
    x_s, x_t = np.asarray(x_s, np.float64), np.asarray(x_t, np.float64)
    eps = float(params["w"]) * x_s + float(params["b"]) + 0.1 * s
    if y is not None:
        eps = eps + 0.05 * np.asarray(y, np.float64)[:, None, None, None]
    x0 = (x_s - sigma(s) * eps) / alpha(s)
    h = np.log(alpha(t) / sigma(t)) - np.log(alpha(s) / sigma(s))
    std = eta * sigma(t) * np.sqrt(1.0 - np.exp(-2.0 * h))
    mean = alpha(t) * x0 + np.sqrt(sigma(t) ** 2 - std ** 2) * eps
    d = x_s[0].size
    return (-0.5 * (((x_t - mean) / std) ** 2).reshape(len(x_t), -1).sum(1) - d * np.log(std)
            - 0.5 * d * np.log(2 * np.pi))


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_log_probs_are_the_closed_form_gaussian_density_of_each_step(x64, eta):
    params = {"w": jnp.float64(0.3), "b": jnp.float64(-0.02)}
    times = plan(SCHEDULE, "ddim", nfe=5, spacing="time_uniform").grid["t"]
    x_T = jax.random.normal(jax.random.key(0), (3, 4, 4, 1), jnp.float64)
    labels = jnp.asarray([0, 3, 7])
    traj = jax.jit(lambda p, x, k: policy.sample_trajectory(linear_eps, p, x, k, times, schedule=SCHEDULE, eta=eta,
                                                              cond={"y": labels}))(params, x_T, jax.random.key(1))
    assert traj.states.shape == (6, 3, 4, 4, 1) and traj.log_probs.shape == (5, 3)
    np.testing.assert_array_equal(np.asarray(traj.states[0]), np.asarray(x_T))
    for i in range(5):
        expected = numpy_log_prob(params, traj.states[i], traj.states[i + 1], float(times[i]), float(times[i + 1]),
                                  eta, labels)
        np.testing.assert_allclose(np.asarray(traj.log_probs[i]), expected, rtol=1e-9, atol=1e-8)


def test_recomputed_log_probs_match_sampling_and_follow_other_params(x64):
    """Under the sampling params the recomputed log-probabilities are the recorded ones; under other params they are
    the closed form with those params; their gradient matches central finite differences."""
    params = {"w": jnp.float64(0.3), "b": jnp.float64(-0.02)}
    times = plan(SCHEDULE, "ddim", nfe=4, spacing="logSNR").grid["t"]
    x_T = jax.random.normal(jax.random.key(2), (2, 3, 3, 1), jnp.float64)
    traj = policy.sample_trajectory(linear_eps, params, x_T, jax.random.key(3), times, schedule=SCHEDULE)
    log_probs = jax.jit(lambda p, states: policy.trajectory_log_probs(linear_eps, p, states, times,
                                                                      schedule=SCHEDULE))
    np.testing.assert_allclose(np.asarray(log_probs(params, traj.states)), np.asarray(traj.log_probs),
                               rtol=1e-10, atol=1e-8)
    other = {"w": jnp.float64(0.25), "b": jnp.float64(0.01)}
    recomputed = np.asarray(log_probs(other, traj.states))
    for i in range(4):
        np.testing.assert_allclose(recomputed[i], numpy_log_prob(other, traj.states[i], traj.states[i + 1],
                                                                 float(times[i]), float(times[i + 1]), 1.0),
                                   rtol=1e-9, atol=1e-8)
    assert log_probs._cache_size() == 1  # params are an argument: one program for any params

    total = lambda p: jnp.sum(log_probs(p, traj.states))  # noqa: E731
    grad = jax.grad(total)(other)
    for name in ("w", "b"):
        step = 1e-6
        plus, minus = dict(other), dict(other)
        plus[name], minus[name] = other[name] + step, other[name] - step
        numeric = (float(total(plus)) - float(total(minus))) / (2 * step)
        np.testing.assert_allclose(float(grad[name]), numeric, rtol=1e-5)


def test_the_last_state_is_the_registered_ddim_sampler_with_the_same_key():
    params = {"w": jnp.float32(0.3), "b": jnp.float32(-0.02)}
    times = plan(SCHEDULE, "ddim", nfe=6, spacing="time_uniform").grid["t"]
    x_T = jax.random.normal(jax.random.key(4), (4, 4, 4, 1), jnp.float32)
    key = jax.random.key(5)
    for eta in (1.0, 0.3):
        traj = policy.sample_trajectory(linear_eps, params, x_T, key, times, schedule=SCHEDULE, eta=eta)
        reference = dpmjax.sample(lambda x, t: linear_eps(params, x, t), x_T, schedule=SCHEDULE, solver="ddim",
                                  nfe=6, spacing="time_uniform", key=key, eta=eta)
        np.testing.assert_allclose(np.asarray(traj.states[-1]), np.asarray(reference), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("times, eta, message", [
    ([1.0, 0.5, 0.1], 0.0, "eta"), ([1.0, 0.5, 0.1], 1.5, "eta"), ([1.0, 0.5, 0.1], True, "eta"),
    ([1.0], 1.0, "decreasing"), ([0.1, 0.5, 1.0], 1.0, "decreasing"), ([1.0, 1.0, 0.1], 1.0, "decreasing")])
def test_bad_policies_are_refused(times, eta, message):
    with pytest.raises(ValueError, match=message):
        policy.check_policy(times, eta)
    policy.check_policy([1.0, 0.5, 0.1], 1.0)
