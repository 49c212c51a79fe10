"""UniPC: identity with DPM-Solver++(2M), convergence orders against the exact oracle, parity with diffusers.

Everything numerical runs in float64 (the ``x64`` fixture) on the exact Gaussian-mixture model, so the
differences measured are the solvers' own.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpmjax.oracle import GaussianMixture, ode_solution
from dpmjax.samplers import SOLVERS, plan, sample
from dpmjax.samplers.unipc import h_phis
from dpmjax.schedules import DiscreteVP


def plan_times(*args, **kwargs):
    """The solver grid (times) that ``plan`` builds."""
    return plan(*args, **kwargs).grid["t"]

SCHEDULE = DiscreteVP.from_name("linear")
RING = GaussianMixture.ring()
MODEL = RING.model_fn(SCHEDULE)


def noise(batch=8, seed=0, dtype=jnp.float64):
    return jax.random.normal(jax.random.key(seed), (batch, 2), dtype)


# ---------------------------------------------------------------------------------------------------------
# Coefficients
# ---------------------------------------------------------------------------------------------------------

def _h_phi_exact(z: float, k: int) -> float:
    """h phi_{k+1}(z) = sum_{n>=1} z^n / (n + k)!, summed with math.fsum (exact to a few ulps for |z| <= 3)."""
    return math.fsum(z ** n / math.factorial(n + k) for n in range(1, 60))


@pytest.mark.parametrize("z", [-3.0, -1.0, -0.51, -0.49, -0.02, -1e-6, 1e-6, 0.02, 0.3, 0.51, 1.0, 3.0])
def test_h_phis_accurate_on_both_sides_of_the_series_switch(z, x64):
    got = h_phis(jnp.float64(z))
    for k, value in zip((1, 2, 3), got):
        np.testing.assert_allclose(float(value), _h_phi_exact(z, k), rtol=1e-13)
    # float32 at |z| = 0.02 (1000 steps): the plain recursion h phi_{k+1} = h phi_k / z - 1/k! is 20% off in
    # h phi_4 there; the series keeps float32 precision.
    if abs(z) == 0.02:
        got32 = h_phis(jnp.float32(z))
        for k, value in zip((1, 2, 3), got32):
            np.testing.assert_allclose(float(value), _h_phi_exact(z, k), rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Identity: UniP-2 with B(h) = e^{hh} - 1 and no corrector is DPM-Solver++(2M)
# ---------------------------------------------------------------------------------------------------------

def test_unip2_bh2_without_corrector_is_dpmpp_2m(x64):
    """With rho = 1/2 and B(h) = e^{-h} - 1, UniP-2's correction -alpha_t B(h) rho D_1 with D_1 = (m_1 - m_0)/r_1,
    r_1 = (lambda_{i-1} - lambda_i)/h, is DPM-Solver++(2M)'s -alpha_t (e^{-h} - 1)/2 (m_0 - m_1)/r_0, r_0 = -r_1,
    term for term. 10 steps: both lower the final order (UniPC always; dpmpp_2m below 15 steps), so warm-up,
    second-order and lowered steps are all compared. Measured: bitwise equal (difference 0.0)."""
    x_T = noise()
    ours = sample(MODEL, x_T, schedule=SCHEDULE, solver="unipc", nfe=10, spacing="logSNR", order=2,
                  variant="bh2", predict_x0=True, use_corrector=False)
    dpmpp = sample(MODEL, x_T, schedule=SCHEDULE, solver="dpmpp_2m", nfe=10, spacing="logSNR",
                   solver_type="dpmsolver")
    np.testing.assert_allclose(np.asarray(ours), np.asarray(dpmpp), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# Convergence order against the exact probability-flow ODE solution
# ---------------------------------------------------------------------------------------------------------

# Honest global orders (lower_order_final=False, so that no lowered final step caps them):
#   a multistep method's starting values must carry local error O(h^{q+1}) with q >= order - 1, or the global
#   order drops to q + 1. UniPC's warm-up step 0 is first order: UniP-1 (local error O(h^2)) without the
#   corrector, UniP-1 + UniC-1 (O(h^3)) with it. So
#     UniP-p:  min(p, 2)   -> 1, 2, 2        UniPC-p (UniC raises p by one): min(p + 1, 3) -> 2, 3, 3.
#   The warm-up term's constant scales with the derivatives of x0(lambda) at the start, ~alpha(t_start): at
#   t_start = 1 (alpha ~ 6e-3) it stays below the steady-state error up to NFE ~ 200 (UniP-3 then measures
#   ~3.2, UniPC-3 4 to 5). Starting at t_start = 0.3 (alpha ~ 0.45) shows the asymptotic orders by NFE ~ 40.
CONVERGENCE_T_START = 0.3
CONVERGENCE_NFE = (40, 120)
EXPECTED_ORDER = {(1, False): 1, (1, True): 2, (2, False): 2, (2, True): 3, (3, False): 2, (3, True): 3}


def _logsnr_grid(nfe, t_start, t_end):
    """spacing="logSNR" (lambda uniform), built with one jitted t_of_lambda: ``time_grid`` runs it eagerly,
    which compiles ~20 small programs for every new grid length (~2 s of CPU each time on this machine)."""
    lams = np.linspace(float(SCHEDULE.lambda_(jnp.float64(t_start))), float(SCHEDULE.lambda_(jnp.float64(t_end))),
                       nfe + 1)
    grid = np.array(jax.jit(SCHEDULE.t_of_lambda)(jnp.asarray(lams)))
    grid[0], grid[-1] = t_start, t_end
    return grid


def test_convergence_orders(x64):
    x_T = noise(16)
    t_end = SCHEDULE.default_t_end
    reference = ode_solution(RING, x_T, CONVERGENCE_T_START, t_end, SCHEDULE)
    grids = {nfe: _logsnr_grid(nfe, CONVERGENCE_T_START, t_end) for nfe in CONVERGENCE_NFE}
    measured = {}
    for (order, corrector), expected in EXPECTED_ORDER.items():
        errors = []
        for nfe in CONVERGENCE_NFE:
            x_0 = sample(MODEL, x_T, schedule=SCHEDULE, solver="unipc", timesteps=grids[nfe], order=order,
                         use_corrector=corrector, lower_order_final=False)
            errors.append(float(np.sqrt(np.mean((np.asarray(x_0) - reference) ** 2))))
        slope = -np.diff(np.log(errors))[0] / np.diff(np.log(CONVERGENCE_NFE))[0]
        measured[(order, corrector)] = (slope, errors)
    for key, (slope, errors) in measured.items():
        assert abs(slope - EXPECTED_ORDER[key]) <= 0.3, (key, slope, errors, measured)
    # and the corrector always helps at equal NFE
    for order in (1, 2, 3):
        assert measured[(order, True)][1][-1] < measured[(order, False)][1][-1]


# ---------------------------------------------------------------------------------------------------------
# Parity with diffusers' UniPCMultistepScheduler (torch, float64) on the same exact eps model and grid
# ---------------------------------------------------------------------------------------------------------

@jax.jit
def _oracle_eps(x, t):
    return RING.eps(x, t, SCHEDULE)


def _diffusers_unipc(x_T, nfe, *, order, variant, final, predict_x0=True, disable=(), stop_before_last=False):
    """diffusers' UniPC loop on the oracle's eps (numpy float64 behind a torch function).

    Its integer timestep k is our t = (k + 1)/N. Its ``sigmas`` are float32 (from float32 alphas_cumprod,
    ~1e-6 relative off ours); we replace them by the float64 sigma = e^{-lambda(t)} of the same schedule so
    that only the algorithms are compared.
    """
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.UniPCMultistepScheduler(
        solver_order=order, solver_type=variant, predict_x0=predict_x0, final_sigmas_type=final,
        disable_corrector=list(disable))
    # the defaults these parity tests rely on (diffusers 0.42): 1000 linear betas 1e-4..0.02, linspace spacing
    assert scheduler.config.timestep_spacing == "linspace" and scheduler.config.beta_schedule == "linear"
    scheduler.set_timesteps(nfe)
    n = SCHEDULE.num_train_timesteps
    times = (scheduler.timesteps.numpy().astype(np.float64) + 1.0) / n
    sigmas = np.exp(-np.asarray(SCHEDULE.lambda_(jnp.asarray(times))))
    last = 0.0 if final == "zero" else float(np.exp(-SCHEDULE.lambda_(jnp.float64(1.0 / n))))
    scheduler.sigmas = torch.tensor(np.append(sigmas, last), dtype=torch.float64)

    def eps_model(x, k):
        t = jnp.float64((int(k) + 1.0) / n)
        return torch.from_numpy(np.array(_oracle_eps(jnp.asarray(x.numpy()), t)))

    x = torch.tensor(np.asarray(x_T), dtype=torch.float64)
    steps = scheduler.timesteps[:-1] if stop_before_last else scheduler.timesteps
    for k in steps:
        x = scheduler.step(eps_model(x, k), k, x).prev_sample
    if stop_before_last:  # what its last step computes: the x0-prediction at the (uncorrected) sample
        k = scheduler.timesteps[-1]
        alpha = 1.0 / math.sqrt(1.0 + float(scheduler.sigmas[-2]) ** 2)
        x = (x - math.sqrt(1.0 - alpha ** 2) * eps_model(x, k)) / alpha
    return x.numpy(), times


PARITY_CASES = [  # 10 steps: warm-up, full order and lowered final orders all occur
    dict(order=2, variant="bh2", final="zero"),
    dict(order=3, variant="bh2", final="zero", disable=(0, 5)),
    dict(order=2, variant="bh1", final="sigma_min"),
    dict(order=3, variant="bh1", final="sigma_min"),
    dict(order=3, variant="bh2", final="sigma_min", predict_x0=False),
]


@pytest.mark.parametrize("case", PARITY_CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_matches_diffusers_unipc(case, x64):
    """diffusers' final_sigmas_type "zero" (its default) is our final_sigma="zero" and "sigma_min" our "t_end"
    (its last sigma is that of timestep 0, our t = 1/N); timestep_spacing "linspace" is ours. Measured: ~3e-15
    relative difference in every case."""
    nfe = 10
    x_T = noise()
    expected, times = _diffusers_unipc(x_T, nfe, **case)
    final_sigma = "zero" if case["final"] == "zero" else "t_end"
    options = dict(order=case["order"], variant=case["variant"], predict_x0=case.get("predict_x0", True),
                   disable_corrector=case.get("disable", ()))
    grid = plan_times(SCHEDULE, "unipc", nfe=nfe, spacing="linspace", final_sigma=final_sigma, **options)
    np.testing.assert_array_equal(np.asarray(grid)[:nfe], times)
    ours = sample(MODEL, x_T, schedule=SCHEDULE, solver="unipc", nfe=nfe, spacing="linspace",
                  final_sigma=final_sigma, **options)
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-5, atol=1e-8)


def test_bh1_to_sigma_zero_differs_from_diffusers_only_by_its_nan(x64):
    """diffusers (0.42) with solver_type="bh1" and final_sigmas_type="zero" returns NaN: its last UniP step to
    sigma = 0 computes B(h) * 0 with B(h) = hh = -inf. The step's intended value is the x0-prediction at the
    last sample (e^{hh} - 1 = -1 there), which is what our driver's final call returns; we compare with that,
    and with diffusers' full loop should it ever stop returning NaN."""
    nfe = 10
    x_T = noise()
    case = dict(order=3, variant="bh1", final="zero")
    intended, _ = _diffusers_unipc(x_T, nfe, stop_before_last=True, **case)
    full, _ = _diffusers_unipc(x_T, nfe, **case)
    ours = np.asarray(sample(MODEL, x_T, schedule=SCHEDULE, solver="unipc", nfe=nfe, spacing="linspace",
                             final_sigma="zero", order=3, variant="bh1"))
    np.testing.assert_allclose(ours, intended, rtol=1e-5, atol=1e-8)
    assert np.all(np.isfinite(ours))
    if not np.all(np.isnan(full)):
        np.testing.assert_allclose(ours, full, rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------------------------------------------------
# Robustness and options
# ---------------------------------------------------------------------------------------------------------

def test_order3_bh1_float32_1000_steps_and_gradients_are_finite():
    """The conformance suite runs the default (order 2, bh2); here the third-order branches: float32 with 1000
    steps (|hh| ~ 0.01, where the h phi recursion would cancel), ending at sigma = 0 without lowering the final
    orders (diffusers returns inf / raises there), and gradients through every option."""
    x_T = noise(2, dtype=jnp.float32)
    out = sample(MODEL, x_T, schedule=SCHEDULE, solver="unipc", nfe=1000, spacing="logSNR", order=3,
                 variant="bh1", final_sigma="zero", lower_order_final=False)
    assert np.all(np.isfinite(np.asarray(out)))

    def loss(x):
        return jnp.sum(sample(MODEL, x, schedule=SCHEDULE, solver="unipc", nfe=6, order=3, variant="bh1",
                              predict_x0=False, disable_corrector=(1,)) ** 2)

    grad = jax.grad(loss)(x_T)
    assert np.all(np.isfinite(np.asarray(grad)))


@pytest.mark.parametrize("options, match", [
    (dict(order=4), "order must be one of"),
    (dict(variant="bh3"), "variant must be one of"),
    (dict(predict_x0="yes"), "predict_x0 must be"),
    (dict(use_corrector=1), "use_corrector must be"),
    (dict(disable_corrector=[-1]), "disable_corrector"),
    (dict(disable_corrector="0"), "disable_corrector"),
    (dict(solver_type="bh2"), "unknown option"),
])
def test_bad_options_are_rejected(options, match):
    with pytest.raises(ValueError, match=match):
        plan(SCHEDULE, "unipc", nfe=5, **options)


def test_registered_with_its_options():
    entry = SOLVERS["unipc"]
    assert set(entry.options) == {"order", "variant", "predict_x0", "use_corrector", "lower_order_final",
                                  "disable_corrector"}
    assert entry.steps_for_nfe(7) == 7  # UniC costs no model call
