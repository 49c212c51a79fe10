"""MMD-DDM (dpmjax.methods.mmd_ddm), its MMD estimator (dpmjax.metrics.mmd) and feature networks."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpmjax.config import configs_dir, load_config
from dpmjax.metrics import mmd
from dpmjax.metrics.features import FeatureNetwork, check_input_range, feature_network, parse_spec


def _config(arg="runlocal,steps=2", **overrides):
    config = load_config(os.path.join(configs_dir(), "methods", "mmd_ddm.py") + ":" + arg)
    with config.unlocked():
        for dotted, value in overrides.items():
            section, field = dotted.split(".")
            config[section][field] = value
    return config


# ------------------------------------------------------------------------------------------------ the estimator

def _mmd2_by_loops(x, y, k):
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_unbiased_mmd2_matches_the_double_sum(rng):
    x, y = rng.normal(size=(7, 5)), rng.normal(0.3, 1.2, size=(9, 5))
    poly = lambda a, b: (a @ b / 5 + 1.0) ** 3  # noqa: E731 - KID's kernel, written out
    rbf = lambda a, b: np.exp(-np.sum((a - b) ** 2) / (2 * 0.7 ** 2 * 5))  # noqa: E731
    np.testing.assert_allclose(mmd.mmd2_unbiased(x, y), _mmd2_by_loops(x, y, poly), rtol=1e-12)
    np.testing.assert_allclose(mmd.mmd2_unbiased(x, y, mmd.kernel_fn("rbf", bandwidth=0.7)),
                               _mmd2_by_loops(x, y, rbf), rtol=1e-12)
    # the jax path (float32) agrees with numpy's float64
    np.testing.assert_allclose(float(mmd.mmd2_unbiased(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))),
                               mmd.mmd2_unbiased(x, y), rtol=1e-4)


def test_estimator_is_unbiased_where_the_biased_one_is_not(rng):
    """Same distribution: the mean of MMD_u^2 over many draws is 0 within its standard error, while the V-statistic
    (diagonal kept) is positive -- the property that makes it the paper's loss."""
    values, biased = [], []
    for _ in range(400):
        x, y = rng.normal(size=(6, 3)), rng.normal(size=(6, 3))
        values.append(mmd.mmd2_unbiased(x, y))
        k = lambda a, b: (a @ b.T / 3 + 1.0) ** 3  # noqa: E731
        biased.append(k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean())
    values = np.asarray(values)
    assert abs(values.mean()) < 3 * values.std() / np.sqrt(len(values))
    assert np.mean(biased) > 10 * values.std() / np.sqrt(len(values))


def test_estimator_rejects_bad_shapes():
    with pytest.raises(ValueError, match="at least 2 rows"):
        mmd.mmd2_unbiased(np.zeros((1, 3)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"\[m, d\]"):
        mmd.mmd2_unbiased(np.zeros((4, 3)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="kernel must be one of"):
        mmd.kernel_fn("laplace")


# ------------------------------------------------------------------------------------------------ feature networks

def test_feature_specs_and_input_range():
    assert parse_spec("classifier:digits:3") == ("classifier", "digits", 3)
    assert parse_spec("inception") == ("inception", None, None)
    for bad in ("classifier", "classifier:digits:x", "clip", "inception:1"):
        with pytest.raises(ValueError, match="expected 'classifier"):
            parse_spec(bad)
    net = feature_network("classifier:digits:1", image_shape=(8, 8, 1))
    feats = net.apply(net.params, jnp.zeros((2, 8, 8, 1)))
    assert feats.shape == (2, net.dim)
    with pytest.raises(ValueError, match=r"takes \(8, 8, 1\) images"):
        feature_network("classifier:digits", image_shape=(28, 28, 1))
    with pytest.raises(ValueError, match=r"expects images in \(0.0, 1.0\)"):
        check_input_range(FeatureNetwork("unit", net.apply, net.params, net.dim, input_range=(0.0, 1.0)))


# ------------------------------------------------------------------------------------------------ the method

def test_gradient_through_the_sampler_descends_the_mmd(digits_teacher):
    """One small step against the gradient (through T' = 2 DDIM steps, rematerialised) lowers the MMD^2 of the
    same batch; the gradient with and without remat is the same."""
    from dpmjax.methods import mmd_ddm

    _, teacher = digits_teacher
    config = _config()
    program = mmd_ddm.build(config, teacher)
    frozen = program.frozen
    images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (8, 8, 8, 1)), jnp.float32)
    x_T = jax.random.normal(jax.random.key(1), images.shape)
    net = feature_network("classifier:digits:1", (8, 8, 1))
    timesteps = mmd_ddm.sampler_timesteps(config, teacher)
    apply_fn = teacher.apply_fn()
    from dpmjax.samplers.driver import sample

    def loss(params, remat):
        fake = sample(lambda x, t: apply_fn(params, x, t), x_T, schedule=teacher.schedule, solver="ddim",
                      timesteps=timesteps, prediction=teacher.prediction, remat=remat)
        fr = net.apply(frozen["features"], images)
        s = mmd_ddm.feature_scale(fr)
        return mmd.mmd2_unbiased(fr / s, net.apply(frozen["features"], fake) / s)

    value, grads = jax.value_and_grad(loss)(frozen["teacher"], True)
    _, grads_plain = jax.value_and_grad(loss)(frozen["teacher"], False)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_plain)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-3 * float(jnp.max(jnp.abs(b))))
    norm = float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grads))))
    stepped = jax.tree.map(lambda p, g: p - 1e-3 * g / norm, frozen["teacher"], grads)
    assert float(loss(stepped, True)) < float(value)


def test_finetune_writes_a_workdir_that_samples_with_its_t_prime(digits_teacher, tmp_path):
    """`dpmjax finetune` then `dpmjax sample` on the output: the sample section is the T'-step DDIM; the params
    moved away from the teacher's; mmd2 is logged."""
    import json

    from dpmjax.main import main
    from dpmjax.workdir import load_params

    teacher_dir, teacher = digits_teacher
    out = str(tmp_path / "mmd")
    assert main(["finetune", "--method", "mmd_ddm", "--teacher", teacher_dir, "--workdir", out, "--config",
                 os.path.join(configs_dir(), "methods", "mmd_ddm.py") + ":runlocal,steps=2",
                 "--config.train.num_steps=2", "--num-devices", "1"]) == 0
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["sample"]["solver"] == "ddim" and config["sample"]["nfe"] == 2
    _, params, _, _ = load_params(out)
    moved = [float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(teacher.params))]
    assert max(moved) > 0
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert rows and all(np.isfinite(r["mmd2"]) for r in rows)
    samples = str(tmp_path / "s.npz")
    assert main(["sample", "--workdir", out, "--num", "8", "--out", samples]) == 0
    written = np.load(samples)
    assert written["images"].shape == (8, 8, 8, 1) and str(written["solver"]) == "ddim" and int(written["nfe"]) == 2


@pytest.mark.parametrize("override, message", [
    ({"method.steps": 0}, "steps"),
    ({"method.solver": "pndm"}, "cannot run T'=2"),
    ({"method.solver": "dpm_solver_adaptive"}, "adaptive|registered"),
    ({"method.kernel": "laplace"}, "kernel"),
    ({"method.features": "clip"}, "expected 'classifier"),
    ({"data.batch_size": 1}, "batch_size"),
])
def test_bad_settings_fail_before_compiling(digits_teacher, tmp_path, override, message):
    from dpmjax.methods import finetune

    _, teacher = digits_teacher
    with pytest.raises(ValueError, match=message):
        finetune("mmd_ddm", teacher, _config(**override), str(tmp_path / "x"))
    assert not os.path.exists(tmp_path / "x")


def test_cli_errors_are_one_line(digits_teacher, tmp_path, capsys):
    from dpmjax.main import main

    teacher_dir, _ = digits_teacher
    assert main(["finetune", "--method", "mmd_ddm", "--teacher", str(tmp_path / "missing"), "--workdir",
                 str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["finetune", "--method", "mmd_ddm", "--teacher", teacher_dir, "--workdir", str(tmp_path / "o"),
                 "--config.method.steps=0"]) == 2
    assert "steps" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")


def test_inception_features_take_dpmjax_images():
    """The 'inception' network maps [-1, 1] images to the same pool3 features as the FID pipeline does for the
    [0, 1] images they encode (the range conversion is the network's, not the caller's)."""
    from dpmjax.metrics import inception_features

    net = feature_network("inception", image_shape=(8, 8, 1))
    images = np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 1)).astype(np.float32)
    ours = np.asarray(jax.jit(net.apply)(net.params, images))
    reference = inception_features(net.params, (images + 1) / 2, batch_size=2, mesh=None, progress=False)
    assert ours.shape == (2, 2048)
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4)
