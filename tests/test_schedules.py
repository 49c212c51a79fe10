"""Noise schedules and time grids: parity with diffusers, closed forms, inverses, grid spacings, bad inputs."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpmjax import schedules
from dpmjax.schedules import CosineVP, DiscreteVP, FlowMatching, LinearVP, time_grid, validate_timesteps

F32_EPS = float(np.finfo(np.float32).eps)

# diffusers beta_schedule name -> (our DiscreteVP.from_name name, keyword arguments). scaled_linear uses
# Stable Diffusion's betas.
DIFFUSERS_SCHEDULES = {
    "linear": ("linear", {}),
    "scaled_linear": ("scaled_linear", {"beta_start": 0.00085, "beta_end": 0.012}),
    "squaredcos_cap_v2": ("cosine", {}),
}


def all_schedules():
    return {
        "discrete_linear": DiscreteVP.from_name("linear"),
        "discrete_scaled_linear": DiscreteVP.from_name("scaled_linear", beta_start=0.00085, beta_end=0.012),
        "discrete_cosine": DiscreteVP.from_name("cosine"),
        "linear": LinearVP(),
        "cosine": CosineVP(),
        "flow": FlowMatching(),
    }


def diffusers():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import diffusers as diffusers_module
    return diffusers_module


# ----------------------------------------------------------------------------------------------
# diffusers parity.
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheduler_name", ["DDPMScheduler", "DDIMScheduler"])
@pytest.mark.parametrize("beta_schedule", list(DIFFUSERS_SCHEDULES))
def test_discrete_alphas_cumprod_match_diffusers(beta_schedule, scheduler_name, x64):
    ours_name, kwargs = DIFFUSERS_SCHEDULES[beta_schedule]
    scheduler = getattr(diffusers(), scheduler_name)(beta_schedule=beta_schedule, **kwargs)
    # Golden values: diffusers' torch schedulers (the reference users trust), computed in float32 there.
    reference = scheduler.alphas_cumprod.double().numpy()
    schedule = DiscreteVP.from_name(ours_name, **kwargs)
    n = schedule.num_train_timesteps
    t = (np.arange(n) + 1.0) / n  # integer timestep k <-> t = (k + 1)/N
    ours = np.asarray(jnp.exp(2.0 * schedule.log_alpha(jnp.asarray(t))))
    # 1e-6: diffusers' float32 cumprod over 1000 factors carries ~5e-7 of rounding.
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-6)
    np.testing.assert_allclose(schedule.alphas_cumprod, reference, rtol=0, atol=1e-6)


def test_discrete_from_betas_and_alphas_cumprod_agree(x64):
    betas = schedules.betas_for_name("linear")
    a = DiscreteVP.from_betas(betas)
    b = DiscreteVP.from_alphas_cumprod(np.cumprod(1.0 - betas))
    np.testing.assert_allclose(a.log_alpha_grid, b.log_alpha_grid, rtol=1e-12, atol=1e-14)


def _diffusers_timesteps(scheduler_name, spacing, num_steps, steps_offset=0):
    scheduler = getattr(diffusers(), scheduler_name)(timestep_spacing=spacing, steps_offset=steps_offset)
    scheduler.set_timesteps(num_steps)
    return scheduler.timesteps.numpy().astype(np.int64)


def _as_integer_timesteps(grid, n):
    ks = grid * n - 1.0
    np.testing.assert_allclose(ks, np.round(ks), atol=1e-9)
    return np.round(ks).astype(np.int64)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("num_steps", [1, 5, 7, 10, 25])
@pytest.mark.parametrize("steps_offset", [0, 1])
def test_discrete_spacings_match_dpm_solver_multistep(spacing, num_steps, steps_offset):
    schedule = DiscreteVP.from_name("linear")
    grid = time_grid(schedule, num_steps, spacing, steps_offset=steps_offset)
    ks = _as_integer_timesteps(grid, schedule.num_train_timesteps)
    expected = _diffusers_timesteps("DPMSolverMultistepScheduler", spacing, num_steps, steps_offset)
    np.testing.assert_array_equal(ks[:-1], expected)
    # the end point is k = 0, where DPMSolverMultistepScheduler(final_sigmas_type="sigma_min") ends.
    assert ks[-1] == 0


@pytest.mark.parametrize("num_steps", [2, 5, 10, 25])
def test_discrete_spacings_relation_to_ddim(num_steps):
    """DDIMScheduler: trailing is the same; its linspace has num_steps points *including* k = 0, i.e. ours
    with one step fewer. (Its leading uses N // num_steps instead of N // (num_steps + 1): not reproduced.)"""
    schedule = DiscreteVP.from_name("linear")
    n = schedule.num_train_timesteps
    trailing = _as_integer_timesteps(time_grid(schedule, num_steps, "trailing"), n)
    np.testing.assert_array_equal(trailing[:-1], _diffusers_timesteps("DDIMScheduler", "trailing", num_steps))
    linspace = _as_integer_timesteps(time_grid(schedule, num_steps - 1, "linspace"), n)
    np.testing.assert_array_equal(linspace, _diffusers_timesteps("DDIMScheduler", "linspace", num_steps))


# ----------------------------------------------------------------------------------------------
# Closed forms and identities.
# ----------------------------------------------------------------------------------------------

def test_linear_vp_closed_form(x64):
    schedule = LinearVP(beta_min=0.1, beta_max=20.0)
    t = np.linspace(0.0, 1.0, 101)
    log_alpha = -(20.0 - 0.1) * t ** 2 / 4.0 - 0.1 * t / 2.0
    np.testing.assert_allclose(schedule.log_alpha(jnp.asarray(t)), log_alpha, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(schedule.sigma(jnp.asarray(t[1:])), np.sqrt(1.0 - np.exp(2.0 * log_alpha[1:])),
                               rtol=1e-12)


def test_cosine_vp_closed_form(x64):
    schedule = CosineVP()
    s = 0.008
    t = np.linspace(0.0, 0.9946, 101)
    alpha = np.cos((t + s) / (1 + s) * np.pi / 2) / np.cos(s / (1 + s) * np.pi / 2)
    # rtol 1e-10: the closed form itself loses digits to cos near pi/2 at t_max (alpha ~ 8e-3).
    np.testing.assert_allclose(schedule.alpha(jnp.asarray(t)), alpha, rtol=1e-10)
    np.testing.assert_allclose(schedule.sigma(jnp.asarray(t[1:])), np.sqrt(1.0 - alpha[1:] ** 2), rtol=1e-10)


def test_flow_matching_closed_form(x64):
    schedule = FlowMatching()
    t = np.linspace(0.0, 1.0, 101)
    np.testing.assert_allclose(schedule.alpha(jnp.asarray(t)), 1.0 - t, rtol=0, atol=1e-15)
    np.testing.assert_allclose(schedule.sigma(jnp.asarray(t)), t, rtol=0, atol=0)
    inner = jnp.asarray(t[1:-1])
    np.testing.assert_allclose(schedule.lambda_(inner), np.log((1.0 - t[1:-1]) / t[1:-1]), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("name", ["discrete_linear", "discrete_cosine", "linear", "cosine"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_vp_alpha_sigma_identity(name, dtype):
    schedule = all_schedules()[name]
    lo, hi = schedule.time_range
    with jax.enable_x64(dtype == jnp.float64):
        t = jnp.linspace(max(lo, 1e-4), hi, 257, dtype=dtype)
        alpha, sigma = schedule.alpha(t), schedule.sigma(t)
        assert alpha.dtype == dtype and sigma.dtype == dtype
        tol = 4 * float(jnp.finfo(dtype).eps)
        np.testing.assert_allclose(alpha ** 2 + sigma ** 2, 1.0, rtol=0, atol=tol)
        np.testing.assert_allclose(schedule.lambda_(t), jnp.log(alpha / sigma), rtol=0, atol=1e3 * tol)
        np.testing.assert_allclose(schedule.sigma_ve(t), sigma / alpha, rtol=1e2 * tol)


@pytest.mark.parametrize("name", list(all_schedules()))
def test_lambda_is_decreasing(name, x64):
    schedule = all_schedules()[name]
    lo, hi = schedule.time_range
    t = jnp.linspace(lo + 1e-4, hi - (1e-4 if name == "flow" else 0.0), 1001)
    assert np.all(np.diff(np.asarray(schedule.lambda_(t))) < 0)


def _test_times(schedule, name):
    """float32 times over the whole range (log- and linearly spaced), away from lambda = +-inf."""
    lo, hi = schedule.time_range
    lo = max(lo, 1e-5)
    if name == "flow":
        hi = 1.0 - 1e-4  # alpha = 0 at t = 1
    t = np.concatenate([np.geomspace(lo, hi, 500), np.linspace(lo, hi, 501)]).astype(np.float32)
    return np.unique(t[(t >= lo) & (t <= hi)])


@pytest.mark.parametrize("name", list(all_schedules()))
def test_lambda_round_trip_float32(name):
    """t -> lambda -> t in float32, to within what float32 can resolve.

    Error model: each evaluation is a short chain of exp/log/expm1/log1p, each correct to a few ulps relative.
    lambda = log alpha - log sigma is then known to an absolute error ~ eps (1 + |log alpha| + |log sigma|)
    (the two logs may cancel when lambda ~ 0, so their sizes, not |lambda|, set the scale), and the final
    rounding of t adds ~ eps |t|. Mapping the lambda error back to t multiplies it by the conditioning
    |dt/dlambda|:
        |t_rt - t| <= C eps (|t| + |dt/dlambda| (1 + |log alpha| + |log sigma|)),
    with dt/dlambda from autodiff in float64. C = 8 leaves room for the ~5 roundings on each path (observed
    maximum ~1.5). The same bound (divided by |dt/dlambda|) holds for lambda itself against float64.
    """
    schedule = all_schedules()[name]
    t = _test_times(schedule, name)
    lam32 = schedule.lambda_(jnp.asarray(t))
    t_rt = schedule.t_of_lambda(lam32)
    assert lam32.dtype == jnp.float32 and t_rt.dtype == jnp.float32
    with jax.enable_x64(True):
        t64 = jnp.asarray(t, jnp.float64)
        lam64 = np.asarray(schedule.lambda_(t64))
        dt_dlam = 1.0 / np.asarray(jax.vmap(jax.grad(schedule.lambda_))(t64))
        log_scale = 1.0 + np.abs(np.asarray(schedule.log_alpha(t64))) + np.abs(np.asarray(schedule.log_sigma(t64)))
    bound = 8 * F32_EPS * (np.abs(t) + np.abs(dt_dlam) * log_scale)
    err = np.abs(np.asarray(t_rt, np.float64) - t)
    assert np.all(err <= bound), f"worst t={t[np.argmax(err / bound)]}, err={err.max()}"
    lam_err = np.abs(np.asarray(lam32, np.float64) - lam64)
    assert np.all(lam_err <= bound / np.abs(dt_dlam)), f"worst t={t[np.argmax(lam_err * np.abs(dt_dlam) / bound)]}"


@pytest.mark.parametrize("name", list(all_schedules()))
def test_lambda_round_trip_float64(name, x64):
    schedule = all_schedules()[name]
    t = jnp.asarray(_test_times(schedule, name), jnp.float64)
    np.testing.assert_allclose(schedule.t_of_lambda(schedule.lambda_(t)), t, rtol=0, atol=1e-10)
    lam = schedule.lambda_(t)
    np.testing.assert_allclose(schedule.lambda_(schedule.t_of_lambda(lam)), lam, rtol=1e-10, atol=1e-10)


def test_discrete_schedule_interpolates_between_grid_points(x64):
    schedule = DiscreteVP.from_name("linear")
    t = jnp.asarray([0.0105, 0.5005])  # midpoints of (k+1)/N grid cells
    grid = np.asarray(schedule.log_alpha_grid)
    expected = 0.5 * (grid[[9, 499]] + grid[[10, 500]])
    np.testing.assert_allclose(schedule.log_alpha(t), expected, rtol=1e-12)


def test_schedules_are_jittable_and_differentiable():
    for schedule in all_schedules().values():
        t = jnp.asarray([0.3, 0.7], jnp.float32)
        np.testing.assert_allclose(jax.jit(schedule.lambda_)(t), schedule.lambda_(t), rtol=1e-6)
        grad = jax.grad(lambda tt: jnp.sum(schedule.lambda_(tt)))(t)
        assert np.all(np.asarray(grad) < 0)


# ----------------------------------------------------------------------------------------------
# Time grids.
# ----------------------------------------------------------------------------------------------

CONTINUOUS_SPACINGS = ["logSNR", "time_uniform", "time_quadratic", "karras"]


@pytest.mark.parametrize("spacing", schedules.SPACINGS)
@pytest.mark.parametrize("name", list(all_schedules()))
def test_time_grid_shape_order_endpoints(name, spacing):
    schedule = all_schedules()[name]
    num_steps = 6
    if spacing in schedules.DISCRETE_SPACINGS and not isinstance(schedule, DiscreteVP):
        with pytest.raises(ValueError, match="spacing"):
            time_grid(schedule, num_steps, spacing)
        return
    grid = time_grid(schedule, num_steps, spacing)
    assert isinstance(grid, np.ndarray) and grid.dtype == np.float64 and grid.shape == (num_steps + 1,)
    assert np.all(np.diff(grid) < 0)
    validate_timesteps(schedule, grid)
    if spacing in schedules.DISCRETE_SPACINGS:
        n = schedule.num_train_timesteps
        assert grid[-1] == 1.0 / n
        assert grid[0] <= 1.0
    else:
        assert grid[0] == schedule.default_t_start and grid[-1] == schedule.default_t_end
        custom = time_grid(schedule, num_steps, spacing, t_start=0.8, t_end=0.05)
        assert custom[0] == 0.8 and custom[-1] == 0.05 and np.all(np.diff(custom) < 0)


@pytest.mark.parametrize("name", ["discrete_linear", "linear", "cosine", "flow"])
def test_time_grid_spacing_formulas(name, x64):
    schedule = all_schedules()[name]
    n, t_start, t_end = 8, 0.9, 0.01
    lam = lambda g: np.asarray(schedule.lambda_(jnp.asarray(g)))  # noqa: E731

    uniform = time_grid(schedule, n, "time_uniform", t_start=t_start, t_end=t_end)
    np.testing.assert_allclose(np.diff(uniform), (t_end - t_start) / n, rtol=1e-12)

    quadratic = time_grid(schedule, n, "time_quadratic", t_start=t_start, t_end=t_end)
    np.testing.assert_allclose(np.diff(np.sqrt(quadratic)), (np.sqrt(t_end) - np.sqrt(t_start)) / n, rtol=1e-12)

    log_snr = time_grid(schedule, n, "logSNR", t_start=t_start, t_end=t_end)
    lam_start, lam_end = lam(t_start), lam(t_end)
    np.testing.assert_allclose(np.diff(lam(log_snr)), (lam_end - lam_start) / n, rtol=1e-9)

    rho = 7.0
    karras = time_grid(schedule, n, "karras", t_start=t_start, t_end=t_end, rho=rho)
    s_max, s_min = np.exp(-lam_start), np.exp(-lam_end)
    i = np.arange(n + 1)
    expected = (s_max ** (1 / rho) + i / n * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho  # Karras eq. 5
    np.testing.assert_allclose(np.asarray(schedule.sigma_ve(jnp.asarray(karras))), expected, rtol=1e-9)


def test_time_grid_works_under_jit_and_without_x64():
    schedule = LinearVP()
    eager = time_grid(schedule, 5, "logSNR")
    traced = jax.jit(lambda: jnp.asarray(time_grid(schedule, 5, "logSNR"), jnp.float32))()
    np.testing.assert_allclose(traced, eager.astype(np.float32), rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Bad inputs.
# ----------------------------------------------------------------------------------------------

def test_unknown_names_raise():
    with pytest.raises(ValueError, match="name"):
        DiscreteVP.from_name("quadratic")
    with pytest.raises(ValueError, match="spacing"):
        time_grid(LinearVP(), 5, "uniform")
    with pytest.raises(ValueError, match="num_train_timesteps"):
        schedules.betas_for_name("linear", num_train_timesteps=1)


def test_bad_schedule_parameters_raise():
    with pytest.raises(ValueError, match="beta_min"):
        LinearVP(beta_min=1.0, beta_max=0.5)
    with pytest.raises(ValueError, match="betas"):
        DiscreteVP.from_betas(np.array([0.1, 1.5]))
    with pytest.raises(ValueError, match="alphas_cumprod"):
        DiscreteVP.from_alphas_cumprod(np.array([0.5, 0.9]))


def test_check_times():
    schedule = DiscreteVP.from_name("linear")
    schedule.check_times(np.array([1e-3, 0.5, 1.0]))
    with pytest.raises(ValueError, match="t must lie in"):
        schedule.check_times(np.array([0.5, 1.5]))
    with pytest.raises(ValueError, match="t must lie in"):
        schedule.check_times(0.0)  # below t_min = 1/N
    with pytest.raises(ValueError, match="my_time must be finite"):
        schedule.check_times(np.nan, name="my_time")
    with pytest.raises(ValueError, match="t_start"):
        time_grid(LinearVP(), 5, t_start=1.5)
    with pytest.raises(ValueError, match="t_start"):
        time_grid(LinearVP(), 5, t_start=0.1, t_end=0.2)
    # under tracing the check is a no-op (values are unknown).
    jax.jit(lambda t: schedule.check_times(t) or t)(jnp.float32(2.0))


@pytest.mark.parametrize("num_steps", [0, -1, 2.5])
def test_bad_num_steps(num_steps):
    with pytest.raises(ValueError, match="num_steps"):
        time_grid(LinearVP(), num_steps)


def test_discrete_spacing_bad_step_counts():
    schedule = DiscreteVP.from_name("linear", num_train_timesteps=10)
    with pytest.raises(ValueError, match="num_steps"):
        time_grid(schedule, 11, "linspace")
    with pytest.raises(ValueError, match="timestep"):
        time_grid(schedule, 10, "leading")  # N // (num_steps + 1) = 0: repeated timesteps
    with pytest.raises(ValueError, match="timestep 0"):
        time_grid(schedule, 10, "trailing")  # the last trailing timestep is already k = 0


def test_validate_timesteps():
    schedule = LinearVP()
    good = np.array([1.0, 0.5, 0.1])
    np.testing.assert_array_equal(validate_timesteps(schedule, good), good)
    per_sample = np.stack([good, good * 0.9], axis=1)  # [N+1, B]
    assert validate_timesteps(schedule, per_sample).shape == (3, 2)
    with pytest.raises(ValueError, match="timesteps must be strictly decreasing"):
        validate_timesteps(schedule, np.array([1.0, 0.2, 0.5]))
    with pytest.raises(ValueError, match="timesteps must be strictly decreasing"):
        validate_timesteps(schedule, np.array([1.0, 0.5, 0.5]))
    with pytest.raises(ValueError, match="timesteps needs at least 2 points"):
        validate_timesteps(schedule, np.array([1.0]))
    with pytest.raises(ValueError, match="timesteps must have shape"):
        validate_timesteps(schedule, np.ones((2, 2, 2)))
    with pytest.raises(ValueError, match="timesteps must lie in"):
        validate_timesteps(schedule, np.array([1.2, 0.5]))
    with pytest.raises(ValueError, match="my_grid needs at least 3"):
        validate_timesteps(schedule, good[:2], min_points=3, name="my_grid")
