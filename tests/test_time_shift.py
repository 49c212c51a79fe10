"""Time-Shift sampler: identity with the base sampler when inactive, per-sample shifted times, bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpmjax.oracle import GaussianMixture
from dpmjax.samplers import sample
from dpmjax.samplers.time_shift import shift_times
from dpmjax.schedules import DiscreteVP

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
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))


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


def test_shifted_sampler_differs_and_is_finite(x64):
    x_T = noise()
    ref = sample(MODEL, x_T, schedule=SCHEDULE, solver="ddim", nfe=6, spacing="leading")
    got = sample(MODEL, x_T, schedule=SCHEDULE, solver="ts_ddim", nfe=6, spacing="leading", window=40)
    assert np.all(np.isfinite(np.asarray(got))) and not np.allclose(np.asarray(got), np.asarray(ref))


def test_bad_window():
    with pytest.raises(ValueError, match="window"):
        sample(MODEL, noise(dtype=jnp.float32), schedule=SCHEDULE, solver="ts_ddim", nfe=6, window=-1)
    with pytest.raises(ValueError, match="larger than the steps"):
        sample(MODEL, noise(dtype=jnp.float32), schedule=SCHEDULE, solver="ts_ddim", nfe=6, spacing="leading",
               window=400)
