"""The sampler driver's contract beyond each solver's maths: compiled samplers with params, grids and
conditioning as arguments (no recompiles), sharding and padding, numerics of low-precision states, errors that
need the values (check_nan, an unfinished adaptive solve) with and without jit, denoise_to_zero, remat."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpmjax
from dpmjax import sharding
from dpmjax.oracle import GaussianMixture
from dpmjax.samplers import SamplingError, plan

SCHEDULE = dpmjax.DiscreteVP.from_name("linear")
MIXTURE = GaussianMixture.ring()
MODEL = MIXTURE.model_fn(SCHEDULE)


def mixture_eps(mixture, x, t, shift=None):
    """apply_fn(params, x, t, **cond): the mixture's exact eps, the mixture as params, an optional per-sample
    data shift as conditioning."""
    if shift is None:
        return mixture.eps(x, t, SCHEDULE)
    alpha = SCHEDULE.alpha(t)[:, None].astype(x.dtype)
    return mixture.eps(x - alpha * shift, t, SCHEDULE)


def noise(batch=16, seed=0, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), (batch, 2), dtype)


# ---------------------------------------------------------------------------------------------------------
# Compiled samplers: params, grids and conditioning are data
# ---------------------------------------------------------------------------------------------------------

def test_param_sampler_takes_conditioning_and_grid_data_without_recompiling():
    sampler = dpmjax.make_param_sampler(mixture_eps, schedule=SCHEDULE, solver="dc_solver", nfe=6, spacing="logSNR")
    x = noise()
    shift = 0.5 * jnp.ones_like(x)
    out = sampler(MIXTURE, x, shift=shift)
    want = dpmjax.sample(lambda y, t: mixture_eps(MIXTURE, y, t, shift), x, schedule=SCHEDULE, solver="dc_solver",
                         nfe=6, spacing="logSNR")
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-5)
    # new DC ratios are grid data too: same program, and they change the result as sample() says
    ratios = np.linspace(1.0, 0.8, 6)
    got = sampler(MIXTURE, x, shift=shift, grid_options={"ratios": ratios})
    want = dpmjax.sample(lambda y, t: mixture_eps(MIXTURE, y, t, shift), x, schedule=SCHEDULE, solver="dc_solver",
                         nfe=6, spacing="logSNR", ratios=ratios)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(got), np.asarray(out))
    assert sampler.cache_size() == 1


def test_padding_chunks_and_sharding_over_eight_devices_change_nothing():
    assert len(jax.devices()) == 8  # tests/conftest.py simulates 8 CPU devices
    x = noise(batch=21)
    want = dpmjax.sample(MODEL, x, schedule=SCHEDULE, solver="unipc", nfe=5, spacing="logSNR")
    mesh = sharding.make_mesh()
    whole = dpmjax.make_param_sampler(mixture_eps, schedule=SCHEDULE, solver="unipc", nfe=5, spacing="logSNR",
                                      mesh=mesh)
    chunked = dpmjax.make_param_sampler(mixture_eps, schedule=SCHEDULE, solver="unipc", nfe=5, spacing="logSNR",
                                        mesh=mesh, batch_size=8)
    out = whole(MIXTURE, x)          # 21 -> padded to 24 over 8 devices
    parts = chunked(MIXTURE, x)      # 8 + 8 + 5 (padded to 8), one program
    assert out.shape == parts.shape == x.shape
    # the same float32 arithmetic per sample, whatever the batch layout: agree to rounding
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(parts), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert chunked.cache_size() == 1
    assert out.sharding.spec == jax.sharding.PartitionSpec("data") or len(out.sharding.device_set) >= 1


def test_compiled_sampler_bad_input_names_the_argument_before_compiling():
    sampler = dpmjax.make_param_sampler(mixture_eps, schedule=SCHEDULE, solver="dpmpp_2m", nfe=5)
    with pytest.raises(ValueError, match="compiled for a grid of 6 points"):
        sampler(MIXTURE, noise(), timesteps=dpmjax.time_grid(SCHEDULE, 7, "logSNR"))
    with pytest.raises(ValueError, match="conditioning 'shift' must have a leading batch dimension 16"):
        sampler(MIXTURE, noise(), shift=jnp.zeros((3, 2)))
    with pytest.raises(ValueError, match="params .* do not fit apply_fn"):
        sampler({"means": jnp.zeros((3,))}, noise())
    with pytest.raises(ValueError, match="cannot change per call"):
        sampler(MIXTURE, noise(), grid_options={"order": 3})
    with pytest.raises(ValueError, match="batch_size must be a positive multiple of the mesh's data axis"):
        dpmjax.make_param_sampler(mixture_eps, schedule=SCHEDULE, solver="ddim", nfe=5, mesh=sharding.make_mesh(),
                                  batch_size=12)
    with pytest.raises(ValueError, match="per-sample grids"):
        dpmjax.make_param_sampler(mixture_eps, schedule=SCHEDULE, solver="ddim",
                                  timesteps=np.stack([dpmjax.time_grid(SCHEDULE, 4, "logSNR")] * 16, axis=1))
    assert sampler.cache_size() == 0


# ---------------------------------------------------------------------------------------------------------
# Numerics: coefficients in at least float32
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("solver", ["dpmpp_2m", "unipc", "ddim", "dpmpp_2s"])
def test_bfloat16_state_gets_float32_coefficients(solver):
    """A bfloat16 x_T: t = 1 in bfloat16 gave sigma = NaN in the schedule and all-NaN samples. The grid and
    every coefficient are now float32; only the update is bfloat16. (Data-prediction solvers: a noise-prediction
    step at high noise, x_t = (alpha_t/alpha_s) x_s - sigma_t (e^h - 1) eps with x_s ~ eps, cancels two large
    terms and loses the few bits a bfloat16 state has; it stays finite but is not accurate there.)"""
    x = noise()
    got = dpmjax.sample(MODEL, x.astype(jnp.bfloat16), schedule=SCHEDULE, solver=solver, nfe=10, spacing="logSNR")
    want = dpmjax.sample(MODEL, x, schedule=SCHEDULE, solver=solver, nfe=10, spacing="logSNR")
    assert got.dtype == jnp.bfloat16
    assert np.all(np.isfinite(np.asarray(got, np.float32)))
    # bfloat16 keeps 8 mantissa bits (relative 4e-3 per rounding); ten steps of rounding the state: ~5e-2
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), rtol=5e-2, atol=5e-2)
    grid = plan(SCHEDULE, solver, nfe=10, spacing="logSNR").grid["t"]
    assert np.all(np.diff(np.asarray(grid, np.float32)) < 0)  # distinct in float32 (not in bfloat16 near t = 1)


# ---------------------------------------------------------------------------------------------------------
# Errors that need the values
# ---------------------------------------------------------------------------------------------------------

def broken(x, t):
    """NaN from the model below t = 0.5."""
    return jnp.where(t[:, None] < 0.5, jnp.nan, MODEL(x, t))


def test_check_nan_raises_the_same_error_eagerly_and_compiled():
    kw = dict(schedule=SCHEDULE, solver="dpmpp_2m", nfe=6, spacing="time_uniform")
    first_bad = int(np.argmax(plan(SCHEDULE, "dpmpp_2m", nfe=6, spacing="time_uniform").grid["t"] < 0.5))
    message = f"NaN/inf at model call {first_bad} "
    with pytest.raises(FloatingPointError, match=message):
        dpmjax.sample(broken, noise(), check_nan=True, **kw)
    with pytest.raises(FloatingPointError, match=message):
        dpmjax.make_sampler(broken, check_nan=True, **kw)(noise())
    with pytest.raises(FloatingPointError, match=message):
        dpmjax.make_param_sampler(lambda p, x, t: broken(x, t), check_nan=True, **kw)(None, noise())
    # inside the caller's own jit: refused at trace time, and return_info gives the index instead
    with pytest.raises(ValueError, match="check_nan=True raises on the host and cannot run inside jax.jit"):
        jax.jit(lambda x: dpmjax.sample(broken, x, check_nan=True, **kw))(noise())
    _, info = jax.jit(lambda x: dpmjax.sample(broken, x, return_info=True, **kw))(noise())
    assert int(info.first_nonfinite) == first_bad and int(info.nfe) == 6


def test_unfinished_adaptive_solve_is_never_returned_silently():
    kw = dict(schedule=SCHEDULE, solver="dpm_solver_adaptive", nfe=1, order=3, max_nfe=9)
    with pytest.raises(SamplingError, match=r"stopped at t=.* after 9 model calls: raise max_nfe"):
        dpmjax.sample(MODEL, noise(), **kw)
    with pytest.raises(SamplingError, match="stopped at t="):
        dpmjax.make_sampler(MODEL, **kw)(noise())
    x, info = dpmjax.sample(MODEL, noise(), return_info=True, **kw)
    assert not bool(info.finished) and int(info.nfe) == 9 and float(info.t_final) > 10 * SCHEDULE.default_t_end
    poisoned = jax.jit(lambda x: dpmjax.sample(MODEL, x, **kw))(noise())
    assert np.all(np.isnan(np.asarray(poisoned)))  # under the caller's jit: NaN, never a half-done sample
    finished = dpmjax.sample(MODEL, noise(), schedule=SCHEDULE, solver="dpm_solver_adaptive", nfe=1)
    assert np.all(np.isfinite(np.asarray(finished)))
    with pytest.raises(SamplingError, match="a NaN from the model"):  # NaN stops the loop: named as a cause
        dpmjax.sample(broken, noise(), **{**kw, "max_nfe": 300})


# ---------------------------------------------------------------------------------------------------------
# denoise_to_zero, final_sigma and remat
# ---------------------------------------------------------------------------------------------------------

def test_denoise_to_zero_is_one_more_x0_call_at_t_end(x64):
    x = noise(dtype=jnp.float64)
    kw = dict(schedule=SCHEDULE, solver="dpmpp_2m", spacing="logSNR")
    out, info = dpmjax.sample(MODEL, x, nfe=7, denoise_to_zero=True, return_info=True, **kw)
    base = dpmjax.sample(MODEL, x, nfe=6, **kw)
    t_end = jnp.full((x.shape[0],), SCHEDULE.default_t_end, jnp.float64)
    want = dpmjax.parameterization.to_x0(MODEL(base, t_end), base, t_end, SCHEDULE, "eps")
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-12, atol=1e-12)
    assert int(info.nfe) == 7


def test_a_grid_ending_at_sigma_zero_must_say_so():
    grid = np.append(dpmjax.time_grid(dpmjax.FlowMatching(), 5, "logSNR"), 0.0)
    model = GaussianMixture.ring().model_fn(dpmjax.FlowMatching())
    with pytest.raises(ValueError, match="end where sigma = 0: pass final_sigma='zero'"):
        dpmjax.sample(model, noise(), schedule=dpmjax.FlowMatching(), solver="dpmpp_2m",
                      timesteps=np.concatenate([grid[:-2], [0.0]]))
    out = dpmjax.sample(model, noise(), schedule=dpmjax.FlowMatching(), solver="dpmpp_2m", timesteps=grid,
                        final_sigma="zero")
    assert np.all(np.isfinite(np.asarray(out)))


def test_remat_gives_the_same_values_and_gradients():
    x = noise(batch=4)

    def loss(x_T, remat):
        return jnp.sum(dpmjax.sample(MODEL, x_T, schedule=SCHEDULE, solver="unipc", nfe=6, remat=remat) ** 2)

    plain, grad_plain = jax.jit(jax.value_and_grad(lambda v: loss(v, False)))(x)
    remat, grad_remat = jax.jit(jax.value_and_grad(lambda v: loss(v, True)))(x)
    # the same arithmetic recomputed in the backward pass: equal up to float32 rounding of the fused programs
    np.testing.assert_allclose(float(remat), float(plain), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad_remat), np.asarray(grad_plain), rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(np.asarray(grad_remat)))
    # the step is wrapped in jax.checkpoint (jaxpr primitive "remat2") only when asked
    assert "remat2" in str(jax.make_jaxpr(lambda v: loss(v, True))(x))
    assert "remat2" not in str(jax.make_jaxpr(lambda v: loss(v, False))(x))
