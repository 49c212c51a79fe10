"""One conformance test over every registered solver: the sampler contract of DESIGN.md.

jit == eager; one compile for repeated calls; vmap over keys; per-sample time grids; gradients w.r.t. x_T
finite and equal to finite differences; no NaN from the smallest NFE to 1000 (sigma = 0 end included);
NFE counted exactly; bfloat16 model outputs with float32 solver state.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpmjax
from dpmjax.oracle import GaussianMixture
from dpmjax.samplers import plan


def plan_times(*args, **kwargs):
    """The solver grid (times) that ``plan`` builds."""
    return plan(*args, **kwargs).grid["t"]

SCHEDULE = dpmjax.DiscreteVP.from_name("linear")
MIXTURE = GaussianMixture.ring()
MODEL = MIXTURE.model_fn(SCHEDULE)
# Every registered solver except two whose contract differs, each tested in its own file: the adaptive
# solver (a lax.while_loop whose NFE is decided at run time: tests/test_singlestep_adaptive_sde.py) and
# usf, which runs a spec that fixes its own time grid and steps (tests/test_usf.py checks specs of the
# hand-made solvers against them, so the properties below carry over).
FIXED_STEP = sorted(name for name in dpmjax.SOLVERS if name not in ("dpm_solver_adaptive", "usf"))


def valid_nfe(name, target, **kwargs):
    """The NFE nearest ``target`` that the solver accepts (heun needs an even count; the Time-Shift samplers'
    window caps how fine their grid may be, so near 1000 they get their largest valid NFE)."""
    def ok(nfe):
        try:
            plan(SCHEDULE, name, nfe=nfe, **kwargs)
            return True
        except ValueError:
            return False

    for nfe in range(target, target + 20):
        if ok(nfe):
            return nfe
    valid = [n for n in np.unique(np.geomspace(1, target, 40).astype(int)) if ok(int(n))]
    if valid:
        return int(valid[-1])
    raise AssertionError(f"no valid nfe near {target} for {name}")


def x_init(batch=4, dtype=jnp.float32, seed=0):
    return jax.random.normal(jax.random.key(seed), (batch, 2), dtype)


def mixture_eps(mixture, x, t):
    """The params-as-arguments model: the mixture's exact eps (its means/stds/weights are the params)."""
    return mixture.eps(x, t, SCHEDULE)


OTHER_MIXTURE = GaussianMixture.create(MIXTURE.means * 0.8, MIXTURE.stds * 1.1, MIXTURE.weights)


@functools.lru_cache(maxsize=None)
def jitted(name, nfe, final_sigma="t_end"):
    """One compiled sampler per (solver, nfe, final_sigma), shared by the tests below (compiles dominate)."""
    return dpmjax.make_sampler(COUNTING_MODEL, schedule=SCHEDULE, solver=name, nfe=nfe, spacing="logSNR",
                               final_sigma=final_sigma)


CALLS = []


def COUNTING_MODEL(x, t):  # noqa: N802 - a model function, named like the constant it is
    jax.debug.callback(lambda: CALLS.append(1))
    return MODEL(x, t)


def count_calls(run):
    CALLS.clear()
    out = run()
    jax.block_until_ready(out)
    jax.effects_barrier()
    return out, len(CALLS)


def comparable_nfe(name):
    """6 calls, but F-PNDM and TS-F-PNDM spend 12 on their 3 pseudo-RK4 steps: there a 3-step run from t = 1 has a
    condition number ~1e3 (a 6e-8 relative perturbation of the model output moves x_0 by 4e-4, measured in
    float64), so two float32 programs differ by ~1e-3 from rounding alone. 16 calls keep it well conditioned."""
    return valid_nfe(name, 16 if name in ("pndm", "ts_pndm") else 6)


@pytest.mark.parametrize("name", FIXED_STEP)
def test_jit_equals_eager_compiles_once_and_counts_nfe(name):
    nfe = comparable_nfe(name)
    x, key = x_init(), jax.random.key(1)
    eager, eager_calls = count_calls(lambda: dpmjax.sample(COUNTING_MODEL, x, schedule=SCHEDULE, solver=name,
                                                           nfe=nfe, spacing="logSNR", key=key))
    fn = jitted(name, nfe)
    out, jit_calls = count_calls(lambda: fn(x, key))
    # float32: XLA fuses/reorders the update arithmetic differently under jit (a few ulps per step), and the
    # steps amplify that ~10x: 1e-4 is ~1000 ulps of |x| ~ 1.
    np.testing.assert_allclose(np.asarray(out), np.asarray(eager), rtol=1e-4, atol=1e-4)
    assert np.all(np.isfinite(np.asarray(out)))
    assert eager_calls == jit_calls == nfe
    fn(x_init(seed=3), jax.random.key(2))
    assert fn.cache_size() == 1
    nfe_zero = valid_nfe(name, 7, final_sigma="zero")
    _, zero_calls = count_calls(lambda: jitted(name, nfe_zero, "zero")(x, key))
    assert zero_calls == nfe_zero


@pytest.mark.parametrize("name", FIXED_STEP)
def test_new_params_and_grids_do_not_recompile(name):
    """The params-as-arguments sampler: another checkpoint (params of the same shapes) and another grid of the
    same length (another spacing) reuse the one compiled program, and give what ``sample`` gives for them."""
    nfe = comparable_nfe(name)
    sampler = dpmjax.make_param_sampler(mixture_eps, schedule=SCHEDULE, solver=name, nfe=nfe, spacing="logSNR")
    x, key = x_init(), jax.random.key(1)
    first = sampler(MIXTURE, x, key)
    other_grid = plan(SCHEDULE, name, nfe=nfe, spacing="time_uniform").grid["t"]
    second = sampler(OTHER_MIXTURE, x_init(seed=2), jax.random.key(3), timesteps=other_grid)
    assert sampler.cache_size() == 1
    want = dpmjax.sample(OTHER_MIXTURE.model_fn(SCHEDULE), x_init(seed=2), schedule=SCHEDULE, solver=name,
                         timesteps=other_grid, key=jax.random.key(3))
    # same float32 tolerance and reason as the jit == eager test
    np.testing.assert_allclose(np.asarray(second), np.asarray(want), rtol=1e-4, atol=1e-4)
    assert not np.allclose(np.asarray(first), np.asarray(second))


@pytest.mark.parametrize("name", FIXED_STEP)
def test_vmap_over_keys(name):
    nfe = comparable_nfe(name)
    fn = jitted(name, nfe)
    keys = jax.random.split(jax.random.key(0), 3)
    out = jax.vmap(lambda key: fn(x_init(), key))(keys)
    assert out.shape == (3, 4, 2)
    np.testing.assert_allclose(np.asarray(out[1]), np.asarray(fn(x_init(), keys[1])), rtol=1e-5, atol=1e-5)
    if dpmjax.SOLVERS[name].needs_key({}):
        assert not np.allclose(np.asarray(out[0]), np.asarray(out[1]))


@pytest.mark.parametrize("name", FIXED_STEP)
def test_per_sample_timesteps(name):
    nfe = comparable_nfe(name)
    grid = plan_times(SCHEDULE, name, nfe=nfe, spacing="logSNR")
    grid_b = plan_times(SCHEDULE, name, nfe=nfe, spacing="time_uniform")
    x = x_init()
    key = jax.random.key(0)
    both = dpmjax.sample(MODEL, x, schedule=SCHEDULE, solver=name, key=key,
                         timesteps=np.stack([grid, grid_b, grid, grid_b], axis=1))
    assert np.all(np.isfinite(np.asarray(both)))
    if dpmjax.SOLVERS[name].needs_key({}):
        return  # noise is drawn for the whole batch; shapes and finiteness are what we can check
    shared = jitted(name, nfe)(x, key)
    # same float32 tolerance and reason as the jit == eager test
    np.testing.assert_allclose(np.asarray(both[0::2]), np.asarray(shared[0::2]), rtol=1e-4, atol=1e-4)
    second = dpmjax.sample(MODEL, x, schedule=SCHEDULE, solver=name, key=key, timesteps=grid_b)
    np.testing.assert_allclose(np.asarray(both[1::2]), np.asarray(second[1::2]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", FIXED_STEP)
def test_gradient_matches_finite_differences(name, x64):
    nfe = valid_nfe(name, 6)
    x = x_init(batch=3, dtype=jnp.float64)
    key = jax.random.key(0)
    weights = jax.random.normal(jax.random.key(5), x.shape, jnp.float64)

    @jax.jit
    def loss(x_T):
        return jnp.sum(weights * dpmjax.sample(MODEL, x_T, schedule=SCHEDULE, solver=name, nfe=nfe, key=key))

    grad = jax.grad(loss)(x)
    assert np.all(np.isfinite(np.asarray(grad)))
    direction = jax.random.normal(jax.random.key(6), x.shape, jnp.float64)
    eps = 1e-5
    fd = (loss(x + eps * direction) - loss(x - eps * direction)) / (2 * eps)
    # central differences in float64: truncation O(eps^2) ~ 1e-10, rounding ~ 1e-16 / eps ~ 1e-11.
    np.testing.assert_allclose(float(jnp.sum(grad * direction)), float(fd), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", FIXED_STEP)
def test_no_nan_from_min_nfe_to_1000(name):
    x = x_init(batch=2)
    key = jax.random.key(0)
    for target, final_sigma in ((1, "zero"), (1000, "t_end")):
        nfe = valid_nfe(name, target, final_sigma=final_sigma)
        out = dpmjax.sample(MODEL, x, schedule=SCHEDULE, solver=name, nfe=nfe, key=key, final_sigma=final_sigma)
        assert np.all(np.isfinite(np.asarray(out))), (name, nfe, final_sigma)


@pytest.mark.parametrize("name", FIXED_STEP)
def test_bfloat16_model_with_float32_state(name):
    # 20 calls: at 3-6 steps some solvers (heun, plms, pndm, singlestep noise-prediction) sit at their stability
    # limit, where any perturbation of the model output (bfloat16 rounding included) is amplified ~10-50x.
    nfe = valid_nfe(name, 20)
    bf16_model = lambda x, t: MODEL(x, t).astype(jnp.bfloat16)  # noqa: E731
    x, key = x_init(), jax.random.key(0)
    out = dpmjax.sample(bf16_model, x, schedule=SCHEDULE, solver=name, nfe=nfe, key=key, spacing="logSNR")
    ref = jitted(name, nfe)(x, key)
    assert out.dtype == jnp.float32
    # bfloat16 keeps 8 bits of mantissa: outputs agree to ~1e-2 relative after the steps amplify it.
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=5e-2, atol=5e-2)


def test_bad_input_is_rejected_before_compiling():
    x = x_init()
    with pytest.raises(ValueError, match="unknown solver"):
        dpmjax.sample(MODEL, x, schedule=SCHEDULE, solver="dpm_solver_9", nfe=5)
    with pytest.raises(ValueError, match="order must be one of"):
        dpmjax.sample(MODEL, x, schedule=SCHEDULE, solver="unipc", nfe=5, order=4)
    with pytest.raises(ValueError, match="prediction must be one of"):
        dpmjax.sample(MODEL, x, schedule=SCHEDULE, solver="dpmpp_2m", nfe=5, prediction="epsilon")
    with pytest.raises(ValueError, match="strictly decreasing"):
        dpmjax.sample(MODEL, x, schedule=SCHEDULE, solver="dpmpp_2m", timesteps=[0.5, 0.7, 0.1])
    with pytest.raises(ValueError, match=r"must lie in \[0.001, 1\]"):
        dpmjax.sample(MODEL, x, schedule=SCHEDULE, solver="dpmpp_2m", timesteps=[1.5, 0.5, 0.1])
    with pytest.raises(ValueError, match="at least 2 points"):
        dpmjax.sample(MODEL, x, schedule=SCHEDULE, solver="dpmpp_2m", timesteps=[0.5])
    with pytest.raises(ValueError, match="nfe=0 is too small"):
        dpmjax.sample(MODEL, x, schedule=SCHEDULE, solver="dpmpp_2m", nfe=0)
    with pytest.raises(ValueError, match="thresholding acts on x0"):
        dpmjax.sample(MODEL, x, schedule=SCHEDULE, solver="dpm_solver_2m", nfe=5, thresholding=True)
    with pytest.raises(ValueError, match="floating-point"):
        dpmjax.sample(MODEL, jnp.zeros((4, 2), jnp.int32), schedule=SCHEDULE, solver="dpmpp_2m", nfe=5)
    with pytest.raises(ValueError, match="model_fn failed"):
        dpmjax.sample(MODEL, jnp.zeros((4, 3)), schedule=SCHEDULE, solver="dpmpp_2m", nfe=5)
    with pytest.raises(ValueError, match="stochastic: pass key"):
        dpmjax.sample(MODEL, x, schedule=SCHEDULE, solver="ddpm", nfe=5)
    with pytest.raises(ValueError, match="unknown option"):
        dpmjax.sample(MODEL, x, schedule=SCHEDULE, solver="dpmpp_2m", nfe=5, solver_typ="taylor")


def test_nan_from_the_model_is_reported_with_its_step():
    def broken(x, t):
        return jnp.where(t[:, None] < 0.5, jnp.nan, MODEL(x, t))

    with pytest.raises(Exception, match="NaN/inf at model call"):
        out = dpmjax.sample(broken, x_init(), schedule=SCHEDULE, solver="dpmpp_2m", nfe=6,
                            spacing="time_uniform", check_nan=True)
        out.block_until_ready()
        jax.effects_barrier()
