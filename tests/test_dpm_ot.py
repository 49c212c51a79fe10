"""DPM-OT (``dpmjax.methods.dpm_ot``): the semi-discrete OT map and its dual fit against exact solutions, the
sampler against the OT map + the plain solver run by hand, the method end to end through the finetune loop."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

from dpmjax.methods import dpm_ot


def _config(**method):
    from dpmjax.config import load_config

    config = load_config("configs/methods/dpm_ot.py:runlocal")
    with config.unlocked():
        config.method.update({"num_targets": 32, "k": 2, "mc_batch": 256, **method})
        config.train.update(num_steps=4, log_every=2, checkpoint_every=4)
    return config


# ------------------------------------------------------------------------------------------------ the map

def test_ot_map_sends_each_point_to_its_power_cell(rng):
    """T(x) = y_{argmax_i <x, y_i> + h_i}, checked against a loop over points and targets in numpy."""
    x = rng.normal(size=(16, 2, 2, 1)).astype(np.float32)
    targets = rng.normal(size=(7, 2, 2, 1)).astype(np.float32)
    heights = rng.normal(size=(7,)).astype(np.float32)
    mapped = np.asarray(dpm_ot.ot_map(jnp.asarray(x), jnp.asarray(targets), jnp.asarray(heights)))
    for b in range(16):
        scores = [float(np.dot(x[b].ravel(), targets[i].ravel()) + heights[i]) for i in range(7)]
        np.testing.assert_array_equal(mapped[b], targets[int(np.argmax(scores))])
    # heights move the cells: a huge height captures every point
    heights[3] = 1e4
    assert np.all(np.asarray(dpm_ot.ot_assign(jnp.asarray(x), jnp.asarray(targets), jnp.asarray(heights))) == 3)


def test_symmetric_targets_fit_back_to_zero_heights():
    """Four targets (+-1, 0), (0, +-1) under N(0, I): equal masses need h = 0 by symmetry. Started from
    unequal heights, the dual steps must return there (a sign error in dE/dh would push them apart)."""
    targets = jnp.asarray([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]], jnp.float32)
    start = jnp.asarray([0.5, -0.5, 0.3, -0.3], jnp.float32)
    heights, history = dpm_ot.fit_heights(targets, jax.random.key(0), num_steps=600, learning_rate=0.02,
                                          mc_batch=4096, heights=start)
    # MC noise: each step sees 4096 draws (mass std ~0.007); Adam's steps near the optimum are ~lr in size
    np.testing.assert_allclose(np.asarray(heights), 0.0, atol=0.05)
    assert float(history["grad_norm"][-50:].mean()) < 0.03 < float(history["grad_norm"][0])
    masses = dpm_ot.monte_carlo_cell_masses(jax.random.key(1), targets, heights, mc_batch=100_000)
    np.testing.assert_allclose(np.asarray(masses), 0.25, atol=0.02)


def test_fitted_heights_match_the_exact_1d_solution():
    """1-D targets y = (-1, 0.5, 2), source N(0, 1): the cells are intervals split at the Gaussian terciles q_j,
    where x y_j + h_j = x y_{j+1} + h_{j+1}, so h_{j+1} - h_j = -q_j (y_{j+1} - y_j) exactly. At h = 0 the
    middle target's cell is empty: the fit must open it."""
    y = np.array([-1.0, 0.5, 2.0])
    q = norm.ppf([1 / 3, 2 / 3])
    exact = np.concatenate([[0.0], np.cumsum(-q * np.diff(y))])
    exact -= exact.mean()
    targets = jnp.asarray(y[:, None], jnp.float32)
    heights, history = dpm_ot.fit_heights(targets, jax.random.key(0), num_steps=800, learning_rate=0.02,
                                          mc_batch=4096)
    assert float(history["empty_cells"][0]) == pytest.approx(1 / 3)  # the middle cell starts empty
    # tolerance: MC mass noise ~0.007 per step and Adam's jitter ~lr; 0.05 in h moves a split by ~0.03
    np.testing.assert_allclose(np.asarray(heights), exact, atol=0.05)


def test_asymmetric_2d_fit_reaches_equal_cell_masses(rng):
    """Six random targets in 2-D (unequal norms: the big ones own most of N(0, I) at h = 0): after the fit every
    cell holds 1/6 of a fresh 200k-sample draw within MC and optimisation tolerance."""
    targets = jnp.asarray(rng.normal(size=(6, 2)) * np.array([[2.0, 0.5]]), jnp.float32)
    before = dpm_ot.monte_carlo_cell_masses(jax.random.key(2), targets, jnp.zeros(6), mc_batch=50_000)
    assert float(jnp.max(jnp.abs(before - 1 / 6))) > 0.05  # the case is not trivially balanced
    heights, _ = dpm_ot.fit_heights(targets, jax.random.key(0), num_steps=800, learning_rate=0.02, mc_batch=4096)
    masses = dpm_ot.monte_carlo_cell_masses(jax.random.key(3), targets, heights, mc_batch=200_000)
    np.testing.assert_allclose(np.asarray(masses), 1 / 6, atol=0.015)


# ------------------------------------------------------------------------------------------------ sampling

def test_sample_equals_ot_map_then_the_plain_solver(digits_teacher):
    """sample() = OT map of x_T, then ``dpmjax.samplers.sample`` from t_k with k calls; the jitted sampler agrees
    and compiles once for new heights / targets of the same shapes."""
    from dpmjax.samplers.driver import sample as plain_sample

    _, teacher = digits_teacher
    apply_fn = teacher.apply_fn()
    keys = jax.random.split(jax.random.key(0), 3)
    targets = jax.random.normal(keys[0], (16, 8, 8, 1), jnp.float32)
    heights = jax.random.normal(keys[1], (16,), jnp.float32)
    x_T = jax.random.normal(keys[2], (4, 8, 8, 1), jnp.float32)
    t_k = 0.4
    got = dpm_ot.sample(apply_fn, teacher.params, targets, heights, x_T, schedule=teacher.schedule, t_k=t_k, nfe=3,
                        solver="dpmpp_2m", spacing="logSNR")
    start = dpm_ot.ot_map(x_T, targets, heights)
    assert all(any(np.array_equal(np.asarray(s), np.asarray(t)) for t in targets) for s in start)
    want = plain_sample(lambda x, t: apply_fn(teacher.params, x, t), start, schedule=teacher.schedule,
                        solver="dpmpp_2m", nfe=3, t_start=t_k, spacing="logSNR")
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    fn = dpm_ot.make_sampler(apply_fn, schedule=teacher.schedule, t_k=t_k, nfe=3, solver="dpmpp_2m")
    # two compiled programs may differ in the last ulps: a few-ulp tolerance, not bit equality
    np.testing.assert_allclose(np.asarray(fn(teacher.params, targets, heights, x_T)), np.asarray(want),
                               rtol=1e-5, atol=1e-5)
    fn(teacher.params, targets * 0.5, -heights, x_T)
    assert fn.cache_size() == 1


def test_make_sampler_rejects_bad_settings_before_compiling(digits_teacher):
    _, teacher = digits_teacher
    apply_fn = teacher.apply_fn()
    with pytest.raises(ValueError, match="t_k"):
        dpm_ot.make_sampler(apply_fn, schedule=teacher.schedule, t_k=1.5, nfe=2)
    with pytest.raises(ValueError, match="spacing"):
        dpm_ot.make_sampler(apply_fn, schedule=teacher.schedule, t_k=0.5, nfe=2, spacing="trailing")
    with pytest.raises(ValueError, match="nfe"):
        dpm_ot.make_sampler(apply_fn, schedule=teacher.schedule, t_k=0.5, nfe=1, solver="dpmpp_3m",
                            final_sigma="zero")


# ------------------------------------------------------------------------------------------------ the method

def test_finetune_end_to_end_and_load_params(digits_teacher, tmp_path):
    """``finetune("dpm_ot", ...)`` for a few updates: the workdir records the method and the resolved t_k, the
    targets are the seeded training images noised to t_k, ``load_params`` returns the teacher's network and
    ``sample_workdir`` samples through the map."""
    from dpmjax.methods import finetune
    from dpmjax.workdir import load_params

    _, teacher = digits_teacher
    config = _config()
    workdir = str(tmp_path / "ot")
    finetune("dpm_ot", teacher, config, workdir, num_devices=1, quiet=True)

    with open(os.path.join(workdir, "config.json")) as f:
        written = json.load(f)
    t_k = dpm_ot.resolve_t_k(teacher.schedule, k=2, reference_nfe=20, spacing="logSNR")
    assert written["method"]["name"] == "dpm_ot" and written["method"]["t_k"] == pytest.approx(t_k)
    assert written["sample"]["nfe"] == 2
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    assert rows and all(np.isfinite(rows[-1][name]) for name in ("grad_norm", "empty_cells", "max_mass_ratio"))

    _, variables, _, _ = load_params(workdir)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), variables, teacher.params)

    _, state, schedule, loaded = dpm_ot.load_workdir(workdir)
    assert state.targets.shape == (32, 8, 8, 1) and state.heights.shape == (32,)
    assert abs(float(jnp.mean(state.heights))) < 1e-5 and float(jnp.max(jnp.abs(state.heights))) > 0
    images = dpm_ot._training_images(loaded, teacher, 32, int(loaded.seed))  # noqa: SLF001 - the seeded subset
    alpha, sigma = float(schedule.alpha(t_k)), float(schedule.sigma(t_k))
    noise = (np.asarray(state.targets) - alpha * images) / sigma
    assert abs(noise.mean()) < 0.1 and abs(noise.std() - 1.0) < 0.1  # y_i = alpha x_i + sigma z_i, z_i ~ N(0, I)

    samples = dpm_ot.sample_workdir(workdir, 6, seed=1)
    assert samples.shape == (6, 8, 8, 1) and np.all(np.isfinite(samples))

    # `dpmjax sample` draws a dpm_ot workdir through its map (the same images as sample_workdir), never as the
    # plain teacher from pure noise; `dpmjax eval` refuses it with one line
    from dpmjax.main import main

    out = str(tmp_path / "cli.npz")
    assert main(["sample", "--workdir", workdir, "--num", "6", "--seed", "1", "--out", out]) == 0
    written = np.load(out)
    assert str(written["method"]) == "dpm_ot"
    np.testing.assert_allclose(written["images"], np.clip(samples, -1, 1), atol=1e-5)
    assert main(["eval", "--workdir", workdir, "--num", "8"]) == 2


def _count_compiles():
    events = []

    def listener(name, duration, **_):
        if name == "/jax/core/compile/backend_compile_duration":
            events.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    return events


@pytest.mark.parametrize("bad, match", [
    (dict(k=0), "method.k"),
    (dict(num_targets=1), "num_targets"),
    (dict(num_targets=10 ** 6), "num_targets"),
    (dict(lr_ot=-0.1), "lr_ot"),
    (dict(mc_batch=0), "mc_batch"),
    (dict(spacing="trailing"), "spacing"),
    (dict(solver="no_such_solver"), "solver"),
    (dict(t_k=2.0), "t_k"),
    (dict(reference_nfe=2), "reference_nfe"),
    (dict(k=1, solver="dpmpp_3m", spacing="logSNR"), None),  # fine: multistep solvers take 1 step
])
def test_bad_settings_raise_value_error_before_compiling(digits_teacher, tmp_path, bad, match):
    from dpmjax.methods import finetune

    _, teacher = digits_teacher
    config = _config(**bad)
    if match is None:
        dpm_ot.validate(config, teacher)
        return
    dpm_ot.validate(_config(), teacher)  # host-side schedule evaluations (time_grid) compile once per process
    compiles = _count_compiles()
    with pytest.raises(ValueError, match=match):
        finetune("dpm_ot", teacher, config, str(tmp_path / "bad"), num_devices=1, quiet=True)
    assert compiles == []
    assert not os.path.exists(tmp_path / "bad" / "checkpoints") or not os.listdir(tmp_path / "bad" / "checkpoints")


def test_class_conditional_teacher_is_refused(digits_teacher):
    _, teacher = digits_teacher
    conditional = dataclasses.replace(teacher, model=teacher.model.clone(num_classes=10))
    with pytest.raises(ValueError, match="class-conditional"):
        dpm_ot.validate(_config(), conditional)


def test_validate_and_build_work_on_an_abstract_teacher(digits_teacher):
    """``dpmjax finetune`` validates on the teacher's shapes before loading it; ``load_student`` builds on them."""
    from dpmjax.methods.base import abstract_teacher, teacher_section

    _, teacher = digits_teacher
    shapes = abstract_teacher(teacher_section(teacher))
    dpm_ot.validate(_config(), shapes)
    with pytest.raises(ValueError, match="num_targets"):
        dpm_ot.validate(_config(num_targets=10 ** 6), shapes)
    program = dpm_ot.build(_config(), shapes)
    state = jax.eval_shape(program.init, program.frozen, jax.random.key(0))
    assert state.targets.shape == (32, 8, 8, 1) and state.heights.shape == (32,)
