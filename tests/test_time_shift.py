"""Time-Shift sampler: identity with the base sampler when inactive, per-sample shifted times, bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpmjax.oracle import GaussianMixture
from dpmjax.samplers import sample
from dpmjax.samplers.time_shift import shift_times
from dpmjax.schedules import DiscreteVP, time_grid

SCHEDULE = DiscreteVP.from_name("linear")
MIX = GaussianMixture.random(seed=0, num_modes=3, dim=8)
MODEL = MIX.model_fn(SCHEDULE)


def noise(batch=4, dtype=jnp.float64):
    return jax.random.normal(jax.random.key(0), (batch, 8), dtype)


CASES = [("ts_ddim", "ddim", 6), ("ts_pndm", "pndm", 13), ("ts_dpm_solver", "dpm_solver_2m", 5)]


@pytest.mark.parametrize("ts, base, nfe, off", [c + ({"window": 0},) for c in CASES] + [
    ("ts_ddim", "ddim", 6, {"cutoff": 1000})])
def test_inactive_shift_is_the_base_sampler(ts, base, nfe, off, x64):
    x_T = noise()
    kw = dict(schedule=SCHEDULE, nfe=nfe, spacing="leading")
    ref = sample(MODEL, x_T, solver=base, **kw)
    got = sample(MODEL, x_T, solver=ts, **kw, **off)
    # the same computation compiled as two programs (a per-sample grid, another fusion): equal to a few float64 ulps,
    # not bit for bit (that differs between x86 CPUs)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-13, atol=1e-14)


def test_shift_picks_per_sample_times(x64):
    # samples with variance of noise levels k = 600 and 640 around k = 620: each gets its own time
    z = jax.random.normal(jax.random.key(1), (4000,), jnp.float64)
    z = (z - z.mean()) / z.std()
    x = jnp.stack([z * SCHEDULE.sigma(jnp.float64(k / 1000.0)) for k in (601, 641)])
    t = jnp.float64(621 / 1000.0)
    got = np.asarray(shift_times(SCHEDULE, x, t, window=60, cutoff=300)) * 1000 - 1
    assert abs(got[0] - 600) < 8 and abs(got[1] - 640) < 8 and got[0] != got[1]
    # below the cutoff nothing moves
    np.testing.assert_array_equal(np.asarray(shift_times(SCHEDULE, x, t, window=60, cutoff=700)), [t, t])


def test_ts_ddim_equals_the_papers_rule_step_by_step(x64):
    """TS-DDIM against a hand-written loop of the paper's rule: before each step above the cutoff, every sample
    gets t'_b = argmin_{t' in window} (Var(x_b) - sigma_{t'}^2)^2, the model is evaluated at t'_b and the DDIM step
    starts from t'_b (its alpha, sigma). Fails if the shifted time misses any of those places."""
    x_T = noise(batch=6)
    window, cutoff, nfe = 40, 300, 5
    got = sample(MODEL, x_T, schedule=SCHEDULE, solver="ts_ddim", nfe=nfe, spacing="leading", window=window,
                 cutoff=cutoff)
    times = time_grid(SCHEDULE, nfe, "leading")
    x = np.asarray(x_T)
    offsets = np.arange(-(window // 2), window // 2 + 1) / 1000.0
    shifted_any = False
    for i in range(nfe):
        t = np.full(x.shape[0], times[i])
        if times[i] * 1000 - 1 > cutoff:
            cand = np.clip(times[i] + offsets, 1e-3, 1.0)                                  # [W]
            noise_var = 1.0 - np.asarray(SCHEDULE.alpha(jnp.asarray(cand))) ** 2          # sigma^2 = 1 - alpha^2
            t = cand[np.argmin((x.var(axis=1)[:, None] - noise_var[None, :]) ** 2, axis=1)]
            shifted_any |= bool(np.any(t != times[i]))
        eps = np.asarray(MODEL(jnp.asarray(x), jnp.asarray(t)))
        alpha_s, sigma_s = (np.asarray(f(jnp.asarray(t)))[:, None] for f in (SCHEDULE.alpha, SCHEDULE.sigma))
        alpha_t, sigma_t = (float(f(jnp.float64(times[i + 1]))) for f in (SCHEDULE.alpha, SCHEDULE.sigma))
        x0 = (x - sigma_s * eps) / alpha_s
        x = alpha_t * x0 + sigma_t * eps
    assert shifted_any  # the test exercises the shift
    np.testing.assert_allclose(np.asarray(got), x, rtol=1e-10, atol=1e-10)
    base = sample(MODEL, x_T, schedule=SCHEDULE, solver="ddim", nfe=nfe, spacing="leading")
    assert not np.allclose(np.asarray(got), np.asarray(base))


def test_bad_window():
    with pytest.raises(ValueError, match="window"):
        sample(MODEL, noise(dtype=jnp.float32), schedule=SCHEDULE, solver="ts_ddim", nfe=6, window=-1)
    with pytest.raises(ValueError, match="larger than the steps"):
        sample(MODEL, noise(dtype=jnp.float32), schedule=SCHEDULE, solver="ts_ddim", nfe=6, spacing="leading",
               window=400)
