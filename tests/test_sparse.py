"""SquareHead sparse finetuning (dpmjax/methods/sparse.py): the cubic schedule against Zhu & Gupta's formula, exact
per-tensor sparsity of the magnitude masks, pruned weights staying exactly 0 through updates, the SquareHead term
(0 at init, a hand-computed normalised MSE), the CLI run then ``dpmjax sample``, the bad settings, and the
accelerator config traced with shapes only."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpmjax.config import configs_dir, load_config
from dpmjax.methods import sparse


def method_config(variant="runlocal", **overrides):
    config = load_config(os.path.join(configs_dir(), "methods", "sparse.py") + ":" + variant)
    with config.unlocked():
        for dotted, value in overrides.items():
            section, field = dotted.split("__")
            config[section][field] = value
    return config


def test_cubic_schedule_equals_zhu_gupta_formula():
    s_i, s_f, t0, end = 0.1, 0.9, 10, 50
    for t in [0, 10, 11, 20, 33, 49, 50, 80]:
        u = min(max((t - t0) / (end - t0), 0.0), 1.0)
        expected = s_f + (s_i - s_f) * (1 - u) ** 3
        value = float(sparse.cubic_sparsity(t, final=s_f, initial=s_i, start=t0, end=end))
        assert value == pytest.approx(expected, abs=1e-6), t
    assert float(sparse.cubic_sparsity(5, final=0.75, start=5, end=5)) == pytest.approx(0.75)  # one-shot
    assert float(sparse.cubic_sparsity(4, final=0.75, start=5, end=5)) == pytest.approx(0.0)
    steps = [t for t in range(60) if bool(sparse.is_pruning_step(t, start=10, end=45, every=10))]
    assert steps == [10, 20, 30, 40, 45]


@pytest.mark.parametrize("scope", ["per_tensor", "global"])
def test_magnitude_masks_have_exact_sparsity_and_keep_the_largest_weights(scope):
    rng = np.random.default_rng(0)
    params = {"params": {"dense": {"kernel": jnp.asarray(rng.normal(size=(12, 10)), jnp.float32),
                                   "bias": jnp.asarray(rng.normal(size=(10,)), jnp.float32)},
                         "conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 4, 6)), jnp.float32)},
                         "norm": {"scale": jnp.ones((6,), jnp.float32)}}}
    for s in (0.5, 0.75, 0.9):
        masks = sparse.magnitude_masks(params, s, scope)
        pruned = sparse.apply_masks(params, masks)
        assert masks["params"]["dense"]["bias"].shape == () and bool(masks["params"]["norm"]["scale"])
        np.testing.assert_array_equal(pruned["params"]["dense"]["bias"], params["params"]["dense"]["bias"])
        kernels = [params["params"]["dense"]["kernel"], params["params"]["conv"]["kernel"]]
        kept = [masks["params"]["dense"]["kernel"], masks["params"]["conv"]["kernel"]]
        if scope == "per_tensor":
            for w, m in zip(kernels, kept):
                assert int(np.sum(~np.asarray(m))) == round(s * w.size)
                assert np.min(np.abs(w)[np.asarray(m)]) >= np.max(np.abs(w)[~np.asarray(m)])
        else:
            flat = np.concatenate([np.abs(np.asarray(w)).ravel() for w in kernels])
            mask = np.concatenate([np.asarray(m).ravel() for m in kept])
            assert int(np.sum(~mask)) == round(s * flat.size)
            assert np.min(flat[mask]) >= np.max(flat[~mask])
        zeros = round(s * 120) + round(s * 216) if scope == "per_tensor" else round(s * 336)
        assert sparse.sparsity_of(pruned)["total"] == pytest.approx(zeros / 336)


def test_pruned_weights_stay_exactly_zero_through_updates():
    """gradual_pruning(adam): sparsity follows the schedule at pruning steps; between them and after the ramp
    the masked entries stay exactly 0 although Adam's updates would move them."""
    import optax

    from dpmjax.train.optim import optimizer_step

    rng = np.random.default_rng(1)
    params = {"w": {"kernel": jnp.asarray(rng.normal(size=(20, 20)), jnp.float32)},
              "b": {"bias": jnp.zeros((20,), jnp.float32)}}
    tx = sparse.gradual_pruning(optax.adam(1e-2), final=0.75, start=2, end=8, every=3)
    state = tx.init(params)

    @jax.jit
    def step(params, state, key):
        grads = jax.tree.map(lambda p: jax.random.normal(key, p.shape), params)
        return optimizer_step(tx, grads, state, params)  # Adam's bias correction under standard promotion

    previous_zeros = np.zeros((20, 20), bool)
    for t in range(14):
        params, state = step(params, state, jax.random.key(t))
        w = np.asarray(params["w"]["kernel"])
        zeros = w == 0
        last = max([p for p in (2, 5, 8) if p <= t], default=None)  # the pruning updates; others keep the masks
        expected = 0 if last is None else round(float(sparse.cubic_sparsity(last, final=0.75, start=2, end=8)) * 400)
        assert zeros.sum() == expected, (t, zeros.sum(), expected)
        assert np.all(zeros[previous_zeros])  # once pruned, exactly zero for good
        np.testing.assert_array_equal(zeros, ~np.asarray(state.masks["w"]["kernel"]))
        previous_zeros = zeros
        if t == 6:
            assert 0 < zeros.sum() < 300
    assert zeros.sum() == 300 and np.all(np.asarray(params["b"]["bias"]) != 0)


def test_squarehead_equals_a_hand_computed_normalised_mse():
    rng = np.random.default_rng(2)
    s = [jnp.asarray(rng.normal(size=(2, 4, 4, 3)), jnp.float32), jnp.asarray(rng.normal(size=(2, 5)), jnp.float32)]
    t = [jnp.asarray(rng.normal(size=(2, 4, 4, 3)) * 3, jnp.float32), jnp.asarray(rng.normal(size=(2, 5)), jnp.float32)]
    oracle = sum(np.mean((np.asarray(a) - np.asarray(b)) ** 2) / (np.mean(np.asarray(b) ** 2) + 1e-6)
                 for a, b in zip(s, t))
    assert float(sparse.squarehead_loss(s, t)) == pytest.approx(oracle, rel=1e-5)
    assert float(sparse.squarehead_loss(t, t)) == 0.0


def test_the_update_starts_at_the_teacher_and_prunes_the_unet(digits_teacher):
    """At init (student = teacher) the output and SquareHead terms are 0 and there are 4 ResBlock features; after
    the runlocal run (8 updates, ramp to 0.5 by update 6) every kernel has exactly half its entries at 0."""
    from dpmjax.methods import get_method
    from dpmjax.nn import network_time
    _, teacher = digits_teacher
    config = method_config("runlocal,sparsity=0.5,distill=squarehead")
    get_method("sparse").validate(config, teacher)
    program = get_method("sparse").build(config, teacher)
    state = program.init(program.frozen, jax.random.key(0))
    images = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, (8,) + teacher.image_shape), jnp.float32)
    batch = {"image": images, "label": jnp.zeros((8,), jnp.int32)}
    x = images
    t = jnp.full((8,), 0.5, jnp.float32)
    _, feats = sparse.block_features(teacher.model, teacher.params, x, network_time(teacher.schedule, t))
    assert len(feats) >= 2
    update = jax.jit(program.update)
    for step in range(8):
        state, scalars = update(state, batch, program.frozen, jax.random.key(step + 1))
        if step == 0:  # the update's loss is evaluated at the teacher's weights
            assert float(scalars["squarehead"]) == pytest.approx(0.0, abs=1e-7)
            assert float(scalars["output_mse"]) == pytest.approx(0.0, abs=1e-10)
            assert float(scalars["denoise"]) > 0
    student = program.student(state, use_ema=False)
    kernels = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(student)[0] if sparse.prunable(path, leaf)]
    assert len(kernels) >= 8
    for kernel in kernels:
        assert int(np.sum(np.asarray(kernel) == 0)) == round(0.5 * kernel.size)
    others = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(student)[0] if not sparse.prunable(path, leaf)]
    assert all(np.mean(np.asarray(leaf) == 0) < 0.5 for leaf in others if leaf.size > 8)  # biases/norms not pruned
    assert float(scalars["sparsity"]) == pytest.approx(sparse.sparsity_of(student)["total"], abs=1e-6)
    # an update without pruning keeps the zeros
    zeros = jax.tree.map(lambda p: np.asarray(p) == 0, student)
    state, _ = update(state, batch, program.frozen, jax.random.key(99))
    after = jax.tree.map(lambda p: np.asarray(p) == 0, program.student(state, use_ema=False))
    assert all(np.all(b[a]) for a, b in zip(jax.tree.leaves(zeros), jax.tree.leaves(after)))


def test_finetune_cli_then_sample_the_output(digits_teacher, tmp_path):
    from dpmjax.main import main
    from dpmjax.workdir import load_params

    teacher_dir, _ = digits_teacher
    out = str(tmp_path / "sparse")
    config = os.path.join(configs_dir(), "methods", "sparse.py") + ":runlocal,sparsity=0.75"
    assert main(["finetune", "--method", "sparse", "--teacher", teacher_dir, "--workdir", out,
                 "--num-devices", "1", "--config", config]) == 0
    lines = open(os.path.join(out, "metrics.jsonl")).read().splitlines()
    assert len(lines) == 2 and all('"squarehead"' in line for line in lines)
    _, saved, _, _ = load_params(out)  # the saved student is the masked one (ramp to 0.75 ended at update 6)
    for path, leaf in jax.tree_util.tree_flatten_with_path(saved)[0]:
        if sparse.prunable(path, leaf):
            assert int(np.sum(np.asarray(leaf) == 0)) == round(0.75 * leaf.size), jax.tree_util.keystr(path)
    assert main(["sample", "--workdir", out, "--num", "4", "--batch-size", "4"]) == 0


@pytest.mark.parametrize("override, message", [
    ({"method__sparsity": 1.0}, "config.method.sparsity"),
    ({"method__sparsity": -0.1}, "config.method.sparsity"),
    ({"method__initial_sparsity": 0.9}, "config.method.initial_sparsity"),
    ({"method__squarehead_weight": -1.0}, "config.method.squarehead_weight"),
    ({"method__output_weight": -1.0}, "config.method.output_weight"),
    ({"method__prune_end": 8}, "config.method.prune_end"),
    ({"method__prune_every": 0}, "config.method.prune_every"),
    ({"method__scope": "layer"}, "config.method.scope"),
    ({"method__lambda_sh": 1.0}, "unknown sparse settings"),
])
def test_bad_settings_fail_before_compiling(digits_teacher, tmp_path, override, message):
    import dpmjax.methods

    _, teacher = digits_teacher
    config = method_config(**override)
    with pytest.raises(ValueError, match=message):
        dpmjax.methods.finetune("sparse", teacher, config, str(tmp_path / "out"), num_devices=1)
    assert not os.path.exists(tmp_path / "out" / "checkpoints") or not os.listdir(tmp_path / "out" / "checkpoints")


def test_the_accelerator_config_takes_the_converted_ddpm_cifar10_teacher():
    """configs/methods/sparse_cifar10.py validates, builds and traces one update (shapes only) on a teacher with
    google/ddpm-cifar10-32's layout: SquareHead reads its ResnetBlock2D outputs, the masks cover its kernels."""
    from tiny_configs import ddpm_cifar10_teacher

    from dpmjax.methods import get_method

    teacher = ddpm_cifar10_teacher()
    config = load_config(os.path.join(configs_dir(), "methods", "sparse_cifar10.py") + ":sparsity=0.9")
    get_method("sparse").validate(config, teacher)
    program = get_method("sparse").build(config, teacher)
    state = jax.eval_shape(program.init, program.frozen, jax.random.key(0))
    batch = {"image": jax.ShapeDtypeStruct((4, 32, 32, 3), jnp.float32),
             "label": jax.ShapeDtypeStruct((4,), jnp.int32)}
    new, scalars = jax.eval_shape(program.update, state, batch, program.frozen, jax.random.key(1))
    assert jax.tree.map(lambda s: s.shape, new) == jax.tree.map(lambda s: s.shape, state)
    assert scalars["squarehead"].shape == () and scalars["sparsity"].shape == ()
    assert sparse.prunable_count(teacher.params) > 30e6  # most of the 35.7M parameters are kernels
