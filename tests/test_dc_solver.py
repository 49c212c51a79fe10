"""DC-Solver: ratios 1 is UniPC exactly; the ratio search lowers held-out error; CPR; ratio files."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpmjax.oracle import GaussianMixture, ode_solution
from dpmjax.samplers import plan, sample
from dpmjax.schedules import DiscreteVP
from dpmjax.search import dc


def plan_times(*args, **kwargs):
    """The solver grid (times) that ``plan`` builds."""
    return plan(*args, **kwargs).grid["t"]

SCHEDULE = DiscreteVP.from_name("linear")
MIX = GaussianMixture.random(seed=0, num_modes=4, dim=16)
MODEL = MIX.model_fn(SCHEDULE)


def noise(batch, seed, dtype=jnp.float64):
    return jax.random.normal(jax.random.key(seed), (batch, 16), dtype)


@pytest.mark.parametrize("opts", [dict(order=2, variant="bh2", final_sigma="zero"),
                                  dict(order=3, variant="bh1", predict_x0=False)])
def test_unit_ratios_are_unipc(opts, x64):
    x_T = noise(4, 0)
    ref = sample(MODEL, x_T, schedule=SCHEDULE, solver="unipc", nfe=6, **opts)
    steps = 5 if opts.get("final_sigma") == "zero" else 6
    got = sample(MODEL, x_T, schedule=SCHEDULE, solver="dc_solver", nfe=6, ratios=np.ones(steps), **opts)
    # the same computation compiled as two programs (a per-sample grid, another fusion): equal to a few float64 ulps,
    # not bit for bit (that differs between x86 CPUs)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("objective", ["greedy"])  # "final" measured in experiments/learned_schedules.py
def test_search_lowers_held_out_error_and_files(objective, tmp_path, x64):
    # held-out errors are dominated by the few points that end near a mode boundary: 64 of them
    grid = plan_times(SCHEDULE, "dc_solver", nfe=5, spacing="logSNR")
    x_search, x_held = noise(10, 1), noise(64, 5)
    targets = dc.model_targets(MODEL, x_search, grid, SCHEDULE, substeps=8)
    ratios, info = dc.search_dc_ratios(MODEL, x_search, targets, schedule=SCHEDULE, timesteps=grid, num_iters=10,
                                       objective=objective)
    assert ratios.shape == (5,) and np.all(ratios[:2] == 1.0) and info["seconds"] > 0
    exact = ode_solution(MIX, x_held, float(grid[0]), float(grid[-1]), SCHEDULE)

    def error(r):
        y = sample(MODEL, x_held, schedule=SCHEDULE, solver="dc_solver", timesteps=grid, ratios=r)
        return float(jnp.sqrt(jnp.mean((y - exact) ** 2)))
    assert error(ratios) < 0.9 * error(None)

    path = tmp_path / "ratios.json"
    dc.save_ratios(path, ratios, nfe=5, schedule=SCHEDULE, model_id="mix16", info=info)
    np.testing.assert_array_equal(dc.load_ratios(path, nfe=5, schedule=SCHEDULE, model_id="mix16"), ratios)
    with pytest.raises(ValueError, match="nfe=5, not nfe=6"):
        dc.load_ratios(path, nfe=6, schedule=SCHEDULE, model_id="mix16")
    with pytest.raises(ValueError, match="model_id"):
        dc.load_ratios(path, nfe=5, schedule=SCHEDULE, model_id="other")
    with pytest.raises(ValueError, match="schedule"):
        dc.load_ratios(path, nfe=5, schedule=DiscreteVP.from_name("cosine"), model_id="mix16")


def test_cpr_fits_and_predicts():
    configs = [(n, 1.0, 1.0 + 0.1 * np.sin(np.arange(n) / n * 3)) for n in (5, 6, 8, 10)]
    coeffs = dc.fit_cpr(configs)
    assert coeffs.shape == (36,)
    pred = dc.predict_cpr(coeffs, 8)
    assert pred.shape == (8,) and np.all(pred[:2] == 1.0)
    np.testing.assert_allclose(pred[2:], configs[2][2][2:], atol=0.02)
    assert dc.predict_cpr(coeffs, 7).shape == (7,)


def test_bad_input(x64):
    with pytest.raises(ValueError, match="ratios"):
        sample(MODEL, noise(2, 0, jnp.float32), schedule=SCHEDULE, solver="dc_solver", nfe=5, ratios=[1.0, 1.0])
    grid = plan_times(SCHEDULE, "dc_solver", nfe=5)
    with pytest.raises(ValueError, match="num_iters"):
        dc.search_dc_ratios(MODEL, noise(2, 0), np.zeros((6, 2, 16)), schedule=SCHEDULE, timesteps=grid,
                            num_iters=0)
