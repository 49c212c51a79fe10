"""Parameterisation conversions, guidance wrappers, dynamic thresholding, discrete-time model wrapper."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpmjax import parameterization as P
from dpmjax.schedules import CosineVP, DiscreteVP, FlowMatching, LinearVP


def schedules_with_derivatives():
    """Each schedule with an independent closed form of d log alpha / dt (for the flow velocity)."""
    discrete = DiscreteVP.from_name("linear")
    grid = np.asarray(discrete.log_alpha_grid)
    n = discrete.num_train_timesteps

    def discrete_slope(t):  # log alpha is piecewise linear between t_k = (k + 1)/N
        k = np.clip(np.floor(t * n).astype(int) - 1, 0, n - 2)
        return (grid[k + 1] - grid[k]) * n

    def cosine_slope(t, s=0.008):
        return -np.tan((t + s) / (1 + s) * np.pi / 2) * np.pi / (2 * (1 + s))

    return {
        "discrete": (discrete, discrete_slope),
        "linear": (LinearVP(), lambda t: -(20.0 - 0.1) * t / 2 - 0.1 / 2),
        "cosine": (CosineVP(), cosine_slope),
        "flow": (FlowMatching(), lambda t: -1.0 / (1.0 - t)),
    }


def exact_outputs(schedule, d_log_alpha, t, x0, eps):
    """Every parameterisation's target for x_t = alpha x0 + sigma eps, from closed forms (numpy float64)."""
    alpha = np.exp(np.asarray(schedule.log_alpha(jnp.asarray(t))))[:, None]
    sigma = np.exp(np.asarray(schedule.log_sigma(jnp.asarray(t))))[:, None]
    d_alpha = alpha * d_log_alpha(t)[:, None]
    # VP: alpha^2 + sigma^2 = 1 => sigma' = -alpha alpha' / sigma; flow matching: sigma = t => sigma' = 1.
    d_sigma = np.ones_like(sigma) if isinstance(schedule, FlowMatching) else -alpha * d_alpha / sigma
    x = alpha * x0 + sigma * eps
    outputs = {"eps": eps, "x0": x0, "v": alpha * eps - sigma * x0, "score": -eps / sigma,
               "flow": d_alpha * x0 + d_sigma * eps}
    return x, outputs


@pytest.mark.parametrize("name", list(schedules_with_derivatives()))
def test_conversions_between_all_parameterisations(name, x64):
    schedule, d_log_alpha = schedules_with_derivatives()[name]
    rng = np.random.default_rng(0)
    # times off the discrete grid points (where the piecewise-linear slope is ambiguous)
    t = np.array([0.0305, 0.2505, 0.5005, 0.9005])
    x0, eps = rng.standard_normal((2, 4, 3))
    x, outputs = exact_outputs(schedule, d_log_alpha, t, x0, eps)
    if name == "flow":  # the closed form u = eps - x0
        np.testing.assert_allclose(outputs["flow"], eps - x0, rtol=1e-12)
    for source in P.PREDICTIONS:
        for target in P.PREDICTIONS:
            converted = P.convert(jnp.asarray(outputs[source]), jnp.asarray(x), jnp.asarray(t), schedule,
                                  source, target)
            np.testing.assert_allclose(converted, outputs[target], rtol=1e-9, atol=1e-9,
                                       err_msg=f"{source} -> {target}")
        np.testing.assert_allclose(P.to_eps(jnp.asarray(outputs[source]), jnp.asarray(x), jnp.asarray(t), schedule,
                                            source), eps, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(P.to_x0(jnp.asarray(outputs[source]), jnp.asarray(x), jnp.asarray(t), schedule,
                                           source), x0, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["discrete", "flow"])
def test_conversions_float32_scalar_time_and_images(name):
    """float32 throughout under strict promotion, with a scalar t and image-shaped x."""
    schedule = schedules_with_derivatives()[name][0]
    key_x, key_out = jax.random.split(jax.random.key(0))
    x = jax.random.normal(key_x, (2, 4, 4, 3), jnp.float32)
    out = jax.random.normal(key_out, (2, 4, 4, 3), jnp.float32)

    @jax.jit  # one compile for all conversions (keeps the test fast)
    def round_trips(out, x, sch):
        result = {}
        for source in P.PREDICTIONS:
            for target in ("eps", "x0"):
                converted = P.convert(out, x, 0.5, sch, source, target)  # scalar (weakly typed) time
                back = P.convert(converted, x, jnp.full((2,), 0.5, jnp.float32), sch, target, source)  # [B] time
                result[f"{source}->{target}"] = (converted, back)
        return result

    for label, (converted, back) in round_trips(out, x, schedule).items():
        assert converted.dtype == jnp.float32 and converted.shape == x.shape, label
        np.testing.assert_allclose(back, out, rtol=1e-4, atol=1e-4, err_msg=label)  # O(1) coefficients at t = 0.5


def test_unknown_prediction_raises():
    x = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="prediction must be one of"):
        P.to_eps(x, x, 0.5, LinearVP(), "epsilon")
    with pytest.raises(ValueError, match="prediction must be one of"):
        P.to_x0(x, x, 0.5, LinearVP(), "sample")
    with pytest.raises(ValueError, match="prediction must be one of"):
        P.convert(x, x, 0.5, LinearVP(), "eps", "v_prediction")


def test_expand_like():
    x = jnp.zeros((3, 4, 5))
    assert P.expand_like(jnp.ones(3), x).shape == (3, 1, 1)
    assert P.expand_like(2.0, x).shape == (1, 1, 1)


# ----------------------------------------------------------------------------------------------
# Wrappers.
# ----------------------------------------------------------------------------------------------

def test_discrete_time_model_feeds_official_timesteps():
    """DPM-Solver's model_wrapper: t_input = 1000 (t - 1/N); label k <-> t = (k + 1)/N when N = 1000."""
    seen = []
    schedule = DiscreteVP.from_name("linear")
    model = P.discrete_time_model(lambda x, timestep, extra: (seen.append(timestep), x * extra)[1], schedule)
    t = jnp.asarray([1.0, 0.5, 1e-3], jnp.float32)
    out = model(jnp.ones((3, 2), jnp.float32), t, 2.0)
    np.testing.assert_allclose(seen[0], [999.0, 499.0, 0.0], atol=1e-4)
    np.testing.assert_array_equal(out, 2.0)
    small = DiscreteVP.from_name("linear", num_train_timesteps=10)
    np.testing.assert_allclose(small.timestep_of_t(jnp.asarray([1.0, 0.1], jnp.float32)), [900.0, 0.0], atol=1e-4)


def test_classifier_free_guidance_is_one_batched_call():
    calls = []

    def model_fn(x, t, cond):
        calls.append((x.shape, t.shape))
        return x * cond["scale"][:, None] + t[:, None]

    x = jnp.arange(6.0, dtype=jnp.float32).reshape(3, 2)
    t = jnp.asarray([0.1, 0.2, 0.3], jnp.float32)
    cond = {"scale": jnp.asarray([2.0, 3.0, 4.0], jnp.float32)}
    uncond = {"scale": jnp.zeros(3, jnp.float32)}
    s = 7.5
    guided = P.classifier_free_guidance(model_fn, s, cond, uncond)
    out = guided(x, t)
    assert calls == [((6, 2), (6,))]  # one call on the concatenated [uncond; cond] batch
    out_u, out_c = model_fn(x, t, uncond), model_fn(x, t, cond)
    np.testing.assert_allclose(out, out_u + s * (out_c - out_u), rtol=1e-6)
    # a scalar time is broadcast; jit gives the same
    np.testing.assert_allclose(jax.jit(guided)(x, jnp.float32(0.2)), guided(x, jnp.full(3, 0.2, jnp.float32)),
                               rtol=1e-6)
    calls.clear()
    plain = P.classifier_free_guidance(model_fn, 1.0, cond, uncond)
    np.testing.assert_allclose(plain(x, t), out_c, rtol=1e-6)
    assert calls == [((3, 2), (3,))]  # scale 1: only the conditional half


def test_classifier_guidance(x64):
    schedule = LinearVP()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 2)))
    t = jnp.asarray([0.2, 0.5, 0.8])

    def log_prob_fn(xx, tt):  # grad = -xx
        return -0.5 * jnp.sum(xx ** 2, axis=1)

    guided = P.classifier_guidance(lambda xx, tt: jnp.zeros_like(xx), log_prob_fn, schedule, 3.0)
    np.testing.assert_allclose(guided(x, t), 3.0 * schedule.sigma(t)[:, None] * x, rtol=1e-12)


# ----------------------------------------------------------------------------------------------
# Dynamic thresholding.
# ----------------------------------------------------------------------------------------------

def reference_threshold(x0, ratio, max_value):
    flat = np.abs(x0.reshape(x0.shape[0], -1))
    s = np.maximum(np.quantile(flat, ratio, axis=1), max_value).reshape((-1,) + (1,) * (x0.ndim - 1))
    return np.clip(x0, -s, s) / s


@pytest.mark.parametrize("ratio,max_value", [(0.995, 1.0), (0.87, 0.5), (0.5, 1.0), (1.0, 1.0)])
def test_dynamic_threshold_is_a_per_sample_quantile(ratio, max_value):
    rng = np.random.default_rng(1)
    x0 = (rng.standard_normal((4, 3, 8, 8)) * np.array([0.3, 1.0, 2.0, 5.0])[:, None, None, None]).astype(np.float32)
    out = P.dynamic_threshold(jnp.asarray(x0), ratio, max_value)
    assert out.dtype == jnp.float32 and out.shape == x0.shape
    np.testing.assert_allclose(out, reference_threshold(x0, ratio, max_value), rtol=1e-5, atol=1e-6)


def test_dynamic_threshold_ratio_is_not_a_percentile():
    """Regression (dpm_solver_jax.py and diffusers' Flax scheduler): ratio 0.995 is the 99.5% quantile,
    not jnp.percentile(.., 0.995), which is near the minimum of |x0| and collapses s to max_value."""
    x0 = jnp.asarray(np.linspace(-3.0, 3.0, 2 * 1000, dtype=np.float32).reshape(2, 1000))
    out = np.asarray(P.dynamic_threshold(x0, 0.995, 1.0))
    s = np.quantile(np.abs(np.asarray(x0)), 0.995, axis=1)
    assert np.all(s > 2.9)
    np.testing.assert_allclose(out, np.clip(x0, -s[:, None], s[:, None]) / s[:, None], rtol=1e-5)
    # the percentile bug would clip everything beyond |x| = 1: ~2/3 of entries at +-1
    assert np.mean(np.abs(out) >= 1.0 - 1e-6) < 0.01
    percentile_bug = np.clip(x0, -1.0, 1.0)
    assert np.abs(out - percentile_bug).max() > 0.5


def test_dynamic_threshold_under_jit_and_bad_ratio():
    x0 = jnp.ones((2, 5), jnp.float32) * 3.0
    np.testing.assert_allclose(jax.jit(P.dynamic_threshold)(x0), 1.0)
    for ratio in (0.0, 1.5, 99.5):
        with pytest.raises(ValueError, match="ratio"):
            P.dynamic_threshold(x0, ratio)


def test_dynamic_threshold_bfloat16_keeps_dtype():
    x0 = jnp.linspace(-2.0, 2.0, 32, dtype=jnp.bfloat16).reshape(2, 16)
    out = P.dynamic_threshold(x0, 0.9, 1.0)
    assert out.dtype == jnp.bfloat16
    assert float(jnp.max(jnp.abs(out))) <= 1.0 + 2.0 ** -7  # one bfloat16 ulp at 1
