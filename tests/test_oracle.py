"""The Gaussian-mixture oracle: exact eps, densities, samples, and the reference probability-flow ODE map."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpmjax import parameterization as P
from dpmjax.oracle import GaussianMixture, ode_solution
from dpmjax.schedules import DiscreteVP, FlowMatching, LinearVP

SCHEDULES = {"discrete": DiscreteVP.from_name("linear"), "linear": LinearVP(), "flow": FlowMatching()}


def mixture():
    return GaussianMixture.random(seed=3, num_modes=3, dim=2)


def assert_moments_match(samples, mean, cov, num_se=5.0):
    """Sample mean / covariance against exact values, tolerance num_se standard errors (CLT).

    The standard error of each covariance entry is estimated from the samples' products
    (x_i - m_i)(x_j - m_j), whose variance involves the fourth moments.
    """
    x = np.asarray(samples, np.float64)
    n = x.shape[0]
    mean_se = np.sqrt(np.diag(cov) / n)
    np.testing.assert_array_less(np.abs(x.mean(0) - mean), num_se * mean_se)
    centred = x - mean
    products = centred[:, :, None] * centred[:, None, :]
    cov_se = products.std(0) / np.sqrt(n)
    np.testing.assert_array_less(np.abs(products.mean(0) - cov), num_se * cov_se)


# ----------------------------------------------------------------------------------------------
# Exact eps and densities.
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(SCHEDULES))
def test_eps_is_minus_sigma_times_grad_log_prob(name, x64):
    schedule = SCHEDULES[name]
    gm = mixture()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 2)) * 2.0)
    t = jnp.asarray([0.05, 0.3, 0.6, 0.95])
    grad_log_p = jax.grad(lambda xx: jnp.sum(gm.log_prob(xx, t, schedule)))(x)
    expected = -schedule.sigma(t)[:, None] * grad_log_p
    np.testing.assert_allclose(gm.eps(x, t, schedule), expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(gm.score(x, t, schedule), grad_log_p, rtol=1e-10, atol=1e-12)
    # scalar t broadcasts to the batch
    np.testing.assert_allclose(gm.eps(x, 0.3, schedule)[1], gm.eps(x, t, schedule)[1], rtol=1e-12)


def test_single_gaussian_density_and_eps_closed_form(x64):
    """One component N(mu, diag(s^2)): p_t = N(alpha mu, alpha^2 s^2 + sigma^2), eps = sigma (x - alpha mu)/var."""
    mu, s = np.array([[1.0, -2.0]]), np.array([[0.5, 1.5]])
    gm = GaussianMixture.create(mu, s)
    schedule = LinearVP()
    x = np.random.default_rng(1).standard_normal((3, 2))
    t = np.array([0.1, 0.5, 0.9])
    alpha = np.asarray(schedule.alpha(jnp.asarray(t)))[:, None]
    sigma = np.asarray(schedule.sigma(jnp.asarray(t)))[:, None]
    var = alpha ** 2 * s ** 2 + sigma ** 2
    log_p = -0.5 * np.sum((x - alpha * mu) ** 2 / var + np.log(2 * np.pi * var), axis=1)
    np.testing.assert_allclose(gm.log_prob(jnp.asarray(x), jnp.asarray(t), schedule), log_p, rtol=1e-12)
    np.testing.assert_allclose(gm.eps(jnp.asarray(x), jnp.asarray(t), schedule), sigma * (x - alpha * mu) / var,
                               rtol=1e-12)
    log_p0 = -0.5 * np.sum((x - mu) ** 2 / s ** 2 + np.log(2 * np.pi * s ** 2), axis=1)
    np.testing.assert_allclose(gm.log_prob(jnp.asarray(x)), log_p0, rtol=1e-12)


def test_model_fn_gives_every_parameterisation(x64):
    gm, schedule = mixture(), SCHEDULES["linear"]
    x = jnp.asarray(np.random.default_rng(2).standard_normal((3, 2)))
    t = jnp.asarray([0.2, 0.5, 0.8])
    eps = gm.eps(x, t, schedule)
    for prediction in P.PREDICTIONS:
        out = gm.model_fn(schedule, prediction)(x, t)
        np.testing.assert_allclose(P.to_eps(out, x, t, schedule, prediction), eps, rtol=1e-10, atol=1e-12)


def test_eps_float32_and_images_under_strict_promotion():
    gm = GaussianMixture.random(seed=0, num_modes=2, dim=12)
    x = jax.random.normal(jax.random.key(0), (2, 2, 2, 3), jnp.float32)  # flattens to D = 12
    eps = jax.jit(gm.model_fn(SCHEDULES["discrete"], "x0"))(x, jnp.asarray([0.5, 0.7], jnp.float32))
    assert eps.dtype == jnp.float32 and eps.shape == x.shape
    assert np.all(np.isfinite(np.asarray(eps)))


# ----------------------------------------------------------------------------------------------
# Samples.
# ----------------------------------------------------------------------------------------------

def test_samples_have_the_mixture_moments():
    gm = GaussianMixture.random(seed=5, num_modes=4, dim=3)
    samples = gm.sample(jax.random.key(0), 200_000)
    assert samples.shape == (200_000, 3) and samples.dtype == jnp.float32
    assert_moments_match(samples, gm.mean(), gm.covariance())


def test_mean_and_covariance_formulas():
    gm = GaussianMixture.create([[0.0, 0.0], [2.0, 4.0]], [[1.0, 2.0], [0.5, 0.5]], [0.25, 0.75])
    np.testing.assert_allclose(gm.mean(), [1.5, 3.0])
    # law of total variance: E[Var] + Var[E]
    e_var = np.diag(0.25 * np.array([1.0, 4.0]) + 0.75 * np.array([0.25, 0.25]))
    between = 0.25 * 0.75 * np.outer([2.0, 4.0], [2.0, 4.0])
    np.testing.assert_allclose(gm.covariance(), e_var + between)


# ----------------------------------------------------------------------------------------------
# Reference ODE solution.
# ----------------------------------------------------------------------------------------------

def test_ode_solution_single_gaussian_closed_form():
    """For one Gaussian, (y - mu)/sqrt(s^2 + sigma_ve^2) with y = x/alpha is conserved along the flow."""
    mu, s = np.array([1.0, -0.5]), np.array([0.3, 2.0])
    gm = GaussianMixture.create(mu[None], s[None])
    schedule = LinearVP()
    x_from = np.random.default_rng(3).standard_normal((3, 2))
    t_from = 0.8
    with jax.enable_x64(True):
        alpha_from = float(schedule.alpha(jnp.float64(t_from)))
        s_ve_from = float(schedule.sigma_ve(jnp.float64(t_from)))
    z = (x_from / alpha_from - mu) / np.sqrt(s ** 2 + s_ve_from ** 2)
    to_zero = ode_solution(gm, x_from, t_from, "zero", schedule)
    # the solver stops at lambda = 20 (sigma_ve = 2e-9); the remaining drift is O(sigma_ve^2 / s^2)
    np.testing.assert_allclose(to_zero, mu + z * s, rtol=0, atol=1e-8)


def test_ode_solution_round_trip_and_marginals():
    """Exact samples of p_{t_end}, pushed to t_start, have p_{t_start}'s moments; pushing back returns them."""
    gm = GaussianMixture.random(seed=7, num_modes=3, dim=2)
    schedule = LinearVP()
    t_end, t_start = 0.05, 1.0
    num = 4000
    k_data, k_noise = jax.random.split(jax.random.key(1))
    with jax.enable_x64(True):
        x0 = gm.sample(k_data, num, jnp.float64)
        noise = jax.random.normal(k_noise, (num, 2), jnp.float64)
        alpha_end, sigma_end = (float(f(jnp.float64(t_end))) for f in (schedule.alpha, schedule.sigma))
        alpha_start, sigma_start = (float(f(jnp.float64(t_start))) for f in (schedule.alpha, schedule.sigma))
        x_end = np.asarray(alpha_end * x0 + sigma_end * noise)
    x_start = ode_solution(gm, x_end, t_end, t_start, schedule)
    assert x_start.dtype == np.float64 and x_start.shape == x_end.shape
    # p_{t_start} is the mixture with means alpha mu_k and variances alpha^2 s_k^2 + sigma^2.
    mean = alpha_start * gm.mean()
    cov = alpha_start ** 2 * gm.covariance() + sigma_start ** 2 * np.eye(2)
    assert_moments_match(x_start, mean, cov)
    back = ode_solution(gm, x_start, t_start, t_end, schedule)
    np.testing.assert_allclose(back, x_end, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Bad inputs.
# ----------------------------------------------------------------------------------------------

def test_mixture_shape_errors():
    with pytest.raises(ValueError, match="means must have shape"):
        GaussianMixture.create(np.zeros(3), 1.0)
    with pytest.raises(ValueError, match="stds must be"):
        GaussianMixture.create(np.zeros((2, 3)), np.ones((3, 2)))
    with pytest.raises(ValueError, match="stds must be positive"):
        GaussianMixture.create(np.zeros((2, 3)), np.array([1.0, 0.0]))
    with pytest.raises(ValueError, match="weights must have shape"):
        GaussianMixture.create(np.zeros((2, 3)), 1.0, np.array([0.2, 0.3, 0.5]))
    with pytest.raises(ValueError, match="weights must be non-negative and sum to 1"):
        GaussianMixture.create(np.zeros((2, 3)), 1.0, np.array([0.2, 0.3]))
    gm = GaussianMixture.create(np.zeros((2, 3)), np.array([1.0, 2.0]))  # per-component stds broadcast
    assert np.shape(gm.stds) == (2, 3)
    with pytest.raises(ValueError, match="x must have shape"):
        gm.eps(jnp.zeros((4, 5)), 0.5, LinearVP())
    with pytest.raises(ValueError, match="prediction"):
        gm.model_fn(LinearVP(), "noise")


def test_ode_solution_bad_times():
    gm = GaussianMixture.ring(num_modes=4)
    x = np.zeros((1, 2))
    with pytest.raises(ValueError, match="t_to"):
        ode_solution(gm, x, 0.5, "one", LinearVP())
    with pytest.raises(ValueError, match="t_from"):
        ode_solution(gm, x, 1.5, 0.1, LinearVP())
    with pytest.raises(ValueError, match="t_to"):
        ode_solution(gm, x, 0.5, -0.1, LinearVP())
