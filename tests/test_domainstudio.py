"""DomainStudio (dpmjax/methods/domainstudio.py): the Haar DWT against the official filters, the relative-distance
KL against a loop oracle, the update's terms at the source model, its effect against plain finetuning, the CLI
run and the bad settings."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpmjax.config import configs_dir, load_config
from dpmjax.methods import domainstudio
from dpmjax.nn.wavelets import haar_dwt


def method_config(name, variant="runlocal", **overrides):
    config = load_config(os.path.join(configs_dir(), "methods", f"{name}.py") + ":" + variant)
    with config.unlocked():
        for dotted, value in overrides.items():
            section, field = dotted.split("__")
            config[section][field] = value
    return config


def test_haar_dwt_equals_the_official_stride_2_depthwise_convolution():
    """get_wave's filters L^T L, L^T H, H^T L, H^T H (L = [1, 1]/sqrt2, H = [-1, 1]/sqrt2) as a stride-2 conv."""
    x = jax.random.normal(jax.random.key(0), (2, 8, 6, 3))
    low, high = np.array([1.0, 1.0]) / np.sqrt(2), np.array([-1.0, 1.0]) / np.sqrt(2)
    for band, (rows, cols) in zip(haar_dwt(x), [(low, low), (low, high), (high, low), (high, high)]):
        kernel = np.outer(rows, cols)[:, :, None, None] * np.ones((1, 1, 1, 3))  # HWIO, depthwise
        oracle = jax.lax.conv_general_dilated(x, jnp.asarray(kernel, x.dtype), (2, 2), "VALID",
                                              dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=3)
        np.testing.assert_allclose(band, oracle, atol=1e-5)
    energy = sum(jnp.sum(b ** 2) for b in haar_dwt(x))  # orthonormal: Parseval
    np.testing.assert_allclose(energy, jnp.sum(x ** 2), rtol=1e-5)
    with pytest.raises(ValueError, match="even"):
        haar_dwt(jnp.zeros((1, 7, 8, 1)))


def test_relative_distance_kl_equals_a_loop_over_anchors():
    rng = np.random.default_rng(1)
    source, adapted = rng.normal(size=(5, 4, 4, 1)), rng.normal(size=(5, 4, 4, 1))

    def similarities(x, i):
        flat = x.reshape(len(x), -1)
        cos = [flat[i] @ flat[j] / np.linalg.norm(flat[i]) / np.linalg.norm(flat[j]) for j in range(len(x)) if j != i]
        e = np.exp(cos)
        return e / e.sum()

    oracle = np.mean([np.sum(similarities(source, i) * np.log(similarities(source, i) / similarities(adapted, i)))
                      for i in range(5)])
    value = domainstudio.relative_distance_kl(jnp.asarray(source, jnp.float32), jnp.asarray(adapted, jnp.float32))
    np.testing.assert_allclose(value, oracle, rtol=1e-5)
    assert float(domainstudio.relative_distance_kl(jnp.asarray(source), jnp.asarray(3.0 * source))) == pytest.approx(
        0.0, abs=1e-7)  # cosine: a rescaled batch keeps every relative distance


def _run(method, teacher, steps, **overrides):
    from dpmjax.methods import get_method

    config = method_config(method, f"runlocal,steps={steps}", **overrides)
    with config.unlocked():
        config.train.num_steps = steps
        config.optim.learning_rate = 3e-3
    program = get_method(method).build(config, teacher)
    state = program.init(program.frozen, jax.random.key(0))
    update = jax.jit(program.update)
    source = get_dataset_batch(config)
    history = []
    for step in range(steps):
        state, scalars = update(state, source, program.frozen, jax.random.key(step + 1))
        history.append(jax.device_get(scalars))
    return program, state, history


def get_dataset_batch(config):
    from dpmjax.train.loop import build_data

    source = build_data(config)
    return {"image": jnp.asarray(source.images[:4]), "label": jnp.asarray(source.labels[:4])}


def test_the_terms_vanish_at_the_source_and_keep_relative_distances_better_than_plain_finetuning(digits_teacher):
    """At init (adapted = source) the relation terms are 0; after the same 12 updates on the same 4 inverted
    digits, the DomainStudio model's x0-predictions keep the source's relative distances (lower KL on fresh
    noisy inputs) better than plain finetuning's."""
    from dpmjax.methods.adaptation import noised
    from dpmjax.parameterization import to_x0

    _, teacher = digits_teacher
    _, ds_state, history = _run("domainstudio", teacher, 12, method__pair_weight=50.0)
    assert history[0]["sim"] == pytest.approx(0.0, abs=1e-6) and history[0]["hf_sim"] == pytest.approx(0.0, abs=1e-6)
    assert history[0]["hf_mse"] > 0 and all(np.isfinite(h["loss"]) for h in history)
    _, ft_state, _ = _run("full_finetune", teacher, 12)
    apply_fn, schedule, prediction = teacher.apply_fn(), teacher.schedule, teacher.prediction
    batch = {"image": jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (16, 8, 8, 1)), jnp.float32)}
    kls = {}
    for name, params in (("domainstudio", ds_state.params), ("full_finetune", ft_state.params)):
        values = []
        for seed in range(4):
            x_t, t, _ = noised(batch, jax.random.key(100 + seed), schedule, prediction)
            x0 = lambda p: to_x0(apply_fn(p, x_t, t), x_t, t, schedule, prediction)  # noqa: E731
            values.append(float(domainstudio.relative_distance_kl(x0(teacher.params), x0(params))))
        kls[name] = np.mean(values)
    assert kls["domainstudio"] < 0.5 * kls["full_finetune"], kls


def test_finetune_cli_then_sample_the_output(digits_teacher, tmp_path):
    from dpmjax.main import main

    teacher_dir, _ = digits_teacher
    out = str(tmp_path / "ds")
    config = os.path.join(configs_dir(), "methods", "domainstudio.py") + ":runlocal"
    assert main(["finetune", "--method", "domainstudio", "--teacher", teacher_dir, "--workdir", out,
                 "--num-devices", "1", "--config", config]) == 0
    lines = open(os.path.join(out, "metrics.jsonl")).read().splitlines()
    assert len(lines) == 2 and all('"hf_mse"' in line for line in lines)
    assert main(["sample", "--workdir", out, "--num", "4", "--batch-size", "4"]) == 0


def _folder_of(tmp_path, count):
    from dpmjax.data.few_shot import few_shot_target, write_image_folder

    root = str(tmp_path / f"target{count}")
    write_image_folder(few_shot_target("digits", "invert", 10).shots[:count], root)
    return f"folder:{root}"


@pytest.mark.parametrize("override, message", [
    ({"method__pair_weight": -1.0}, "pair_weight"),
    ({"method__sim_size": 1}, "sim_size"),
    ({"method__lambda_sim": 1.0}, "unknown domainstudio settings"),
    ({"data__shots": 2}, "batch_size=4 is larger than config.data.shots=2"),
    ({"data__name": "folder"}, "fewer than config.data.shots=10"),
])
def test_bad_settings_fail_before_compiling(digits_teacher, tmp_path, override, message):
    import dpmjax.methods

    _, teacher = digits_teacher
    if override.get("data__name") == "folder":
        override = {"data__name": _folder_of(tmp_path, 3), "data__kwargs": {"channels": 1}}
    config = method_config("domainstudio", **override)
    with pytest.raises(ValueError, match=message):
        dpmjax.methods.finetune("domainstudio", teacher, config, str(tmp_path / "out"), num_devices=1)
    assert not os.path.exists(tmp_path / "out" / "checkpoints") or not os.listdir(tmp_path / "out" / "checkpoints")


def test_the_accelerator_config_takes_the_converted_ddpm_cifar10_teacher(tmp_path):
    """configs/methods/domainstudio_cifar10.py validates on a folder of 10 RGB 32x32 targets, builds and traces one
    update (shapes only) on a teacher with google/ddpm-cifar10-32's layout; ``baseline`` is plain finetuning."""
    from tiny_configs import ddpm_cifar10_teacher

    from dpmjax.data.few_shot import write_image_folder
    from dpmjax.methods import get_method

    root = str(tmp_path / "cifar_targets")
    write_image_folder(np.random.default_rng(0).uniform(-1, 1, (10, 32, 32, 3)), root)
    teacher = ddpm_cifar10_teacher()
    for variant, method in ((f"target=folder:{root}", "domainstudio"), (f"target=folder:{root},baseline", "full_finetune")):
        config = load_config(os.path.join(configs_dir(), "methods", "domainstudio_cifar10.py") + ":" + variant)
        assert config.method.name == method
        get_method(method).validate(config, teacher)
        program = get_method(method).build(config, teacher)
        state = jax.eval_shape(program.init, program.frozen, jax.random.key(0))
        batch = {"image": jax.ShapeDtypeStruct((10, 32, 32, 3), jnp.float32),
                 "label": jax.ShapeDtypeStruct((10,), jnp.int32)}
        new, scalars = jax.eval_shape(program.update, state, batch, program.frozen, jax.random.key(1))
        assert jax.tree.map(lambda s: s.shape, new) == jax.tree.map(lambda s: s.shape, state)
        assert scalars["loss"].shape == ()
