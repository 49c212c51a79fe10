"""AdjointDPM (dpmjax.adjoint): gradients through sampling against an exact float64 reference.

Oracle: a Gaussian mixture whose means are the "params" and whose per-sample shift c is the conditioning
(model eps_c(x, t) = eps(x - alpha_t c, t): the data is shifted by c, so the flow map is exact too). The reference
gradient is jax.grad through a float64 Dopri8 solve at rtol = atol = 1e-10 in lambda (a different variable,
solver and adjoint than any method under test), itself checked against ``dpmjax.oracle.ode_solution``.
"""
import flax.linen as nn
import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpmjax
from dpmjax import oracle
from dpmjax.adjoint import generate, value_and_grad_through_sampling

SCHEDULE = dpmjax.LinearVP()
T_START, T_END = 1.0, 1e-3
MIXTURE = oracle.GaussianMixture.random(0, num_modes=3, dim=2, scale=1.0)
WRT = ("x_T", "cond", "params")


def mixture_model(params, x, t, shift):
    """apply_fn(params, x, t, **cond) with cond = {"shift": c}."""
    mixture = oracle.GaussianMixture(means=params["means"], stds=jnp.asarray(MIXTURE.stds, x.dtype),
                                     weights=jnp.asarray(MIXTURE.weights, x.dtype))
    alpha = SCHEDULE.alpha(t)[:, None]
    return mixture.eps(x - alpha * shift, t, SCHEDULE)


def shift(c):
    return {"shift": c}


def make_loss(w):
    def loss(x_0):
        return jnp.sum(jnp.asarray(w, x_0.dtype) * x_0) + 0.25 * jnp.sum(x_0 ** 2)
    return loss


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    return dict(x_T=rng.standard_normal((4, 2)), cond=0.3 * rng.standard_normal((4, 2)),
                w=rng.standard_normal((4, 2)), means=np.asarray(MIXTURE.means))


def _reference_flow(means, x_T, cond):
    lam_start, lam_end = SCHEDULE.lambda_(jnp.float64(T_START)), SCHEDULE.lambda_(jnp.float64(T_END))

    def vector_field(lam, y, args):  # dy/dlambda = -e^{-lambda} eps(alpha y, t(lambda))  (DPM-Solver eq. 3.4)
        t = SCHEDULE.t_of_lambda(lam)
        return -jnp.exp(-lam) * mixture_model({"means": args[0]}, SCHEDULE.alpha(t) * y,
                                              jnp.broadcast_to(t, y.shape[:1]), args[1])

    sol = diffrax.diffeqsolve(diffrax.ODETerm(vector_field), diffrax.Dopri8(), t0=lam_start, t1=lam_end,
                              dt0=(lam_end - lam_start) / 100, y0=x_T / SCHEDULE.alpha(jnp.float64(T_START)),
                              args=(means, cond), stepsize_controller=diffrax.PIDController(rtol=1e-10, atol=1e-10),
                              max_steps=20_000)
    return SCHEDULE.alpha(jnp.float64(T_END)) * sol.ys[-1]


@pytest.fixture(scope="module")
def reference(problem):
    with jax.enable_x64(True):
        args = [jnp.asarray(problem[k], jnp.float64) for k in ("means", "x_T", "cond")]
        loss = make_loss(problem["w"])
        value, grads = jax.jit(jax.value_and_grad(lambda m, x, c: loss(_reference_flow(m, x, c)),
                                                  argnums=(0, 1, 2)))(*args)
        x_0 = np.asarray(_reference_flow(*args))
    # the reference flow map is the oracle's: x_0 = Phi(x_T - alpha_T c) + alpha_0 c for the shifted data
    alpha_start = float(np.sqrt(1 / (1 + float(SCHEDULE.sigma_ve(np.float64(T_START))) ** 2)))
    alpha_end = float(np.sqrt(1 / (1 + float(SCHEDULE.sigma_ve(np.float64(T_END))) ** 2)))
    exact = oracle.ode_solution(MIXTURE, problem["x_T"] - alpha_start * problem["cond"], T_START, T_END, SCHEDULE)
    np.testing.assert_allclose(x_0, exact + alpha_end * problem["cond"], atol=1e-7)
    return float(value), {"params": np.asarray(grads[0]), "x_T": np.asarray(grads[1]), "cond": np.asarray(grads[2])}


def _compare(grad, ref):
    a, b = np.ravel(np.asarray(grad, np.float64)), np.ravel(ref)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)), float(np.linalg.norm(a - b) / np.linalg.norm(b))


# Relative error bounds (float32 runs against the float64 reference), measured values in brackets:
# - checkpoint: the exact gradient of the adaptive forward discretisation, so its error is that solve's global
#   error, which the PID controller keeps within ~10-100 x rtol = 1e-6 over ~60 steps, plus float32 rounding
#   [2e-5 x_T, 2e-6 cond, 7e-6 params] -> bound 2e-4.
# - backsolve: forward solve, backward re-solve of y and the adjoint ODE each carry rtol-controlled error of the
#   same size (the continuous adjoint is not the discrete one's transpose) [4e-6, 2e-6, 2e-6] -> bound 2e-4.
# - scan: backprop through 50 steps of DPM-Solver++(2M), a second-order method; the derivative of the discrete map
#   discretises the variational equation with the same scheme, so it converges at order 2 as well (measured
#   9.7e-3 at NFE 25 and 2.5e-3 at NFE 50: ratio 3.9 ~ 2^2) [2.5e-3, 6e-4, 1.1e-3] -> bound 1e-2.
METHOD_CASES = {
    "checkpoint": (dict(rtol=1e-6, atol=1e-6), 2e-4),
    "backsolve": (dict(rtol=1e-6, atol=1e-6), 2e-4),
    "scan": (dict(num_steps=50, solver="dpmpp_2m"), 1e-2),
}


@pytest.mark.parametrize("method", list(METHOD_CASES))
def test_gradients_match_float64_reference(method, problem, reference):
    options, bound = METHOD_CASES[method]
    ref_value, ref_grads = reference
    fn = jax.jit(lambda p, x, c: value_and_grad_through_sampling(
        make_loss(problem["w"]), mixture_model, p, x, c, schedule=SCHEDULE, method=method, wrt=WRT,
        t_start=T_START, t_end=T_END, **options))
    value, grads = fn({"means": jnp.asarray(problem["means"], jnp.float32)},
                      jnp.asarray(problem["x_T"], jnp.float32), shift(jnp.asarray(problem["cond"], jnp.float32)))
    assert set(grads) == set(WRT)
    assert abs(float(value) - ref_value) <= bound * abs(ref_value)
    for name in WRT:
        grad = {"params": lambda g: g["means"], "cond": lambda g: g["shift"]}.get(name, lambda g: g)(grads[name])
        cosine, rel = _compare(grad, ref_grads[name])
        assert cosine >= 0.999 and rel <= bound, (name, cosine, rel)


def test_euler_in_rho_is_ddim(problem):
    """Euler on dy/drho = eps over a grid is DDIM on the same grid: checkpoint == scan up to rounding."""
    results = []
    for method, solver in (("checkpoint", "euler"), ("scan", "ddim")):
        fn = jax.jit(lambda p, x: value_and_grad_through_sampling(
            make_loss(problem["w"]), mixture_model, p, x, shift(jnp.zeros((4, 2))), schedule=SCHEDULE, method=method,
            wrt=("x_T", "params"), num_steps=10, solver=solver, spacing="logSNR", t_start=T_START, t_end=T_END))
        params = {"means": jnp.asarray(problem["means"], jnp.float32)}
        results.append(fn(params, jnp.asarray(problem["x_T"], jnp.float32)))
    (v1, g1), (v2, g2) = results
    np.testing.assert_allclose(float(v1), float(v2), rtol=1e-5)
    for leaf1, leaf2 in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(leaf1, leaf2, rtol=1e-4, atol=1e-6)


class TinyEps(nn.Module):
    """A 2-d eps-model: MLP on [x, sin/cos features of t]."""

    @nn.compact
    def __call__(self, x, t):
        freqs = jnp.asarray([1.0, 3.0, 9.0], x.dtype)
        h = jnp.concatenate([x, jnp.sin(t[:, None] * freqs), jnp.cos(t[:, None] * freqs)], axis=-1)
        h = nn.silu(nn.Dense(32)(h))
        h = nn.silu(nn.Dense(32)(h))
        return nn.Dense(x.shape[-1])(h)


def test_mlp_params_gradients_agree_between_methods(problem):
    net = TinyEps()
    params = net.init(jax.random.key(0), jnp.zeros((4, 2)), jnp.ones((4,)))

    def model_fn(p, x, t):  # exact eps of N(0, I) data (sigma_t x) plus a learned-looking perturbation
        return SCHEDULE.sigma(t)[:, None] * x + 0.3 * net.apply(p, x, t)

    x_T = jnp.asarray(problem["x_T"], jnp.float32)
    grads = {}
    for method, options in (("checkpoint", dict(rtol=1e-6)), ("backsolve", dict(rtol=1e-6)),
                            ("scan", dict(num_steps=100, solver="dpmpp_2m"))):
        fn = jax.jit(lambda p, x: value_and_grad_through_sampling(
            make_loss(problem["w"]), model_fn, p, x, schedule=SCHEDULE, method=method, wrt="params",
            t_start=T_START, t_end=T_END, **options))
        grads[method] = np.concatenate([np.ravel(g) for g in jax.tree.leaves(fn(params, x_T)[1]["params"])])
    # continuous vs discrete adjoint of the same rtol = 1e-6 solve: both within ~1e-5 of the exact gradient
    cosine, rel = _compare(grads["backsolve"], grads["checkpoint"])
    assert cosine >= 0.9999 and rel <= 1e-3, (cosine, rel)
    # DPM-Solver++(2M), second order: measured 9e-3 at NFE 50 and 2.1e-3 at NFE 100 (ratio 4.3 ~ 2^2) -> 1e-2
    cosine, rel = _compare(grads["scan"], grads["checkpoint"])
    assert cosine >= 0.999 and rel <= 1e-2, (cosine, rel)


def test_jit_and_vmap(problem):
    """vmap over independent problems (e.g. per-example optimisation) equals calling each one."""
    x_T = jnp.asarray(np.random.default_rng(1).standard_normal((3, 4, 2)), jnp.float32)
    params = {"means": jnp.asarray(problem["means"], jnp.float32)}
    cond = shift(jnp.zeros((4, 2)))

    def one(x):
        return value_and_grad_through_sampling(
            make_loss(problem["w"]), mixture_model, params, x, cond, schedule=SCHEDULE, method="backsolve",
            num_steps=8, solver="euler", t_start=T_START, t_end=T_END)

    values, grads = jax.jit(jax.vmap(one))(x_T)
    value_1, grads_1 = jax.jit(one)(x_T[1])
    assert values.shape == (3,) and grads["x_T"].shape == (3, 4, 2)
    np.testing.assert_allclose(values[1], value_1, rtol=1e-5)
    np.testing.assert_allclose(grads["x_T"][1], grads_1["x_T"], rtol=1e-4, atol=1e-6)


def test_generate_is_a_plain_differentiable_sampler(problem):
    params = {"means": jnp.asarray(problem["means"], jnp.float32)}
    x_T = jnp.asarray(problem["x_T"], jnp.float32)
    x_0, status = generate(mixture_model, params, x_T, shift(jnp.zeros((4, 2))), schedule=SCHEDULE, method="scan",
                           num_steps=10, solver="ddim", spacing="logSNR", t_start=T_START, t_end=T_END)
    ddim = dpmjax.sample(lambda x, t: mixture_model(params, x, t, jnp.zeros((4, 2))), x_T, schedule=SCHEDULE,
                         solver="ddim", nfe=10, spacing="logSNR", t_start=T_START, t_end=T_END)
    np.testing.assert_allclose(x_0, ddim, rtol=1e-6, atol=1e-6)
    assert bool(status["ok"])


# -- bad input -----------------------------------------------------------------------------------------------

def _call(loss=None, model=mixture_model, **options):
    rng = np.random.default_rng(0)
    params = {"means": jnp.asarray(MIXTURE.means, jnp.float32)}
    x_T = jnp.asarray(rng.standard_normal((4, 2)), jnp.float32)
    base = dict(schedule=SCHEDULE, t_start=T_START, t_end=T_END)
    return value_and_grad_through_sampling(loss or (lambda x: jnp.sum(x ** 2)), model, params, x_T,
                                           shift(jnp.zeros((4, 2))), **{**base, **options})


@pytest.mark.parametrize("options, match", [
    (dict(method="adjoint"), "method must be one of"),
    (dict(wrt=("x_T", "theta")), "wrt must be distinct names"),
    (dict(method="scan", rtol=1e-5), "rtol/atol apply only"),
    (dict(method="scan", solver="tsit5"), "solver for method='scan'"),
    (dict(method="checkpoint", solver="euler", rtol=1e-4), "no error estimate"),
    (dict(method="checkpoint", solver="rk99"), "solver for the ODE methods"),
    (dict(method="backsolve", num_steps=0), "num_steps must be a positive integer"),
    (dict(method="scan", solver_options={"order": 2}, solver="dpmpp_2m", num_steps=0), "num_steps"),
])
def test_bad_options_name_the_argument(options, match):
    with pytest.raises(ValueError, match=match):
        _call(**options)


def test_cond_must_be_given_floating_and_a_dict():
    with pytest.raises(ValueError, match="cond is None"):
        value_and_grad_through_sampling(jnp.sum, mixture_model, {}, jnp.ones((2, 2)), None, schedule=SCHEDULE,
                                        wrt="cond")
    with pytest.raises(ValueError, match="non-floating"):
        value_and_grad_through_sampling(jnp.sum, mixture_model, {}, jnp.ones((2, 2)), shift(jnp.array([1, 2])),
                                        schedule=SCHEDULE, wrt="cond")
    with pytest.raises(ValueError, match="cond must be a dict of keyword arrays"):
        value_and_grad_through_sampling(jnp.sum, mixture_model, {}, jnp.ones((2, 2)), jnp.zeros((2, 2)),
                                        schedule=SCHEDULE, wrt="cond")


def test_non_scalar_loss_is_rejected():
    with pytest.raises(ValueError, match=r"loss_fn must return a real scalar.*shape \(4, 2\)"):
        _call(loss=lambda x: x ** 2, method="scan", num_steps=4, solver="ddim")


def test_unmet_tolerance_names_cause_and_steps():
    # float32 cannot reach rtol = 1e-7 in 5 steps: diffrax stops at max_steps; the error says so and where
    with pytest.raises(RuntimeError, match=r"forward probability-flow ODE solve failed after 5 steps.*"
                                           r"maximum number of solver steps"):
        _call(method="checkpoint", rtol=1e-7, max_steps=5)


def _nan_vjp_model(params, x, t, shift):
    # finite forward (sqrt(0) = 0) but d sqrt/dx at 0 is inf, times 0: NaN in every VJP w.r.t. x
    return mixture_model(params, x, t, shift) + jnp.sqrt(jnp.zeros_like(x) * x)


@pytest.mark.parametrize("method, match", [
    ("backsolve", "gradient w.r.t. x_T is not finite.*backward adjoint solve"),
    ("scan", "gradient w.r.t. x_T is not finite.*model's or the loss's derivative"),
])
def test_nan_gradient_is_reported(method, match):
    options = dict(num_steps=4, solver="heun" if method == "backsolve" else "ddim")
    with pytest.raises(FloatingPointError, match=match):
        _call(model=_nan_vjp_model, method=method, **options)
    if method == "scan":  # under jit the same message comes through JAX's runtime error (one method: compile time)
        with pytest.raises(Exception, match=match):
            jax.block_until_ready(jax.jit(lambda: _call(model=_nan_vjp_model, method=method, **options))())
