"""LoRA (dpmjax/nn/lora.py, dpmjax/methods/lora.py): B = 0 merges to the teacher, gradients by the chain rule,
targets and ranks checked, the CLI run samples with ``dpmjax sample``, bad settings refused before compiling."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from dpmjax.config import configs_dir, load_config
from dpmjax.nn import lora


def lora_config(variant="runlocal", **overrides):
    config = load_config(os.path.join(configs_dir(), "methods", "lora.py") + ":" + variant)
    with config.unlocked():
        for field, value in overrides.items():
            config.method[field] = value
    return config


def flat(tree):
    return traverse_util.flatten_dict(tree)


def test_default_targets_pick_the_block_kernels_and_b_zero_merges_to_the_teacher(digits_teacher):
    """"blocks" on the tiny UNet: the ResBlocks' conv_in / conv_out / skip kernels, not the stem, head, resamplers or
    timestep projections; A [r, in], B [r, out] = 0, so merge_lora returns the teacher's weights exactly."""
    _, teacher = digits_teacher
    adapters = lora.init_lora(teacher.params, jax.random.key(0), 2)
    paths = {"/".join(k[:-1]) for k in flat(adapters)}
    assert paths and all(p.endswith("/kernel") for p in paths)
    names = {p.split("/")[-2] for p in paths}
    assert names <= {"conv_in", "conv_out", "skip"}
    assert "params/conv_in/kernel" not in paths and "params/conv_out/kernel" not in paths
    assert not any("emb_proj" in p or "time_embed" in p or "_sample" in p for p in paths)
    kernel = flat(teacher.params)[("params", "down_0_0", "conv_in", "kernel")]          # [3, 3, 16, 16]
    adapter = adapters["params"]["down_0_0"]["conv_in"]["kernel"]
    assert adapter["a"].shape == (2, 9 * kernel.shape[2]) and adapter["b"].shape == (2, kernel.shape[3])
    assert not np.any(np.asarray(adapter["b"]))
    merged = lora.merge_lora(teacher.params, adapters, alpha=2.0, rank=2)
    for key, value in flat(teacher.params).items():
        np.testing.assert_array_equal(np.asarray(flat(merged)[key]), np.asarray(value))


def test_merge_and_its_gradient_follow_the_chain_rule(x64):
    """W = W0 + (alpha / r) A^T B for a Dense [5, 3] and a Conv [3, 3, 2, 4] kernel: the merged values equal the
    explicit matrix formula, and jax.grad of a loss through merge_lora w.r.t. (A, B) equals the chain rule
    dL/dA = s B G^T, dL/dB = s A G with G = dL/dW as an (in x out) matrix and s = alpha / r."""
    rng = np.random.default_rng(0)
    params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(5, 3))), "bias": jnp.zeros(3)},
              "conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 4)))}}
    adapters = lora.init_lora(params, jax.random.key(0), 2, targets=["kernel$"])
    adapters = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape)), adapters)  # B != 0
    alpha, rank = 3.0, 2
    weights = {name: jnp.asarray(rng.normal(size=params[name]["kernel"].shape)) for name in ("dense", "conv")}

    def loss(adapters):
        merged = lora.merge_lora(params, adapters, alpha, rank)
        return sum(jnp.sum(jnp.sin(merged[n]["kernel"]) * weights[n]) for n in ("dense", "conv"))

    grads = jax.grad(loss)(adapters)
    merged = lora.merge_lora(params, adapters, alpha, rank)
    s = alpha / rank
    for name in ("dense", "conv"):
        w0 = np.asarray(params[name]["kernel"])
        a, b = (np.asarray(adapters[name]["kernel"][k]) for k in ("a", "b"))
        expected = w0 + s * (a.T @ b).reshape(w0.shape)
        np.testing.assert_allclose(np.asarray(merged[name]["kernel"]), expected, rtol=1e-12)
        g = (np.cos(expected) * np.asarray(weights[name])).reshape(-1, w0.shape[-1])    # dL/dW [in, out]
        np.testing.assert_allclose(np.asarray(grads[name]["kernel"]["a"]), s * b @ g.T, rtol=1e-10)
        np.testing.assert_allclose(np.asarray(grads[name]["kernel"]["b"]), s * a @ g, rtol=1e-10)
    np.testing.assert_array_equal(np.asarray(merged["dense"]["bias"]), 0.0)


@pytest.mark.parametrize("kwargs, message", [
    ({"rank": 0}, "rank must be an integer >= 1"),
    ({"rank": 17}, r"rank 17 exceeds min\(in, out\)"),
    ({"rank": 2, "targets": ["attn/qkv/kernel$"]}, "'attn/qkv/kernel\\$' matches no parameter"),
    ({"rank": 2, "targets": ["down_0_0/conv_in/bias"]}, "not a Dense or Conv kernel"),
    ({"rank": 2, "targets": ["(unclosed"]}, "not a regular expression"),
])
def test_bad_targets_and_ranks_are_refused_naming_them(digits_teacher, kwargs, message):
    _, teacher = digits_teacher
    with pytest.raises(ValueError, match=message):
        lora.init_lora(teacher.params, jax.random.key(0), **kwargs)


def test_an_update_trains_only_the_adapters(digits_teacher):
    """The method state holds adapters only (its optimizer too); one update moves B off zero, and the merged
    student differs from the teacher only at the adapted kernels."""
    from dpmjax.methods import get_method

    _, teacher = digits_teacher
    config = lora_config(rank=2)
    method = get_method("lora")
    method.validate(config, teacher)
    program = method.build(config, teacher)
    assert program.student_reads_frozen
    state = jax.jit(program.init)(program.frozen, jax.random.key(0))
    assert all(k[-1] in ("a", "b") for k in flat(state.params))
    batch = {"image": jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 8, 8, 1)), jnp.float32),
             "label": jnp.zeros((4,), jnp.int32)}
    new, scalars = jax.jit(program.update)(state, batch, program.frozen, jax.random.key(1))
    assert np.isfinite(float(scalars["loss"])) and float(scalars["grad_norm"]) > 0
    assert any(np.any(np.asarray(v)) for k, v in flat(new.params).items() if k[-1] == "b")
    student = flat(program.student(new, False, program.frozen))
    adapted = {k[:-1] for k in flat(state.params)}
    for key, value in flat(teacher.params).items():
        same = np.array_equal(np.asarray(student[key]), np.asarray(value))
        assert same == (key not in adapted), key


def test_finetune_cli_then_sample_the_merged_model(digits_teacher, tmp_path):
    """``dpmjax finetune --method lora`` writes a workdir whose checkpoint is the adapters; ``load_params`` merges
    them into the teacher (the model section is the teacher's) and ``dpmjax sample`` runs on it."""
    from dpmjax.main import main
    from dpmjax.workdir import load_params

    teacher_dir, teacher = digits_teacher
    out = str(tmp_path / "lora")
    config = os.path.join(configs_dir(), "methods", "lora.py") + ":runlocal,rank=2"
    assert main(["finetune", "--method", "lora", "--teacher", teacher_dir, "--workdir", out, "--num-devices", "1",
                 "--config", config]) == 0
    model, params, _, saved = load_params(out)
    assert saved.model.kind == "unet" and saved.method.rank == 2
    assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, teacher.params)
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(teacher.params)))
    assert main(["sample", "--workdir", out, "--num", "4", "--batch-size", "4"]) == 0


@pytest.mark.parametrize("override, message", [
    ({"rank": 0}, "config.method.rank"),
    ({"rank": 100}, "exceeds min"),
    ({"alpha": -1.0}, "config.method.alpha"),
    ({"targets": ["_attn/qkv/kernel$"]}, "matches no parameter"),
    ({"targets": ["norm_in/scale"]}, "not a Dense or Conv kernel"),
    ({"dropout": 0.1}, "unknown lora settings"),
])
def test_bad_settings_fail_before_compiling(digits_teacher, tmp_path, override, message):
    import dpmjax.methods

    _, teacher = digits_teacher
    with pytest.raises(ValueError, match=message):
        dpmjax.methods.finetune("lora", teacher, lora_config(**override), str(tmp_path / "out"), num_devices=1)
    assert not os.path.exists(tmp_path / "out")


def test_the_accelerator_config_takes_the_converted_ddpm_cifar10_teacher(tmp_path, monkeypatch):
    """configs/methods/qst_cifar10.py:lora validates on a folder of 10 RGB 32x32 targets, builds and traces one update
    (shapes only) on google/ddpm-cifar10-32's layout: adapters on the resnets' convs and the attention projections."""
    from tiny_configs import ddpm_cifar10_teacher

    from dpmjax.data.few_shot import write_image_folder
    from dpmjax.methods import get_method

    root = str(tmp_path / "cifar_targets")
    write_image_folder(np.random.default_rng(0).uniform(-1, 1, (10, 32, 32, 3)), root)
    teacher = ddpm_cifar10_teacher()
    config = load_config(os.path.join(configs_dir(), "methods", "qst_cifar10.py") + f":lora,target=folder:{root}")
    assert config.method.name == "lora"
    get_method("lora").validate(config, teacher)
    program = get_method("lora").build(config, teacher)
    state = jax.eval_shape(program.init, program.frozen, jax.random.key(0))
    paths = {"/".join(k[:-1]) for k in flat(state.params)}
    assert any("attentions_0/to_q" in p for p in paths) and any("resnets_0/conv1" in p for p in paths)
    batch = {"image": jax.ShapeDtypeStruct((10, 32, 32, 3), jnp.float32), "label": jax.ShapeDtypeStruct((10,), jnp.int32)}
    new, scalars = jax.eval_shape(program.update, state, batch, program.frozen, jax.random.key(1))
    assert jax.tree.map(lambda s: s.shape, new) == jax.tree.map(lambda s: s.shape, state)
    assert scalars["loss"].shape == ()


def test_default_targets_on_a_dit_are_its_attention_and_mlp_kernels():
    """"blocks" on the DiT (shapes only): qkv, proj, mlp_in, mlp_out of every block -- not the patch embedding,
    the adaLN modulations, the timestep MLP or the final layer; rank above a kernel's min(in, out) is refused."""
    from tiny_configs import tiny_dit_config

    from dpmjax.nn import build_model

    model = build_model(tiny_dit_config(num_steps=1, checkpoint_every=1).model)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,))))
    chosen = lora.lora_targets(params, ("blocks",))
    assert {"/".join(k[1:]) for k in chosen} == {f"block_0/{n}/kernel" for n in ("qkv", "proj", "mlp_in", "mlp_out")}
    with pytest.raises(ValueError, match="rank 65 exceeds"):
        lora.check_lora(params, 65)
