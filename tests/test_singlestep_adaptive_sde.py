"""Singlestep DPM-Solver(++), the adaptive DPM-Solver-12/23 and SDE-DPM-Solver++(2M).

Oracles: the Gaussian-mixture ring's exact ODE solution (convergence orders, adaptive accuracy) and its exact
mean/covariance (SDE samples); diffusers' schedulers for exact parity where they implement the same method.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpmjax
from dpmjax.oracle import GaussianMixture, ode_solution
from dpmjax.samplers import plan
from dpmjax.samplers.adaptive import sample_adaptive
from dpmjax.samplers.dpm_solver_singlestep import singlestep_orders


def plan_parts(*args, **kwargs):
    """(solver, solver grid times, final_denoise) of ``plan``."""
    p = plan(*args, **kwargs)
    return p.solver, p.grid["t"], p.final_denoise


def plan_times(*args, **kwargs):
    """The solver grid (times) that ``plan`` builds."""
    return plan(*args, **kwargs).grid["t"]

SCHEDULE = dpmjax.DiscreteVP.from_name("linear")
MIXTURE = GaussianMixture.ring()
MODEL = MIXTURE.model_fn(SCHEDULE)
MODEL_JIT = jax.jit(MODEL)  # for the step-by-step diffusers loops (one compile instead of op-by-op dispatch)
SINGLESTEP = {"dpm_solver_1": 1, "dpm_solver_2": 2, "dpm_solver_3": 3, "dpmpp_2s": 2}


def rms(a, b):
    return float(jnp.sqrt(jnp.mean((jnp.asarray(a) - jnp.asarray(b)) ** 2)))


@pytest.fixture(scope="module")
def ode_case():
    """x_T (float64 [8, 2]) and its exact probability-flow ODE image at t_end = 1e-3."""
    with jax.enable_x64(True):
        x = np.asarray(jax.random.normal(jax.random.key(0), (8, 2), jnp.float64))
        return x, ode_solution(MIXTURE, x, 1.0, 1e-3, SCHEDULE)


# ---------------------------------------------------------------------------------------------------------
# Singlestep.
# ---------------------------------------------------------------------------------------------------------

def test_dpm_solver_1_equals_ddim(x64):
    x = jax.random.normal(jax.random.key(1), (4, 2), jnp.float64)
    ours = dpmjax.sample(MODEL, x, schedule=SCHEDULE, solver="dpm_solver_1", nfe=7, spacing="logSNR")
    ddim = dpmjax.sample(MODEL, x, schedule=SCHEDULE, solver="ddim", nfe=7, spacing="logSNR")
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ddim), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(SINGLESTEP))
def test_order_mixing_uses_exactly_nfe_calls(name):
    order = SINGLESTEP[name]
    for nfe in range(1, 13):
        orders = singlestep_orders(nfe, order)
        assert sum(orders) == nfe and max(orders) <= order and all(o >= 1 for o in orders)
        built, grid, final = plan_parts(SCHEDULE, name, nfe=nfe)
        assert built.num_model_calls == nfe and grid.shape == (nfe + 1,) and not final
        if nfe >= 2:  # the driver's last call is the x0 step to sigma = 0
            built, grid, final = plan_parts(SCHEDULE, name, nfe=nfe, final_sigma="zero")
            assert built.num_model_calls == nfe - 1 and final
    # the official mixing rule (DPM-Solver code, method="singlestep")
    assert singlestep_orders(9, 3) == [3, 3, 2, 1]
    assert singlestep_orders(10, 3) == [3, 3, 3, 1]
    assert singlestep_orders(11, 3) == [3, 3, 3, 2]
    assert singlestep_orders(7, 2) == [2, 2, 2, 1]


def test_logsnr_grid_is_the_official_one():
    """K + 1 lambda-uniform outer times, each outer step split uniformly in lambda (r = 1/3, 2/3; 1/2)."""
    with jax.enable_x64(True):
        grid = plan_times(SCHEDULE, "dpm_solver_3", nfe=11, spacing="logSNR")  # orders [3, 3, 3, 2]
        lam = np.asarray(SCHEDULE.lambda_(jnp.asarray(grid, jnp.float64)))
    outer = lam[[0, 3, 6, 9, 11]]
    np.testing.assert_allclose(np.diff(outer), np.diff(outer)[0], rtol=1e-9)
    np.testing.assert_allclose(np.diff(lam[:10]), np.diff(outer)[0] / 3, rtol=1e-9)
    np.testing.assert_allclose(np.diff(lam[9:]), np.diff(outer)[0] / 2, rtol=1e-9)
    # other spacings: the official outer times are the N-step grid at cumsum(orders), split by the same spacing,
    # which is the N-step grid itself.
    grid = plan_times(SCHEDULE, "dpm_solver_3", nfe=11, spacing="time_uniform")
    np.testing.assert_allclose(grid, np.linspace(1.0, 1e-3, 12), rtol=1e-12)


# Asymptotic regimes (measured): order 2 from NFE ~ 48 on; order 3 from NFE ~ 100 on, with NFE = 2 mod 3 so that
# every outer step but the last (order 2, local error O(h^3)) is third order: with NFE = 0 or 1 mod 3 the
# official mixing ends with an order-1 step of full outer size, whose O(h^2) local error caps the global
# order at 2 (the slope drifts from ~3.5 to ~2.6 between NFE 24 and 384). Errors fall like h^p with the
# outer step h = (lambda_end - lambda_start)/K, so the slope is fitted against K.
@pytest.mark.parametrize("name,solver_type,nfes,order", [
    ("dpm_solver_2", "dpmsolver", (96, 192), 2),     # measured 2.03 (48 -> 96: 2.06)
    ("dpmpp_2s", "dpmsolver", (96, 192), 2),         # measured 1.97 (48 -> 96: 1.95)
    ("dpm_solver_3", "dpmsolver", (194, 386), 3),    # measured 3.06 (98 -> 194: 3.13)
    ("dpm_solver_3", "taylor", (194, 386), 3),       # measured 2.99 (98 -> 194: 2.96)
])
def test_convergence_order(name, solver_type, nfes, order, ode_case, x64):
    x, ref = ode_case
    errors, outer_steps = [], []
    for nfe in nfes:
        out = dpmjax.sample(MODEL, jnp.asarray(x), schedule=SCHEDULE, solver=name, nfe=nfe, spacing="logSNR",
                            solver_type=solver_type)
        errors.append(rms(out, ref))
        outer_steps.append(len(singlestep_orders(nfe, SINGLESTEP[name])))
    slope = -np.polyfit(np.log(outer_steps), np.log(errors), 1)[0]
    assert abs(slope - order) < 0.3, (errors, slope)


def test_dpmpp_2s_matches_diffusers_singlestep():
    """diffusers' DPMSolverSinglestepScheduler (order 2, dpmsolver++, midpoint) is DPM-Solver++(2S) on the same
    grid when NFE is even and it does not lower the final order (its default lower_order_final=True would
    make the last step first order; ``sigma_min`` keeps the grid's last point t = 1/N)."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    nfe, x = 8, jax.random.normal(jax.random.key(2), (4, 2), jnp.float32)
    ours = dpmjax.sample(MODEL, x, schedule=SCHEDULE, solver="dpmpp_2s", nfe=nfe, spacing="linspace")
    sched = diffusers.DPMSolverSinglestepScheduler(
        beta_schedule="linear", solver_order=2, algorithm_type="dpmsolver++", solver_type="midpoint",
        lower_order_final=False, final_sigmas_type="sigma_min")
    sched.set_timesteps(nfe)
    sample = torch.from_numpy(np.array(x))
    for k in sched.timesteps:
        t = jnp.full((4,), (int(k) + 1) / 1000.0, jnp.float32)
        eps = torch.from_numpy(np.array(MODEL_JIT(jnp.asarray(sample.numpy()), t)))
        sample = sched.step(eps, k, sample).prev_sample
    # float32 on both sides (diffusers keeps sigmas in float32): agreement to a few 1e-6 relative.
    np.testing.assert_allclose(np.asarray(ours), sample.numpy(), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# Adaptive.
# ---------------------------------------------------------------------------------------------------------

def test_adaptive_reaches_the_ode_solution_and_counts_nfe(ode_case, x64):
    x, ref = ode_case
    calls = []

    def counting_model(x_t, t):
        jax.debug.callback(lambda: calls.append(1))
        return MODEL(x_t, t)

    tol = 1e-3
    out, info = sample_adaptive(counting_model, x, schedule=SCHEDULE, order=3, rtol=tol, atol=tol)
    jax.effects_barrier()
    assert bool(info.finished) and abs(float(info.t_final) - 1e-3) <= 1e-5
    assert len(calls) == int(info.nfe) == 3 * (int(info.num_accepted) + int(info.num_rejected))
    # per-step errors are held below tol (relative to |x| ~ 2); the global error stays within a few of them.
    scale = tol * (1.0 + np.max(np.abs(ref)))
    assert np.max(np.abs(np.asarray(out) - ref)) < scale, np.max(np.abs(np.asarray(out) - ref))
    # measured: 99 NFE, max error 1.2e-4; rtol = atol = 1e-4: 165 NFE, 1.5e-5; 1e-2: 60 NFE, 1.1e-3.
    # through ``sample``: the same result (nfe is not used; max_nfe is the cap)
    via_sample = dpmjax.sample(MODEL, x, schedule=SCHEDULE, solver="dpm_solver_adaptive", nfe=1, order=3,
                               rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(via_sample), np.asarray(out), rtol=1e-12, atol=1e-12)


def test_adaptive_order2_noise_prediction_and_cap(ode_case, x64):
    x, ref = ode_case
    tol = 1e-3
    out, info = sample_adaptive(MODEL, x, schedule=SCHEDULE, order=2, algorithm="dpmsolver", rtol=tol, atol=tol)
    assert bool(info.finished) and int(info.nfe) % 2 == 0
    assert np.max(np.abs(np.asarray(out) - ref)) < 5 * tol * (1.0 + np.max(np.abs(ref)))
    capped, capped_info = sample_adaptive(MODEL, x, schedule=SCHEDULE, order=3, max_nfe=10)
    assert int(capped_info.nfe) == 9 and not bool(capped_info.finished)
    assert np.all(np.isfinite(np.asarray(capped)))


def test_adaptive_rejects_what_it_cannot_do():
    x = jnp.zeros((2, 2))
    with pytest.raises(ValueError, match="order must be one of"):
        dpmjax.sample(MODEL, x, schedule=SCHEDULE, solver="dpm_solver_adaptive", nfe=1, order=1)
    with pytest.raises(ValueError, match="algorithm must be one of"):
        dpmjax.sample(MODEL, x, schedule=SCHEDULE, solver="dpm_solver_adaptive", nfe=1, algorithm="ddim")
    with pytest.raises(ValueError, match="final_sigma='zero'"):
        dpmjax.sample(MODEL, x, schedule=SCHEDULE, solver="dpm_solver_adaptive", nfe=2, final_sigma="zero")
    with pytest.raises(ValueError, match="return_trajectory"):
        dpmjax.sample(MODEL, x, schedule=SCHEDULE, solver="dpm_solver_adaptive", nfe=1, return_trajectory=True)
    with pytest.raises(ValueError, match="max_nfe"):
        sample_adaptive(MODEL, x, schedule=SCHEDULE, order=3, max_nfe=2)
    with pytest.raises(ValueError, match="rtol and atol"):
        sample_adaptive(MODEL, x, schedule=SCHEDULE, rtol=0.0, atol=0.0)


# ---------------------------------------------------------------------------------------------------------
# SDE-DPM-Solver++(2M).
# ---------------------------------------------------------------------------------------------------------

def test_sde_dpmpp_2m_samples_have_the_data_moments():
    num = 4000
    x = jax.random.normal(jax.random.key(3), (num, 2), jnp.float32)
    out = np.asarray(dpmjax.sample(MODEL, x, schedule=SCHEDULE, solver="sde_dpmpp_2m", nfe=30,
                                   key=jax.random.key(4), final_sigma="zero"), np.float64)
    assert np.all(np.isfinite(out))
    mean, cov = MIXTURE.mean(), MIXTURE.covariance()  # (0, 0) and 2.09 I
    # Monte-Carlo standard errors with 4000 samples: mean 0.023, variance 0.066, covariance 0.033; ~4.5 of them.
    np.testing.assert_allclose(out.mean(0), mean, atol=0.1)
    np.testing.assert_allclose(np.diag(np.cov(out.T)), np.diag(cov), atol=0.3)
    assert abs(np.cov(out.T)[0, 1] - cov[0, 1]) < 0.15
    # the samples sit on the ring's modes (radius 2, std 0.3), not smeared: mean radius within 0.05 of ~1.99
    radius = np.linalg.norm(out, axis=1)
    assert abs(radius.mean() - 2.0) < 0.1 and radius.std() < 0.4


@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
def test_sde_dpmpp_2m_matches_diffusers_with_the_same_noise(solver_type):
    """diffusers' DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++") fed our noise z_i (fold_in(key, i))
    as ``variance_noise``; its last step to sigma = 0 is our driver's x0 step."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    nfe, key = 8, jax.random.key(5)
    x = jax.random.normal(jax.random.key(6), (4, 2), jnp.float32)
    ours = dpmjax.sample(MODEL, x, schedule=SCHEDULE, solver="sde_dpmpp_2m", nfe=nfe, spacing="linspace",
                         final_sigma="zero", key=key, solver_type=solver_type)
    sched = diffusers.DPMSolverMultistepScheduler(
        beta_schedule="linear", solver_order=2, algorithm_type="sde-dpmsolver++", solver_type=solver_type,
        final_sigmas_type="zero")
    sched.set_timesteps(nfe)
    sample = torch.from_numpy(np.array(x))
    for i, k in enumerate(sched.timesteps):
        t = jnp.full((4,), (int(k) + 1) / 1000.0, jnp.float32)
        eps = torch.from_numpy(np.array(MODEL_JIT(jnp.asarray(sample.numpy()), t)))
        z = np.array(jax.random.normal(jax.random.fold_in(key, i), x.shape, jnp.float32))
        sample = sched.step(eps, k, sample, variance_noise=torch.from_numpy(z)).prev_sample
    np.testing.assert_allclose(np.asarray(ours), sample.numpy(), rtol=1e-4, atol=1e-4)
