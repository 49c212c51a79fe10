"""Multistep DPM-Solver / DPM-Solver++ and DDIM: convergence order against the exact ODE solution, and
parity with diffusers' PyTorch schedulers on the same oracle model and the same time grid."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpmjax
from dpmjax.oracle import GaussianMixture, ode_solution

try:  # the diffusers parity tests need the test extra; the oracle tests in this file run without it
    import diffusers
    import torch
except ImportError:
    diffusers = torch = None
needs_diffusers = pytest.mark.skipif(diffusers is None, reason="diffusers parity needs torch and diffusers")

MIXTURE = GaussianMixture.ring()


def rel_rmse(a, b):
    return float(np.sqrt(np.mean((np.asarray(a) - np.asarray(b)) ** 2) / np.mean(np.asarray(b) ** 2)))


def measured_order(errors, nfes):
    """Least-squares slope of log(error) against log(1/nfe) (the step size h in lambda is ~ 1/nfe)."""
    return float(np.polyfit(np.log(1.0 / np.asarray(nfes, float)), np.log(errors), 1)[0])


# Orders on the smooth part of the range. The official (and diffusers') order-3 multistep update estimates
# the second derivative term at half its Taylor value (see dpm_solver.py), so the 3M methods are second
# order as shipped; exact_third_order=True restores order 3 (asserted separately below).
ORDERS = {"ddim": 1.0, "dpm_solver_2m": 2.0, "dpmpp_2m": 2.0, "dpm_solver_3m": 2.0, "dpmpp_3m": 2.0}


# Relative error at nfe = 10 (logSNR grid, linear discrete schedule, 8-mode ring), as measured when these
# tests were written, times 1.5: a regression bound. dpmpp_2m is the largest because lower_order_final makes
# its last (lowest-noise, largest x0-curvature) step first order.
ERROR_AT_10 = {"ddim": 0.17, "dpm_solver_2m": 0.03, "dpm_solver_3m": 0.022, "dpmpp_2m": 0.08, "dpmpp_3m": 0.06}


@pytest.fixture(scope="module")
def reference_64():
    with jax.enable_x64(True):
        schedule = dpmjax.DiscreteVP.from_name("linear")
        x_T = jax.random.normal(jax.random.key(0), (64, 2), jnp.float64)
        return schedule, np.asarray(x_T), ode_solution(MIXTURE, x_T, 1.0, 1e-3, schedule)


@pytest.mark.parametrize("name", sorted(ORDERS))
def test_convergence_order(name, reference_64, x64):
    schedule, x_T, reference = reference_64
    run = lambda n: rel_rmse(dpmjax.sample(MIXTURE.model_fn(schedule), jnp.asarray(x_T), schedule=schedule,
                                           solver=name, nfe=n, spacing="logSNR"), reference)
    nfes = [16, 24, 32, 48]
    errors = [run(n) for n in nfes]
    slope = measured_order(errors, nfes)
    assert abs(slope - ORDERS[name]) <= 0.3, (slope, errors)
    assert run(10) < ERROR_AT_10[name]


@pytest.mark.parametrize("name", ["dpm_solver_3m", "dpmpp_3m"])
def test_exact_third_order_option_is_third_order(name, reference_64, x64):
    schedule, x_T, reference = reference_64
    nfes = [48, 96, 192]  # order 3 is reached later than order 2 (slope ~2.5 at 24-64 calls)
    errors = [rel_rmse(dpmjax.sample(MIXTURE.model_fn(schedule), jnp.asarray(x_T), schedule=schedule, solver=name,
                                     nfe=n, spacing="logSNR", exact_third_order=True, lower_order_final=False),
                       reference) for n in nfes]
    assert abs(measured_order(errors, nfes) - 3.0) <= 0.3, errors


def test_third_order_beats_second_order(reference_64, x64):
    schedule, x_T, reference = reference_64
    err = {name: rel_rmse(dpmjax.sample(MIXTURE.model_fn(schedule), jnp.asarray(x_T), schedule=schedule,
                                        solver=name, nfe=32, spacing="logSNR"), reference)
           for name in ("dpmpp_2m", "dpmpp_3m", "dpm_solver_2m", "dpm_solver_3m")}
    assert err["dpmpp_3m"] < err["dpmpp_2m"] and err["dpm_solver_3m"] < err["dpm_solver_2m"], err


# ------------------------------------------------------------------------------------------------
# Parity with diffusers (torch, float64 where diffusers allows; it upcasts samples to float32 inside
# DPMSolverMultistepScheduler.step, which bounds the agreement at ~1e-6 relative).
# ------------------------------------------------------------------------------------------------

def torch_eps_model(schedule_acp):
    """diffusers' discrete timestep k -> the oracle's exact eps at our t = (k + 1)/N."""
    schedule = dpmjax.DiscreteVP.from_alphas_cumprod(schedule_acp)
    n = schedule.num_train_timesteps

    def model(sample, timestep):
        k = float(timestep)
        with jax.enable_x64(True):
            eps = MIXTURE.eps(jnp.asarray(sample.numpy(), jnp.float64), (k + 1.0) / n, schedule)
        return torch.from_numpy(np.array(eps))

    return schedule, model


def run_diffusers(scheduler, model, x_T, nfe):
    scheduler.set_timesteps(nfe)
    x = torch.from_numpy(np.asarray(x_T, np.float64))
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t), t, x).prev_sample.to(torch.float64)
    return x.numpy()


def parity_inputs(seed=0):
    return np.asarray(jax.random.normal(jax.random.key(seed), (16, 2), jnp.float32), np.float64)


@needs_diffusers
@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("algorithm", ["dpmsolver++", "dpmsolver"])
@pytest.mark.parametrize("nfe", [8, 20])
def test_parity_dpm_solver_multistep(order, algorithm, nfe, x64):
    # diffusers only ends at sigma = 0 for dpmsolver++; for dpmsolver it ends at sigma_min (our t_end = 1/N).
    final = "zero" if algorithm == "dpmsolver++" else "sigma_min"
    scheduler = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_schedule="linear", solver_order=order, algorithm_type=algorithm,
        solver_type="midpoint", lower_order_final=True, final_sigmas_type=final, timestep_spacing="linspace")
    schedule, model = torch_eps_model(scheduler.alphas_cumprod.double().numpy())
    x_T = parity_inputs()
    expected = run_diffusers(scheduler, model, x_T, nfe)
    solver = f"{'dpmpp' if algorithm == 'dpmsolver++' else 'dpm_solver'}_{order}m"
    ours = dpmjax.sample(MIXTURE.model_fn(schedule), jnp.asarray(x_T), schedule=schedule, solver=solver, nfe=nfe,
                         spacing="linspace", final_sigma="zero" if final == "zero" else "t_end")
    # diffusers computes each step in float32 (see above): 1e-5 relative is its precision after 20 steps.
    assert rel_rmse(ours, expected) < 1e-5


@needs_diffusers
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
def test_parity_dpmpp_2m_solver_types(solver_type, x64):
    scheduler = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_schedule="linear", solver_order=2, algorithm_type="dpmsolver++",
        solver_type=solver_type, final_sigmas_type="zero", timestep_spacing="linspace")
    schedule, model = torch_eps_model(scheduler.alphas_cumprod.double().numpy())
    x_T = parity_inputs(1)
    expected = run_diffusers(scheduler, model, x_T, 12)
    ours = dpmjax.sample(MIXTURE.model_fn(schedule), jnp.asarray(x_T), schedule=schedule, solver="dpmpp_2m",
                         nfe=12, spacing="linspace", final_sigma="zero",
                         solver_type={"midpoint": "dpmsolver", "heun": "taylor"}[solver_type])
    assert rel_rmse(ours, expected) < 1e-5


@needs_diffusers
@pytest.mark.parametrize("nfe", [10, 50])
def test_parity_ddim(nfe, x64):
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False,
                                        set_alpha_to_one=True, timestep_spacing="leading")
    schedule, model = torch_eps_model(scheduler.alphas_cumprod.double().numpy())
    x_T = parity_inputs(2)
    expected = run_diffusers(scheduler, model, x_T, nfe)
    # DDIMScheduler steps from k to k - 1000 // nfe ("leading": k = (nfe - 1 .. 0) * 1000 // nfe), and its last
    # step, from k = 0, goes to alpha = 1 (set_alpha_to_one): our grid plus final_sigma="zero". (With
    # "linspace" DDIMScheduler's previous timestep is still k - 1000 // nfe, not the next grid point.)
    ks = np.arange(nfe)[::-1] * (1000 // nfe)
    timesteps = np.append((ks + 1.0) / 1000.0, 0.0)  # the last point stands for sigma = 0
    ours = dpmjax.sample(MIXTURE.model_fn(schedule), jnp.asarray(x_T), schedule=schedule, solver="ddim",
                         timesteps=timesteps, final_sigma="zero")
    assert rel_rmse(ours, expected) < 1e-5


def test_ddim_is_dpm_solver_order_one(x64):
    """DPM-Solver-1 (eq. 3.7 with k = 1) is DDIM: the order-1 multistep update reproduces it exactly."""
    from dpmjax.samplers.dpm_solver import make_multistep
    from dpmjax.samplers.driver import device_grid, make_evaluate, plan, run_plan

    schedule = dpmjax.DiscreteVP.from_name("cosine")
    x_T = jax.random.normal(jax.random.key(3), (8, 2), jnp.float64)
    kwargs = dict(schedule=schedule, nfe=9, spacing="time_uniform")
    ddim = dpmjax.sample(MIXTURE.model_fn(schedule), x_T, solver="ddim", **kwargs)
    p = plan(schedule, "dpm_solver_2m", nfe=9, spacing="time_uniform")
    evaluate = make_evaluate(MIXTURE.model_fn(schedule), schedule)
    for data in (False, True):
        order_one = p._replace(solver=make_multistep(schedule, 9, order=1, data=data))
        out, _, _ = run_plan(order_one, evaluate, x_T, None, device_grid(p.grid, x_T.dtype))
        np.testing.assert_allclose(np.asarray(out), np.asarray(ddim), rtol=1e-12, atol=1e-12)


def test_stochastic_ddpm_draws_the_joint_of_the_forward_process(x64):
    """DDPM ancestral sampling with many steps draws (x_0, x_T) from the forward process's joint: x_0 ~ p_0 (mean
    and covariance of the mixture) and Cov(x_0, x_T) = alpha_T Cov(x_0) ~ 0, since x_T = alpha_T x_0 + sigma_T eps
    forgets x_0. DDIM, a deterministic map x_T -> x_0, has the same marginal but a large cross-covariance: this is
    what tells the two apart (a moments-only test cannot)."""
    schedule = dpmjax.DiscreteVP.from_name("linear")
    x_T = jax.random.normal(jax.random.key(4), (4000, 2), jnp.float64)
    kwargs = dict(schedule=schedule, nfe=200)
    out = np.asarray(dpmjax.sample(MIXTURE.model_fn(schedule), x_T, solver="ddpm", key=jax.random.key(5), **kwargs))
    # 4000 samples: the standard error of each moment is ~ sqrt(var/4000) ~ 0.02 for this ring (var ~ 2.1).
    np.testing.assert_allclose(out.mean(0), MIXTURE.mean(), atol=0.1)
    np.testing.assert_allclose(np.cov(out.T), MIXTURE.covariance(), atol=0.2)

    def cross_cov(x0):
        return np.cov(np.concatenate([x0, np.asarray(x_T)], axis=1).T)[:2, 2:]

    alpha_T = float(schedule.alpha(jnp.float64(1.0)))
    # the same standard error, ~ sqrt(var_0 var_T / 4000) ~ 0.025 per entry
    np.testing.assert_allclose(cross_cov(out), alpha_T * MIXTURE.covariance(), atol=0.1)
    ddim = np.asarray(dpmjax.sample(MIXTURE.model_fn(schedule), x_T, solver="ddim", **kwargs))
    assert np.max(np.abs(np.diag(cross_cov(ddim)))) > 0.5


def test_thresholding_keeps_samples_in_range():
    schedule = dpmjax.DiscreteVP.from_name("linear")
    x_T = jax.random.normal(jax.random.key(0), (16, 2), jnp.float32)
    out = dpmjax.sample(MIXTURE.model_fn(schedule), x_T, schedule=schedule, solver="dpmpp_2m", nfe=10,
                        final_sigma="zero", thresholding=True, threshold_ratio=0.9, threshold_max=1.0)
    # the last step returns a thresholded x0 prediction: within [-1, 1] by construction (Imagen Sec. 2.3)
    assert float(jnp.max(jnp.abs(out))) <= 1.0 + 1e-6
