"""Tests for dpmjax.nn: shapes, bfloat16 compute, label dropout, parameter counts, sampler bridge, a train step.

XLA's CPU compiler dominates the run time here, so networks are tiny (8x8 inputs, 8-16 channels), output
shapes are checked abstractly (``jax.eval_shape``), random test parameters come from numpy instead of a
compiled ``init``, and keys that feed compiled random ops use the "rbg" implementation, which compiles far
faster than the default partitionable threefry.
"""
import math
from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dpmjax
from dpmjax.nn import (DiT, Classifier, UNet, count_params, describe, drop_labels, init_variables,
                       make_cfg_model_fn, make_model_fn, network_time)
from dpmjax.nn.dit import DiTBlock
from dpmjax.nn.layers import AttentionBlock, LabelEmbed, TimestepEmbed, timestep_embedding
from dpmjax.nn.unet import ResBlock
from dpmjax.schedules import DiscreteVP, LinearVP

NUM_CLASSES = 3
CONTEXT_DIM = 8


def rbg_key(seed):
    return jax.random.key(seed, impl="rbg")


def random_params(model, *args, seed=0, **kwargs):
    """Nonzero parameters of the right shapes without compiling ``init``: N(0, 1/fan_in) kernels, N(0, 0.1)
    vectors (so zero-initialised output layers are not zero and outputs depend on every layer)."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs))["params"]
    rng = np.random.default_rng(seed)

    def fill(leaf):
        fan_in = math.prod(leaf.shape[:-1]) if len(leaf.shape) > 1 else 10.0
        return jnp.asarray(rng.standard_normal(leaf.shape) / math.sqrt(fan_in), leaf.dtype)

    return {"params": jax.tree.map(fill, shapes)}


class CondUNet(NamedTuple):
    model: UNet
    params: dict
    inputs: dict
    apply: Callable  # jitted (params, inputs) -> output, compiled once for the module
    out: jax.Array  # the float32 output on ``inputs``


def _jitted_apply(model, **kwargs):
    fn = jax.jit(lambda p, x, t, y, c, k: model.apply(p, x, t, y=y, context=c, rngs={"dropout": k}, **kwargs))
    return lambda params, inputs, key=None: fn(params, inputs["x"], inputs["t"], inputs["y"], inputs["context"],
                                               rbg_key(0) if key is None else key)


@pytest.fixture(scope="module")
def cond_unet():
    """A class-conditional, cross-attending UNet with attention at the 4x4 level, and nonzero params."""
    model = UNet(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
                 num_heads=2, num_classes=NUM_CLASSES, context_dim=CONTEXT_DIM, num_groups=8)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 8, 8, 1)), jnp.float32)
    inputs = dict(x=x, t=jnp.asarray([10.0, 700.0]), y=jnp.asarray([0, 2]),
                  context=jnp.asarray(np.random.default_rng(2).standard_normal((2, 3, CONTEXT_DIM)), jnp.float32))
    params = random_params(model, inputs["x"], inputs["t"], y=inputs["y"], context=inputs["context"])
    apply = _jitted_apply(model)
    return CondUNet(model, params, inputs, apply, apply(params, inputs))


# ----------------------------------------------------------------------------------------------------------
# shapes

def test_unet_output_shapes():
    x = jax.ShapeDtypeStruct((2, 8, 8, 1), jnp.float32)
    t = jax.ShapeDtypeStruct((2,), jnp.float32)
    y = jax.ShapeDtypeStruct((2,), jnp.int32)
    ctx = jax.ShapeDtypeStruct((2, 5, CONTEXT_DIM), jnp.float32)
    configs = [
        (UNet(model_channels=16, num_groups=8), {}),
        (UNet(model_channels=16, attention_resolutions=(8, 4), num_head_channels=8, num_groups=8), {}),
        (UNet(model_channels=16, num_classes=NUM_CLASSES, num_groups=8), {"y": y}),
        (UNet(model_channels=16, attention_resolutions=(4,), context_dim=CONTEXT_DIM, num_groups=8),
         {"context": ctx}),
        (UNet(model_channels=16, out_channels=2, num_res_blocks=2, num_groups=8), {}),
    ]
    for model, kwargs in configs:
        variables = jax.eval_shape(model.init, jax.random.key(0), x, t, **kwargs)
        out = jax.eval_shape(model.apply, variables, x, t, **kwargs)
        assert out.shape == (2, 8, 8, model.out_channels or 1) and out.dtype == jnp.float32
    # odd sizes: 6 -> 3 -> 2 going down, nearest-resize back to the skips' sizes going up; 3 channels
    odd = jax.ShapeDtypeStruct((1, 6, 6, 3), jnp.float32)
    model = UNet(model_channels=16, channel_mult=(1, 2, 2), num_groups=8)
    variables = jax.eval_shape(model.init, jax.random.key(0), odd, t.update(shape=(1,)))
    assert jax.eval_shape(model.apply, variables, odd, jnp.zeros(())).shape == (1, 6, 6, 3)


def test_unet_attention_blocks_where_asked():
    params = jax.eval_shape(UNet(model_channels=16, attention_resolutions=(4,), context_dim=CONTEXT_DIM,
                                 num_groups=8).init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros(1),
                            context=jnp.zeros((1, 2, CONTEXT_DIM)))["params"]
    attn = sorted(name for name in params if name.endswith("attn"))
    assert attn == ["down_1_0_attn", "down_1_0_xattn", "mid_attn", "mid_xattn", "up_1_0_attn", "up_1_0_xattn",
                    "up_1_1_attn", "up_1_1_xattn"]


def test_unet_conditional_forward(cond_unet):
    out, inputs = cond_unet.out, cond_unet.inputs
    assert out.shape == inputs["x"].shape and bool(jnp.all(jnp.isfinite(out)))
    assert float(jnp.std(out)) > 1e-3
    # labels and context change the output
    other = cond_unet.apply(cond_unet.params, {**inputs, "y": jnp.asarray([1, 1]), "context": -inputs["context"]})
    assert float(jnp.max(jnp.abs(other - out))) > 1e-4


def test_dit_output_shapes_and_forward():
    model = DiT(patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=NUM_CLASSES, freq_dim=32)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 1)), jnp.float32)
    t, y = jnp.asarray([3.0, 900.0]), jnp.asarray([1, 2])
    params = random_params(model, x, t, y=y)
    out = jax.jit(model.apply)(params, x, t, y)
    assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out))) and float(jnp.std(out)) > 1e-3
    wide = DiT(patch_size=4, hidden_size=16, depth=1, num_heads=2, out_channels=2, freq_dim=16)
    xs = jax.ShapeDtypeStruct((3, 8, 12, 3), jnp.float32)
    variables = jax.eval_shape(wide.init, jax.random.key(0), xs, jnp.zeros(3))
    assert jax.eval_shape(wide.apply, variables, xs, jnp.zeros(3)).shape == (3, 8, 12, 2)
    with pytest.raises(ValueError, match="patch_size"):
        jax.eval_shape(wide.init, jax.random.key(0), jnp.zeros((1, 6, 6, 1)), jnp.zeros(1))


def test_fresh_models_are_zero_initialised():
    """ADM's zero conv_out / attention projections and DiT's adaLN-Zero: fresh networks predict exactly 0."""
    unet = UNet(model_channels=8, channel_mult=(1,), num_groups=4)
    params = init_variables(unet, rbg_key(0), (1, 4, 4, 1))["params"]
    for kernel in (params["conv_out"]["kernel"], params["mid_attn"]["proj_out"]["kernel"],
                   params["mid_0"]["conv_out"]["kernel"]):
        assert not bool(jnp.any(kernel))
    assert bool(jnp.any(params["mid_0"]["conv_in"]["kernel"]))
    dit = DiT(hidden_size=16, depth=1, num_heads=2, freq_dim=16)
    params = init_variables(dit, rbg_key(0), (1, 8, 8, 1))["params"]
    for kernel in (params["final_linear"]["kernel"], params["final_adaLN"]["kernel"],
                   params["block_0"]["adaLN"]["kernel"]):
        assert not bool(jnp.any(kernel))
    assert bool(jnp.any(params["block_0"]["qkv"]["kernel"]))


def test_bad_arguments():
    x, t = jnp.zeros((2, 8, 8, 1)), jnp.zeros(2)
    plain = UNet(model_channels=16, num_groups=8)
    with pytest.raises(ValueError, match="num_classes"):
        jax.eval_shape(plain.init, jax.random.key(0), x, t, y=jnp.zeros(2, jnp.int32))
    with pytest.raises(ValueError, match="context"):
        jax.eval_shape(plain.init, jax.random.key(0), x, t, context=jnp.zeros((2, 1, 4)))
    with pytest.raises(ValueError, match="context must have shape"):
        jax.eval_shape(UNet(context_dim=4, num_groups=8).init, jax.random.key(0), x, t)
    with pytest.raises(ValueError, match="t must be"):
        jax.eval_shape(plain.init, jax.random.key(0), x, jnp.zeros(3))
    with pytest.raises(ValueError, match="num_heads"):
        jax.eval_shape(UNet(model_channels=16, attention_resolutions=(8,), num_heads=3, num_groups=8).init,
                       jax.random.key(0), x, t)


# ----------------------------------------------------------------------------------------------------------
# bfloat16

def test_bfloat16_compute_close_to_float32(cond_unet):
    model, params, inputs, _, out32 = cond_unet
    bf16 = model.clone(dtype=jnp.bfloat16)
    out16 = _jitted_apply(bf16)(params, inputs)
    assert out16.dtype == jnp.float32  # outputs come back in x's dtype
    assert bool(jnp.all(jnp.isfinite(out16)))
    # bfloat16 has an 8-bit mantissa (relative step 2^-8 = 0.4%); errors add up over ~20 layers.
    rel = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
    assert rel < 0.05, rel
    shapes = jax.eval_shape(bf16.init, jax.random.key(0), inputs["x"], inputs["t"], y=inputs["y"],
                            context=inputs["context"])
    assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}


# ----------------------------------------------------------------------------------------------------------
# label dropout

def test_drop_labels_pure_function():
    y = jnp.arange(4000, dtype=jnp.int32) % NUM_CLASSES
    dropped = drop_labels(rbg_key(0), y, 0.25, NUM_CLASSES)
    frac = float(jnp.mean(dropped == NUM_CLASSES))
    assert abs(frac - 0.25) < 0.03
    assert bool(jnp.all((dropped == y) | (dropped == NUM_CLASSES)))
    assert bool(jnp.all(dropped == drop_labels(rbg_key(0), y, 0.25, NUM_CLASSES)))
    assert bool(jnp.all(drop_labels(rbg_key(0), y, 0.0, NUM_CLASSES) == y))
    with pytest.raises(ValueError, match="rate"):
        drop_labels(rbg_key(0), y, 1.5, NUM_CLASSES)


def test_label_embed_null_class_and_dropout():
    embed = LabelEmbed(NUM_CLASSES, 4, dropout=1.0)
    variables = embed.init(rbg_key(0), jnp.asarray([0, 1]), 2)
    table = variables["params"]["embedding"]["embedding"]
    assert table.shape == (NUM_CLASSES + 1, 4)
    null = jnp.broadcast_to(table[NUM_CLASSES], (2, 4))
    assert bool(jnp.all(embed.apply(variables, None, 2) == null))  # y=None -> null class
    assert bool(jnp.all(embed.apply(variables, jnp.asarray([0, 1]), 2) == table[:2]))  # eval: no dropout
    dropped = embed.apply(variables, jnp.asarray([0, 1]), 2, train=True, rngs={"dropout": rbg_key(1)})
    assert bool(jnp.all(dropped == null))


def test_unet_label_dropout_path(cond_unet):
    """With label_dropout=1 and train=True every label becomes the null class (= explicit y = num_classes)."""
    model, params, inputs, apply, _ = cond_unet
    expected = apply(params, {**inputs, "y": jnp.full((2,), NUM_CLASSES, jnp.int32)})
    out = _jitted_apply(model.clone(label_dropout=1.0), train=True)(params, inputs, rbg_key(3))
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# parameter counts

def _count(module, *args):
    return count_params(jax.eval_shape(module.init, jax.random.key(0), *args)["params"])


def test_param_counts_by_hand():
    c_in, c_out, emb = 4, 8, 16
    x, e = jnp.zeros((1, 4, 4, c_in)), jnp.zeros((1, emb))
    # GN(in) 2*4 + conv 3*3*4*8+8 + emb Dense 16*16+16 + GN(out) 2*8 + conv 3*3*8*8+8 + 1x1 skip 4*8+8
    assert _count(ResBlock(c_out, num_groups=4), x, e) == 8 + 296 + 272 + 16 + 584 + 40 == 1216
    # GN 2*8 + qkv 8*24+24 + proj 8*8+8
    assert _count(AttentionBlock(num_heads=2, num_groups=4), jnp.zeros((1, 4, 4, 8))) == 16 + 216 + 72
    # Dense 8->16 + Dense 16->16
    assert _count(TimestepEmbed(16, 8), jnp.zeros(1)) == (8 * 16 + 16) + (16 * 16 + 16)
    # adaLN 8*48+48 + qkv 8*24+24 + proj 8*8+8 + MLP 8*32+32 + 32*8+8
    assert _count(DiTBlock(num_heads=2), jnp.zeros((1, 4, 8)), jnp.zeros((1, 8))) == 432 + 216 + 72 + 288 + 264
    # a one-level UNet: conv_in 9*1*8+8, time MLP 8*32+32 + 32*32+32, 2+1 ResBlocks 8->8 with emb 32
    # (up: 16->8 with a 1x1 skip), no attention, norm_out 16, conv_out 9*8*1+1
    res_8 = 16 + 584 + (32 * 16 + 16) + 16 + 584
    res_16 = 32 + (9 * 16 * 8 + 8) + (32 * 16 + 16) + 16 + 584 + (16 * 8 + 8)
    unet = UNet(model_channels=8, channel_mult=(1,), num_groups=4, mid_attention=False)
    expected = 80 + (8 * 32 + 32 + 32 * 32 + 32) + res_8 + 2 * res_8 + 2 * res_16 + 16 + 73
    assert _count(unet, jnp.zeros((1, 4, 4, 1)), jnp.zeros(1)) == expected
    assert f"{expected:,} parameters" in describe(unet, (1, 4, 4, 1))


def test_describe_reports_count(cond_unet):
    model, params = cond_unet.model, cond_unet.params
    report = describe(model, (2, 8, 8, 1))
    assert f"{count_params(params):,} parameters" in report and "label_embed" in report


def test_classifier_shapes():
    for shape, channels in (((2, 8, 8, 1), (8, 16)), ((2, 28, 28, 1), (8, 16, 16))):
        model = Classifier(num_classes=10, channels=channels, feature_dim=24)
        x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
        params = random_params(model, x)
        logits, features = jax.jit(lambda p, x: model.apply(p, x, return_features=True))(params, x)
        assert logits.shape == (2, 10) and features.shape == (2, 24)
        assert bool(jnp.all(jnp.isfinite(logits)))


# ----------------------------------------------------------------------------------------------------------
# sampler bridge

class Echo(nn.Module):
    """Returns its time input everywhere, plus 10000 * label: exposes what make_model_fn feeds the network."""

    num_classes: int = NUM_CLASSES

    def __call__(self, x, t, y=None, context=None, train=False):
        out = jnp.broadcast_to(t[:, None, None, None], x.shape)
        if y is not None:
            out = out + 10000.0 * y.astype(jnp.float32)[:, None, None, None]
        return out


def test_make_model_fn_time_input():
    x, t = jnp.zeros((2, 2, 2, 1)), jnp.asarray([0.001, 0.5])
    discrete = DiscreteVP.from_name("linear")
    out = make_model_fn(Echo(), {}, discrete)(x, t)
    np.testing.assert_allclose(np.asarray(out[:, 0, 0, 0]), [0.0, 499.0], atol=1e-3)  # 1000 (t - 1/N)
    out = make_model_fn(Echo(), {}, LinearVP())(x, t)
    np.testing.assert_allclose(np.asarray(out[:, 0, 0, 0]), [1.0, 500.0], rtol=1e-6)  # 1000 t
    np.testing.assert_allclose(np.asarray(network_time(LinearVP(), t)), [1.0, 500.0], rtol=1e-6)
    out = make_model_fn(Echo(), {}, LinearVP(), y=2)(x, t)  # a scalar label is broadcast to the batch
    np.testing.assert_allclose(np.asarray(out[:, 0, 0, 0]), [20001.0, 20500.0], rtol=1e-6)


def test_make_cfg_model_fn_formula():
    x, t = jnp.zeros((2, 2, 2, 1)), jnp.asarray([0.25, 0.5])
    guided = make_cfg_model_fn(Echo(), {}, LinearVP(), jnp.asarray([0, 2]), 3.0)
    # out_u + s (out_c - out_u) = 1000 t + 10000 (null + s (y - null)), null = 3
    expected = 1000.0 * np.asarray(t) + 10000.0 * (3 + 3.0 * (np.asarray([0, 2]) - 3))
    np.testing.assert_allclose(np.asarray(guided(x, t)[:, 0, 0, 0]), expected, rtol=1e-6)
    with pytest.raises(ValueError, match="null_context"):
        make_cfg_model_fn(Echo(), {}, LinearVP(), 1, 2.0, context=jnp.zeros((2, 1, 4)))


def test_unet_with_sampler_and_guidance(cond_unet):
    """The cross-attending class-conditional UNet runs inside dpmjax.sample (3 NFE, CFG scale 2)."""
    model, params, inputs = cond_unet.model, cond_unet.params, cond_unet.inputs
    schedule = DiscreteVP.from_name("linear")
    model_fn = make_cfg_model_fn(model, params["params"], schedule, inputs["y"], 2.0, context=inputs["context"],
                                 null_context=jnp.zeros_like(inputs["context"]))
    x_T = jnp.asarray(np.random.default_rng(5).standard_normal((2, 8, 8, 1)), jnp.float32)
    x0 = dpmjax.sample(model_fn, x_T, schedule=schedule, solver="dpmpp_2m", nfe=3, prediction="eps")
    assert x0.shape == x_T.shape and bool(jnp.all(jnp.isfinite(x0)))


# ----------------------------------------------------------------------------------------------------------
# training

def test_gradient_step_runs():
    """A jitted AdamW step on an eps-prediction loss with dropout and label dropout: finite, params move."""
    model = UNet(model_channels=16, channel_mult=(1, 2), num_groups=8, dropout=0.1, num_classes=NUM_CLASSES,
                 label_dropout=0.2)
    params = random_params(model, jnp.zeros((4, 8, 8, 1)), jnp.zeros(4), y=jnp.zeros(4, jnp.int32))["params"]
    optimizer = optax.adamw(1e-3)
    opt_state = optimizer.init(params)
    schedule = DiscreteVP.from_name("linear")
    rng = np.random.default_rng(0)
    x0 = jnp.asarray(rng.uniform(-1, 1, (4, 8, 8, 1)), jnp.float32)
    eps = jnp.asarray(rng.standard_normal((4, 8, 8, 1)), jnp.float32)
    t = jnp.asarray([0.1, 0.4, 0.7, 1.0], jnp.float32)
    y = jnp.asarray([0, 1, 2, 0])

    @jax.jit
    def step(params, opt_state, key):
        def loss_fn(p):
            alpha = schedule.alpha(t)[:, None, None, None]
            sigma = schedule.sigma(t)[:, None, None, None]
            pred = model.apply({"params": p}, alpha * x0 + sigma * eps, network_time(schedule, t), y=y,
                               train=True, rngs={"dropout": key})
            return jnp.mean((pred - eps) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes its int32 step count with floats
            updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    new_params, opt_state, loss = step(params, opt_state, rbg_key(1))
    assert np.isfinite(float(loss))
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), params, new_params)
    assert moved["conv_out"]["kernel"] and all(jax.tree.leaves(jax.tree.map(
        lambda a: bool(jnp.all(jnp.isfinite(a))), new_params)))
    _, _, loss2 = step(new_params, opt_state, rbg_key(2))
    assert np.isfinite(float(loss2)) and float(loss2) != float(loss)


def test_timestep_embedding_values():
    emb = timestep_embedding(jnp.asarray([0.0, 1.0]), 5)
    assert emb.shape == (2, 5) and emb.dtype == jnp.float32
    # t = 0: cos = 1, sin = 0; w_0 = 1 so column 0 at t = 1 is cos(1); odd dim -> zero last column
    np.testing.assert_allclose(np.asarray(emb[0]), [1, 1, 0, 0, 0], atol=1e-7)
    np.testing.assert_allclose(float(emb[1, 0]), np.cos(1.0), rtol=1e-6)
    assert float(emb[1, 4]) == 0.0
