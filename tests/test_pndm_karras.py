"""PNDM family (pndm = F-PNDM, s_pndm = S-PNDM, plms) and Karras Euler/Heun: convergence order against the
exact ODE solution, exact NFE, and parity with diffusers' PNDM/Euler/Heun schedulers on the same oracle model.

Measured (GaussianMixture.ring(), DiscreteVP "linear", t 1 -> 1e-3, float64, error = relative RMSE):
  logSNR grid, slope between N and 2N steps: euler 1.01 (40->80), heun 2.09 (40->80), s_pndm 1.91,
  plms 1.96, pndm 1.96 (80->160). The pseudo multistep methods are second order on any grid that is not
  uniform in sigma_ve (see ``dpmjax/samplers/pndm.py``); pndm and plms then agree to 3 digits, since their
  error comes from the AB4 steps at low noise, not from the different warm-ups.
  sigma_ve-uniform grid (t 0.5 -> 0.1): pndm 3.66 (64->128), 3.88 (128->256), 3.95 (256->512): fourth order.
  One pseudo-RK4 step with the time midpoint: local error x8.7 per halving of h (O(h^3)); with the sigma_ve
  midpoint it would be x33 (O(h^5)).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpmjax
from dpmjax.oracle import GaussianMixture, ode_solution
from dpmjax.samplers import plan
from dpmjax.samplers.pndm import num_model_calls, stage_table
from dpmjax.schedules import time_grid


def plan_parts(*args, **kwargs):
    """(solver, solver grid times, final_denoise) of ``plan``."""
    p = plan(*args, **kwargs)
    return p.solver, p.grid["t"], p.final_denoise

try:  # the diffusers parity tests need the test extra; the oracle tests in this file run without it
    import diffusers
    import torch
except ImportError:
    diffusers = torch = None
needs_diffusers = pytest.mark.skipif(diffusers is None, reason="diffusers parity needs torch and diffusers")

MIXTURE = GaussianMixture.ring()
SCHEDULE = dpmjax.DiscreteVP.from_name("linear")


def rel_rmse(a, b):
    return float(np.sqrt(np.mean((np.asarray(a) - np.asarray(b)) ** 2) / np.mean(np.asarray(b) ** 2)))


def slope(err_coarse, err_fine, ratio=2.0):
    return float(np.log(err_coarse / err_fine) / np.log(ratio))


def run(name, x_T, timesteps, schedule=SCHEDULE, **kwargs):
    return np.asarray(dpmjax.sample(MIXTURE.model_fn(schedule), jnp.asarray(x_T), schedule=schedule, solver=name,
                                    timesteps=timesteps, **kwargs))


@pytest.fixture(scope="module")
def logsnr_problem():
    x_T = np.asarray(jax.random.normal(jax.random.key(0), (16, 2), jnp.float32), np.float64)
    return x_T, ode_solution(MIXTURE, x_T, 1.0, 1e-3, SCHEDULE)


# name -> (expected order, coarse number of steps); the fine grid has twice as many.
# plms (measured 1.96, the same errors as pndm) is checked through its parity with diffusers instead.
LOGSNR_ORDERS = {"euler": (1.0, 40), "heun": (2.0, 40), "s_pndm": (2.0, 80), "pndm": (2.0, 80)}


@pytest.mark.parametrize("name", sorted(LOGSNR_ORDERS))
def test_convergence_order_logsnr(name, logsnr_problem, x64):
    x_T, reference = logsnr_problem
    order, steps = LOGSNR_ORDERS[name]
    errors = [rel_rmse(run(name, x_T, time_grid(SCHEDULE, n, "logSNR")), reference) for n in (steps, 2 * steps)]
    assert abs(slope(*errors) - order) <= 0.3, errors


def test_pndm_is_fourth_order_on_a_sigma_ve_uniform_grid(x64):
    t_a, t_b = 0.5, 0.1
    x_T = np.asarray(jax.random.normal(jax.random.key(1), (16, 2), jnp.float32), np.float64)
    reference = ode_solution(MIXTURE, x_T, t_a, t_b, SCHEDULE)

    def grid(n):
        sigmas = np.linspace(float(SCHEDULE.sigma_ve(t_a)), float(SCHEDULE.sigma_ve(t_b)), n + 1)
        ts = np.array(SCHEDULE.t_of_lambda(jnp.asarray(-np.log(sigmas))), np.float64)
        ts[0], ts[-1] = t_a, t_b
        return ts

    errors = [rel_rmse(run("pndm", x_T, grid(n)), reference) for n in (128, 256)]
    assert abs(slope(*errors) - 4.0) <= 0.3, errors


def test_pseudo_rk4_step_with_time_midpoint_has_local_error_h3(x64):
    """A single F-PNDM step (4 calls) from t = 0.5: the time midpoint is O(h^2) off the sigma_ve midpoint, so
    the pseudo-RK4 step is locally O(h^3) (as the improved-Euler step of S-PNDM, whose error is ~4x larger)."""
    x_T = np.asarray(jax.random.normal(jax.random.key(2), (16, 2), jnp.float32), np.float64)
    errors = [rel_rmse(run("pndm", x_T, np.array([0.5, t_b])), ode_solution(MIXTURE, x_T, 0.5, t_b, SCHEDULE))
              for t_b in (0.45, 0.475)]
    assert abs(slope(*errors) - 3.0) <= 0.3, errors


# ------------------------------------------------------------------------------------------------
# Identities, NFE and option handling.
# ------------------------------------------------------------------------------------------------

def test_euler_is_ddim(x64):
    x_T = np.asarray(jax.random.normal(jax.random.key(3), (8, 2), jnp.float32), np.float64)
    grid = time_grid(SCHEDULE, 7, "logSNR")
    np.testing.assert_allclose(run("euler", x_T, grid), run("ddim", x_T, grid), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name, calls", [("pndm", lambda n: n + 9), ("s_pndm", lambda n: n + 1),
                                         ("plms", lambda n: n + 1), ("euler", lambda n: n),
                                         ("heun", lambda n: 2 * n)])
def test_nfe_plan(name, calls):
    for steps in (3, 4, 10):
        built, grid, final = plan_parts(SCHEDULE, name, timesteps=time_grid(SCHEDULE, steps, "logSNR"))
        assert built.num_model_calls == calls(steps) and not final
        nfe = calls(steps)
        built, grid, _ = plan_parts(SCHEDULE, name, nfe=nfe)
        assert built.num_model_calls == nfe and grid.shape[0] == steps + 1
        built, grid, final = plan_parts(SCHEDULE, name, nfe=nfe + 1, final_sigma="zero")
        assert built.num_model_calls == nfe and grid.shape[0] == steps + 1 and final
    for method in ("pndm", "s_pndm", "plms"):
        for steps in (1, 2, 3, 5):
            assert len(stage_table(method, steps).step) == num_model_calls(method, steps)
    assert num_model_calls("pndm", 2) == 8  # an explicit grid shorter than the warm-up: 4 calls per step
    # plms and s_pndm share the improved-Euler first step and AB2 second step, then plms goes to AB3/AB4.
    plms, s_pndm = stage_table("plms", 4), stage_table("s_pndm", 4)
    np.testing.assert_array_equal(plms.weight[:3], s_pndm.weight[:3])
    np.testing.assert_array_equal(plms.hist_weight[:3, :2], s_pndm.hist_weight[:3])
    assert plms.weight[3] == 23 / 12 and plms.weight[4] == 55 / 24 and s_pndm.weight[4] == 3 / 2


def test_bad_nfe_is_rejected():
    with pytest.raises(ValueError, match="even"):
        plan(SCHEDULE, "heun", nfe=7)
    with pytest.raises(ValueError, match="even"):
        plan(SCHEDULE, "heun", nfe=8, final_sigma="zero")
    plan(SCHEDULE, "heun", nfe=7, final_sigma="zero")  # 3 Heun steps + the final x0 call (as diffusers)
    with pytest.raises(ValueError, match="nfe >= 12"):
        plan(SCHEDULE, "pndm", nfe=11)
    with pytest.raises(ValueError, match="nfe >= 2"):
        plan(SCHEDULE, "plms", nfe=1)
    with pytest.raises(ValueError, match="unknown option"):
        plan(SCHEDULE, "euler", nfe=5, order=2)


# ------------------------------------------------------------------------------------------------
# Parity with diffusers (torch, float64 samples and model outputs) on integer timesteps k <-> t = (k + 1)/N.
# ------------------------------------------------------------------------------------------------

def diffusers_schedule_and_model(scheduler):
    """Our schedule from the scheduler's own (float32) alphas_cumprod, and a torch eps model calling the oracle."""
    schedule = dpmjax.DiscreteVP.from_alphas_cumprod(scheduler.alphas_cumprod.double().numpy())
    n = schedule.num_train_timesteps
    calls = []

    def model(sample, timestep):
        calls.append(float(timestep))
        with jax.enable_x64(True):
            eps = MIXTURE.eps(jnp.asarray(sample.numpy(), jnp.float64), (float(timestep) + 1.0) / n, schedule)
        return torch.from_numpy(np.array(eps))

    return schedule, model, calls


PNDM_CONFIG = dict(num_train_timesteps=1000, beta_schedule="linear", set_alpha_to_one=False)


@needs_diffusers
@pytest.mark.parametrize("skip_prk_steps, spacing, steps", [(True, "leading", 10), (False, "leading", 10),
                                                            (False, "trailing", 20)])
def test_parity_diffusers_pndm(skip_prk_steps, spacing, steps, x64):
    """skip_prk_steps=True is our ``plms``, False (3 PRK steps = 12 calls, then PLMS) our ``pndm``.

    diffusers steps from k to k - N // steps and puts the PRK midpoint at k - (N // steps) // 2: on grids with
    that constant integer spacing (leading; trailing when N is a multiple of 2 * steps) it is the time midpoint
    we use. Its last step goes to alphas_cumprod[0] (set_alpha_to_one=False), our t = 1/N.
    """
    scheduler = diffusers.PNDMScheduler(skip_prk_steps=skip_prk_steps, timestep_spacing=spacing,
                                        steps_offset=1 if spacing == "leading" else 0, **PNDM_CONFIG)
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()  # float64 update arithmetic
    scheduler.final_alpha_cumprod = scheduler.alphas_cumprod[0]
    schedule, model, calls = diffusers_schedule_and_model(scheduler)
    scheduler.set_timesteps(steps)
    x_T = np.asarray(jax.random.normal(jax.random.key(4), (16, 2), jnp.float32), np.float64)
    x = torch.from_numpy(x_T)
    for k in scheduler.timesteps:
        x = scheduler.step(model(x, k), k, x).prev_sample
    ks = np.append(scheduler._timesteps[::-1], 0.0)  # its grid (without the PRK midpoints), then k = 0
    grid = (ks + 1.0) / 1000.0
    name = "plms" if skip_prk_steps else "pndm"
    ours = run(name, x_T, grid, schedule=schedule)
    assert len(calls) == num_model_calls(name, steps)
    assert rel_rmse(ours, x.numpy()) < 1e-10


@needs_diffusers
@pytest.mark.parametrize("scheduler_name, solver, spacing, steps", [
    ("EulerDiscreteScheduler", "euler", "trailing", 10), ("HeunDiscreteScheduler", "heun", "trailing", 10),
    ("HeunDiscreteScheduler", "heun", "leading", 7)])
def test_parity_diffusers_euler_heun(scheduler_name, solver, spacing, steps, x64):
    """diffusers works on sigma_k = sqrt((1 - acp_k)/acp_k), feeds the model x/sqrt(sigma^2 + 1) and ends at
    sigma = 0 (Euler there: x0 of the last timestep), which is our final_sigma="zero". Its sigmas are float32,
    which bounds the agreement at ~1e-7. Integer timesteps only: for fractional ones ("linspace") diffusers
    interpolates sigma linearly in k, our DiscreteVP log alpha linearly in t."""
    scheduler = getattr(diffusers, scheduler_name)(
        num_train_timesteps=1000, beta_schedule="linear", timestep_spacing=spacing,
        steps_offset=1 if spacing == "leading" else 0)
    schedule, model, calls = diffusers_schedule_and_model(scheduler)
    scheduler.set_timesteps(steps)
    ks = np.unique(scheduler.timesteps.numpy())[::-1].astype(np.float64)
    assert len(ks) == steps and np.all(ks == np.round(ks)) and ks[-1] > 0
    grid = (np.append(ks, 0.0) + 1.0) / 1000.0  # the last point only marks the final step to sigma = 0
    x_T = np.asarray(jax.random.normal(jax.random.key(5), (16, 2), jnp.float32), np.float64)
    with jax.enable_x64(True):
        x = torch.from_numpy(x_T / float(schedule.alpha(jnp.float64(grid[0]))))  # VE variable y = x/alpha
    for k in scheduler.timesteps:
        x = scheduler.step(model(scheduler.scale_model_input(x, k), k), k, x).prev_sample
    ours = run(solver, x_T, grid, schedule=schedule, final_sigma="zero")
    assert len(calls) == {"euler": steps, "heun": 2 * steps - 1}[solver]
    assert plan(schedule, solver, timesteps=grid, final_sigma="zero")[0].num_model_calls + 1 == len(calls)
    assert rel_rmse(ours, x.numpy()) < 1e-5
