"""USF: known solvers as specs reproduce their dedicated implementations; S^3 search; bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpmjax.oracle import GaussianMixture
from dpmjax.samplers import sample
from dpmjax.samplers.usf import USFSpec, known_spec
from dpmjax.schedules import DiscreteVP

SCHEDULE = DiscreteVP.from_name("linear")
MIX = GaussianMixture.random(seed=0, num_modes=3, dim=8)
MODEL = MIX.model_fn(SCHEDULE)


def noise(batch=4, seed=0, dtype=jnp.float64):
    return jax.random.normal(jax.random.key(seed), (batch, 8), dtype)


@pytest.mark.parametrize("solver, opts", [("dpmpp_2m", {}), ("dpm_solver_2m", {}),
                                          ("unipc", dict(order=2, variant="bh2")),
                                          ("unipc", dict(order=3, variant="bh1"))])
def test_known_solvers_as_specs(solver, opts, x64):
    x_T = noise()
    spec = known_spec(solver, SCHEDULE, 7, spacing="logSNR", **opts)
    ref = sample(MODEL, x_T, schedule=SCHEDULE, solver=solver, nfe=7, spacing="logSNR", **opts)
    got = sample(MODEL, x_T, schedule=SCHEDULE, solver="usf", nfe=7, spec=spec)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=0, atol=1e-10)


def test_spec_json_and_afs(x64):
    spec = known_spec("unipc", SCHEDULE, 6, spacing="logSNR")
    assert USFSpec.from_json(__import__("json").loads(spec.dumps())) == spec
    afs = USFSpec(**{**spec.__dict__, "afs": True})
    assert afs.nfe == 5
    y = sample(MODEL, noise(), schedule=SCHEDULE, solver="usf", nfe=5, spec=afs)
    assert np.all(np.isfinite(np.asarray(y)))


def test_bad_specs():
    spec = known_spec("dpmpp_2m", SCHEDULE, 6)
    with pytest.raises(ValueError, match="nfe=6, not nfe=5"):
        sample(MODEL, noise(dtype=jnp.float32), schedule=SCHEDULE, solver="usf", nfe=5, spec=spec)
    with pytest.raises(ValueError, match="order 3 needs 2 earlier"):
        USFSpec(**{**spec.__dict__, "order": (3,) * 6, "deriv_order": (2,) * 6}).validate()
    with pytest.raises(ValueError, match="relax"):
        USFSpec(**{**spec.__dict__, "relax": ("bh3",) * 6}).validate()


def test_s3_search_budget_and_files(tmp_path, x64):
    from dpmjax.oracle import ode_solution
    from dpmjax.search import s3

    x_T = noise(6, 3)
    ref = ode_solution(MIX, x_T, SCHEDULE.default_t_start, SCHEDULE.default_t_end, SCHEDULE)
    with pytest.raises(ValueError, match="budget"):
        s3.s3_search(MODEL, SCHEDULE, 4, x_T, ref, budget=0)
    spec, info = s3.s3_search(MODEL, SCHEDULE, 4, x_T, ref, budget=17, allow_afs=False)
    assert spec.nfe == 4 and info["evaluated"] == 17 and info["best_metric"] <= info["seed_best"]
    path = tmp_path / "spec.json"
    s3.save_spec(path, spec, schedule=SCHEDULE, model_id="mix8", metric=info["best_metric"])
    assert s3.load_spec(path, nfe=4, schedule=SCHEDULE, model_id="mix8") == spec
    with pytest.raises(ValueError, match="nfe=4, not nfe=5"):
        s3.load_spec(path, nfe=5, schedule=SCHEDULE, model_id="mix8")
    with pytest.raises(ValueError, match="model_id"):
        s3.load_spec(path, nfe=4, schedule=SCHEDULE, model_id="other")
