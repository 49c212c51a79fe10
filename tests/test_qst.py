"""QST (dpmjax/nn/quantize.py, dpmjax/nn/side.py, dpmjax/methods/qst.py): the NF4 codebook and its error bounds,
packed storage, the gated side network against an explicit oracle, no gradient into the backbone, the CLI run
sampled by ``dpmjax sample``, unsupported layers / kinds and bad settings refused before compiling."""
import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from dpmjax.config import configs_dir, load_config
from dpmjax.nn import quantize as nf4
from dpmjax.nn import side as side_lib


def qst_config(variant="runlocal", **overrides):
    config = load_config(os.path.join(configs_dir(), "methods", "qst.py") + ":" + variant)
    with config.unlocked():
        for field, value in overrides.items():
            config.method[field] = value
    return config


def test_nf4_levels_are_qlora_normal_quantiles_and_round_trip_exactly():
    """NF4_LEVELS equal QLoRA's construction (normal quantiles, bitsandbytes create_normal_map) to float32
    precision, have an exact zero and +-1; a block made of absmax * levels gets those levels' codes back and
    dequantises exactly without double quantisation; the codes are packed two per byte."""
    pytest.importorskip("scipy")
    np.testing.assert_allclose(nf4.NF4_LEVELS, nf4.nf4_levels_from_normal(), atol=2e-7)
    assert len(nf4.NF4_LEVELS) == 16 and nf4.NF4_LEVELS[7] == 0.0 and nf4.NF4_LEVELS[[0, -1]].tolist() == [-1, 1]
    assert len(np.unique(nf4.DYNAMIC_MAP)) == 256 and nf4.DYNAMIC_MAP.max() == 1.0
    codes = np.arange(128) % 16
    absmax = np.array([0.5, 3.0], np.float32)
    w = (nf4.NF4_LEVELS[codes].reshape(2, 64) * absmax[:, None]).reshape(8, 16)
    q = nf4.quantize_nf4(jnp.asarray(w), double_quant=False)
    assert q.codes.dtype == jnp.uint8 and q.codes.shape == (64,)
    unpacked = np.stack([np.asarray(q.codes) & 15, np.asarray(q.codes) >> 4], -1).reshape(-1)
    np.testing.assert_array_equal(unpacked, codes)
    np.testing.assert_array_equal(np.asarray(nf4.dequantize_nf4(q)), w)


def test_dequantisation_error_is_within_the_theoretical_bounds():
    """For Gaussian weights (n not a multiple of 64: a padded last block): |w - w_hat| <= absmax * max half gap of
    the NF4 levels without DQ; with DQ each block's absmax is off by at most the dynamic map's half gap times the
    second-level scale, and |w - w_hat| <= absmax * half_gap_nf4 + |absmax - absmax_hat|. Packed storage costs
    4 + 8/64 + 32/(64 * 256) bits per weight (QLoRA's 4.127) plus the padding and the 4-byte mean."""
    w = jax.random.normal(jax.random.key(0), (3, 3, 64, 130), jnp.float32) * 0.05
    n = w.size
    flat = np.pad(np.asarray(w).reshape(-1), (0, -n % 64)).reshape(-1, 64)
    absmax = np.abs(flat).max(1)
    half_gap = np.max(np.diff(nf4.NF4_LEVELS)) / 2
    plain = nf4.quantize_nf4(w, double_quant=False)
    err = np.abs(np.pad(np.asarray(w - nf4.dequantize_nf4(plain)).reshape(-1), (0, -n % 64)).reshape(-1, 64))
    assert np.all(err <= absmax[:, None] * half_gap * (1 + 1e-6))
    q = jax.jit(nf4.quantize_nf4)(w)
    absmax_hat = np.asarray(nf4.block_absmax(q))
    second = np.repeat(np.asarray(q.scale_absmax), 256)[:len(absmax)]
    dq_half_gap = np.max(np.diff(nf4.DYNAMIC_MAP)) / 2
    assert np.all(np.abs(absmax - absmax_hat) <= second * dq_half_gap + 1e-7)
    err = np.abs(np.pad(np.asarray(w - nf4.dequantize_nf4(q)).reshape(-1), (0, -n % 64)).reshape(-1, 64))
    assert np.all(err <= (absmax * half_gap + np.abs(absmax - absmax_hat))[:, None] + 1e-7)
    assert 0.01 < float(np.sqrt(np.mean(err ** 2)) / np.std(np.asarray(w))) < 0.15  # ~9% relative RMS for N(0, 1)
    bits = q.nbytes * 8 / n
    expected = (np.ceil(n / 64) * 32 + np.ceil(n / 64) + 4 * np.ceil(n / 64 / 256) + 4) * 8 / n
    assert bits == pytest.approx(expected) and 4.12 < bits < 4.14


@pytest.mark.parametrize("targets, message", [
    (["down_0_0/norm_in/scale"], "normalisation scale.*unsupported layer"),
    (["conv_in/bias"], "a bias.*unsupported layer"),
    (["nothing_here"], "matches no parameter"),
])
def test_quantising_an_unsupported_layer_is_refused_naming_it(digits_teacher, targets, message):
    with pytest.raises(ValueError, match=message):
        nf4.quantize_plan(digits_teacher[1].params, targets)


def _head_oracle(params, h):
    """The tiny UNet's output head on h: conv_out(SiLU(GroupNorm(h))) with its frozen params (num_groups 4)."""
    norm = nn.GroupNorm(num_groups=4, epsilon=1e-5)
    conv = nn.Conv(1, (3, 3))
    h = nn.silu(norm.apply({"params": params["norm_out"]}, h))
    return conv.apply({"params": params["conv_out"]}, h)


def test_the_gated_side_network_matches_its_equations(digits_teacher):
    """At init (up = 0) the QST network is the teacher on its dequantised weights (the head's GroupNorm removes the
    gate's scale sigmoid(0.5)); with random side params the head's input is (1 - s(z)) up(h_side) + s(z) h_L and
    the output is the frozen head applied to it."""
    from dpmjax.methods import qst

    _, teacher = digits_teacher
    config = qst_config()
    program = qst.METHOD.build(config, teacher)
    side = jax.jit(program.init)(program.frozen, jax.random.key(0)).params
    assert side["out"]["gate"].shape == (16,) and np.allclose(side["out"]["gate"], 0.5)
    assert not np.any(np.asarray(side["out"]["up"]["kernel"]))
    backbone = nf4.dequantize_tree(program.frozen["backbone"])
    x = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))
    t = jnp.array([100.0, 500.0, 900.0])
    apply = jax.jit(lambda side, backbone, x, t: side_lib.qst_apply(teacher.model, backbone, side, x, t,
                                                                    return_parts=True))
    out, parts = apply(side, backbone, x, t)
    np.testing.assert_allclose(np.asarray(out), np.asarray(teacher.model.apply(backbone, x, t)), atol=1e-4)
    rng = np.random.default_rng(0)
    side = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float32), side)
    out, parts = apply(side, backbone, x, t)
    gate = jax.nn.sigmoid(side["out"]["gate"])
    up = parts["h_side"] @ side["out"]["up"]["kernel"] + side["out"]["up"]["bias"]
    np.testing.assert_allclose(np.asarray(parts["h_head"]), np.asarray((1 - gate) * up + gate * parts["h_L"]),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out), np.asarray(_head_oracle(backbone["params"], parts["h_head"])),
                               rtol=1e-4, atol=1e-4)


def test_the_backbone_gets_no_gradient_and_an_update_moves_only_the_side_network(digits_teacher):
    """jax.grad of the loss w.r.t. the dequantised backbone weights is exactly zero (they pass through
    stop_gradient); the state holds the side network only; the frozen backbone is NF4 (kernels in ~4.1 bits)."""
    from dpmjax.methods import qst
    from dpmjax.nn import network_time

    _, teacher = digits_teacher
    program = qst.METHOD.build(qst_config(), teacher)
    frozen = program.frozen["backbone"]
    quantised = [x for x in jax.tree.leaves(frozen, is_leaf=lambda x: isinstance(x, nf4.NF4Tensor))
                 if isinstance(x, nf4.NF4Tensor)]
    kernels = [k for k in traverse_util.flatten_dict(teacher.params) if k[-1] == "kernel"]
    assert len(quantised) == len(kernels)
    assert nf4.tree_nbytes(frozen) < 0.2 * nf4.tree_nbytes(teacher.params)
    state = jax.jit(program.init)(program.frozen, jax.random.key(0))
    batch = {"image": jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 8, 8, 1)), jnp.float32),
             "label": jnp.zeros((4,), jnp.int32)}
    x_t, t = batch["image"], jnp.full((4,), 0.5)

    def loss(side, backbone):
        return jnp.mean(side_lib.qst_apply(teacher.model, backbone, side, x_t, network_time(teacher.schedule, t)) ** 2)

    side_grads, backbone_grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(state.params,
                                                                         nf4.dequantize_tree(frozen))
    assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(backbone_grads))
    assert any(np.any(np.asarray(g)) for g in jax.tree.leaves(side_grads))
    new, scalars = jax.jit(program.update)(state, batch, program.frozen, jax.random.key(1))
    assert np.isfinite(float(scalars["loss"])) and float(scalars["grad_norm"]) > 0
    assert jax.tree.structure(new.params) == jax.tree.structure(state.params)
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(state.params)))


def test_finetune_cli_then_sample_the_qst_model(digits_teacher, tmp_path):
    """``dpmjax finetune --method qst`` writes model kind "qst" (backbone kind unet); ``load_params`` rebuilds the
    NF4 backbone from the teacher and ``dpmjax sample`` runs the side network beside it."""
    from dpmjax.main import main
    from dpmjax.workdir import load_params

    teacher_dir, teacher = digits_teacher
    out = str(tmp_path / "qst")
    config = os.path.join(configs_dir(), "methods", "qst.py") + ":runlocal"
    assert main(["finetune", "--method", "qst", "--teacher", teacher_dir, "--workdir", out, "--num-devices", "1",
                 "--config", config]) == 0
    model, variables, _, saved = load_params(out)
    assert saved.model.kind == "qst" and saved.model.backbone_kind == "unet" and saved.model.qst_reduction == 4
    assert isinstance(model, side_lib.QSTModel)
    assert set(variables["params"]) == {"backbone", "side"}
    assert jax.tree.map(np.shape, variables["params"]["backbone"]) == jax.tree.map(np.shape, teacher.params["params"])
    assert main(["sample", "--workdir", out, "--num", "4", "--batch-size", "4"]) == 0


@pytest.mark.parametrize("override, message", [
    ({"quantize": ("down_0_0/norm_in/scale",)}, "config.method.quantize.*unsupported layer"),
    ({"quantize": ("label_embed",)}, "config.method.quantize.*matches no parameter"),
    ({"reduction": 32}, "config.method.reduction"),
    ({"reduction": 0}, "config.method.reduction"),
    ({"gate_init": float("nan")}, "config.method.gate_init"),
    ({"adapter_dim": 0}, "config.method.adapter_dim"),
    ({"rank": 4}, "unknown qst settings"),
])
def test_bad_settings_fail_before_compiling(digits_teacher, tmp_path, override, message):
    import dpmjax.methods

    _, teacher = digits_teacher
    with pytest.raises(ValueError, match=message):
        dpmjax.methods.finetune("qst", teacher, qst_config(**override), str(tmp_path / "out"), num_devices=1)
    assert not os.path.exists(tmp_path / "out")


def test_an_unsupported_model_kind_is_refused(digits_teacher):
    """A network QST cannot read (here a classifier posing as a teacher) is refused by validate, naming the kinds."""
    import ml_collections

    from dpmjax.methods import qst
    from dpmjax.nn import Classifier

    _, teacher = digits_teacher
    config = ml_collections.ConfigDict(teacher.config.to_dict())
    config.model.kind = "classifier"
    fake = dataclasses.replace(teacher, model=Classifier(), config=config)
    with pytest.raises(ValueError, match="qst reads the blocks of model kinds"):
        qst.METHOD.validate(qst_config(), fake)


def test_a_dit_teacher_and_the_accelerator_config_trace_with_shapes_only(tmp_path):
    """The DiT (each block's tokens feed the side MLP blocks) and configs/methods/qst_cifar10.py on
    google/ddpm-cifar10-32's layout (diffusers resnets, d / 16 side widths) validate, build and trace one update."""
    from tiny_configs import ddpm_cifar10_teacher, tiny_dit_config

    from dpmjax.data.few_shot import write_image_folder
    from dpmjax.methods import Teacher, get_method
    from dpmjax.nn import build_model
    from dpmjax.schedules import schedule_from_config

    dit_config = tiny_dit_config(num_steps=1, checkpoint_every=1)
    model = build_model(dit_config.model)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,))))
    dit = Teacher(model, params, schedule_from_config(dit_config.schedule), dit_config)
    root = str(tmp_path / "cifar_targets")
    write_image_folder(np.random.default_rng(0).uniform(-1, 1, (10, 32, 32, 3)), root)
    cases = [(dit, qst_config(reduction=8), (4, 8, 8, 1), 8),  # 64 / 8 = 8-wide side tokens
             (ddpm_cifar10_teacher(), load_config(os.path.join(configs_dir(), "methods", "qst_cifar10.py")
                                                  + f":target=folder:{root}"), (10, 32, 32, 3), 8)]
    for teacher, config, shape, first_width in cases:
        method = get_method("qst")
        method.validate(config, teacher)
        program = method.build(config, teacher)
        state = jax.eval_shape(program.init, program.frozen, jax.random.key(0))
        assert state.params["block_00"]["gate"].shape == (first_width,)
        batch = {"image": jax.ShapeDtypeStruct(shape, jnp.float32), "label": jax.ShapeDtypeStruct(shape[:1], jnp.int32)}
        new, scalars = jax.eval_shape(program.update, state, batch, program.frozen, jax.random.key(1))
        assert jax.tree.map(lambda s: s.shape, new) == jax.tree.map(lambda s: s.shape, state)
        assert scalars["loss"].shape == ()
