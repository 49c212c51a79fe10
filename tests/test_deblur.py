"""Synthetic blur, image metrics, the guided icDPM and its trainer (dpmjax/data/blur.py, dpmjax/nn/deblur.py,
dpmjax/methods/deblur.py). Generated 8 x 8 arrays and tiny networks only: no dataset is read."""
import math

import dm_pix as pix
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dpmjax.data import blur
from dpmjax.methods import deblur


def tiny_config(**blur_train):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.schedule = dict(name="linear", num_train_timesteps=1000)
    c.data = dict(name="generated", image_shape=(8, 8, 1), batch_size=16)
    c.blur = dict(train=dict(kind="motion_line", strength=(1.0, 2.0), kernel_size=3, noise_std=(0.0, 0.02),
                             anisotropy=1.0, **blur_train))
    c.model = dict(model_channels=8, channel_mult=(1, 2), num_res_blocks=1, dropout=0.0, num_groups=4,
                   guidance_channels=8, guidance_blocks=1)
    c.deblur = dict(guidance_factors=(2,), guidance_weight=1.0)
    c.optim = dict(learning_rate=3e-3, warmup_steps=0, decay="constant", weight_decay=0.0, grad_clip=1.0)
    c.train = dict(num_steps=60, target="v", ema_decay=0.9, log_every=30)
    c.sample = dict(solver="dpmpp_2m", nfe=10, spacing="logSNR")
    return c


def rectangles(num, side=8, seed=0):
    """[num, side, side, 1] images in [-1, 1]: a bright axis-aligned rectangle on a dark background each."""
    rng = np.random.default_rng(seed)
    images = -np.ones((num, side, side, 1), np.float32)
    for image in images:
        top, left = rng.integers(0, side - 3, size=2)
        height, width = rng.integers(2, side - max(top, left), size=2)
        image[top:top + height, left:left + width] = 1.0
    return images


# ----------------------------------------------------------------------------------------------- blur

@pytest.mark.parametrize("kind", blur.KERNEL_KINDS)
@pytest.mark.parametrize("padding", blur.PADDINGS)
def test_blur_of_a_delta_image_returns_the_kernel(kind, padding):
    family = blur.BlurFamily(kind=kind, strength=(1.5, 4.0), kernel_size=7, anisotropy=0.5)
    kernels = blur.sample_kernels(jax.random.key(0), family, 3)
    delta = jnp.zeros((3, 15, 15, 1)).at[:, 7, 7, 0].set(1.0)
    out = blur.blur_images(delta, kernels, padding)
    np.testing.assert_allclose(out[:, 4:11, 4:11, 0], kernels, atol=1e-6)
    np.testing.assert_allclose(jnp.sum(out, axis=(1, 2, 3)), 1.0, atol=1e-5)


def test_blur_is_a_convolution_not_a_correlation():
    # A kernel with all its mass one row up and one column right of the centre moves a delta there (convolution);
    # a correlation would move it down-left.
    kernel = jnp.zeros((1, 3, 3)).at[0, 0, 2].set(1.0)
    delta = jnp.zeros((1, 5, 5, 1)).at[0, 2, 2, 0].set(1.0)
    out = blur.blur_images(delta, kernel, "zeros")[0, ..., 0]
    assert float(out[1, 3]) == 1.0 and float(jnp.sum(out)) == 1.0


def test_blur_matches_dm_pix_gaussian_blur():
    # Outside reference: dm-pix's separable isotropic Gaussian with zero ("SAME") padding.
    images = jax.random.uniform(jax.random.key(1), (2, 12, 12, 3), minval=-1, maxval=1)
    kernels = blur.gaussian_kernels(jax.random.key(2), 2, 7, (1.3, 1.3), anisotropy=1.0)
    ours = blur.blur_images(images, kernels, "zeros")
    np.testing.assert_allclose(ours, pix.gaussian_blur(images, 1.3, 7), atol=1e-5)


@pytest.mark.parametrize("kind", blur.KERNEL_KINDS)
def test_kernels_are_normalised_and_spread_with_strength(kind):
    def spread(strength):
        family = blur.BlurFamily(kind=kind, strength=(strength, strength), kernel_size=9, anisotropy=0.5)
        kernels = blur.sample_kernels(jax.random.key(3), family, 16)
        assert float(kernels.min()) >= 0.0
        np.testing.assert_allclose(kernels.sum(axis=(1, 2)), 1.0, atol=1e-5)
        coords = jnp.arange(9.0) - 4.0
        second_moment = (kernels * (coords[:, None] ** 2 + coords[None, :] ** 2)).sum(axis=(1, 2))
        return float(second_moment.mean())

    assert spread(1.0) < spread(2.0) < spread(4.0)


def test_motion_line_kernel_has_its_length():
    # A horizontal-or-not segment of length L splatted bilinearly has second moment L^2 / 12 + (1/6 per axis
    # from the bilinear tent: 2 / 6 in all); sampled with 64 points, within 2 %.
    length = 6.0
    kernels = blur.motion_line_kernels(jax.random.key(4), 8, 9, (length, length))
    coords = jnp.arange(9.0) - 4.0
    second_moment = (kernels * (coords[:, None] ** 2 + coords[None, :] ** 2)).sum(axis=(1, 2))
    # Bilinear splatting of a point at fractional offset a adds a (1 - a) per axis; averaged over a: 1/6.
    np.testing.assert_allclose(second_moment, length ** 2 / 12 + 2 / 6, rtol=0.06)


def test_blur_keeps_constant_images_with_edge_padding():
    family = blur.BlurFamily(kind="motion_walk", strength=(3.0, 5.0), kernel_size=7)
    kernels = blur.sample_kernels(jax.random.key(5), family, 4)
    constant = jnp.full((4, 8, 8, 1), 0.3)
    np.testing.assert_allclose(blur.blur_images(constant, kernels, "edge"), constant, atol=1e-6)


def test_degrade_adds_noise_of_the_drawn_std():
    family = blur.BlurFamily(kind="motion_line", strength=(0.0, 0.0), kernel_size=3, noise_std=(0.1, 0.1))
    images = jnp.asarray(rectangles(8, 32))
    blurry, kernels, noise_std = blur.degrade(jax.random.key(6), images, family)
    np.testing.assert_allclose(kernels[:, 1, 1], 1.0, atol=1e-6)           # length 0: the identity kernel
    np.testing.assert_allclose(noise_std, 0.1)
    assert abs(float(jnp.std(blurry - images)) - 0.1) < 0.005             # 8192 draws: std error ~0.0008


def test_kernel_larger_than_the_image_is_refused():
    family = blur.BlurFamily(kind="gaussian", strength=(1.0, 2.0), kernel_size=9)
    with pytest.raises(ValueError, match="blur.kernel_size=9 is larger than the images"):
        blur.degrade(jax.random.key(0), jnp.zeros((2, 8, 8, 1)), family)
    with pytest.raises(ValueError, match="kernel_size=9 is larger"):
        blur.blur_images(jnp.zeros((1, 8, 8, 1)), jnp.ones((1, 9, 9)) / 81)
    with pytest.raises(ValueError, match="config.blur.train.kernel_size=9"):
        config = tiny_config()
        config.blur.train.kernel_size = 9
        config.blur.train.strength = (1.0, 2.0)
        deblur.validate(config, "icdpm")


@pytest.mark.parametrize("field,value,message", [
    ("kind", "box", "blur.kind must be one of"),
    ("kernel_size", 4, "blur.kernel_size must be a positive odd int"),
    ("strength", (1.0, 7.0), "does not fit blur.kernel_size=5"),
    ("noise_std", (0.2, 0.1), "blur.noise_std must be a range"),
])
def test_bad_blur_families_are_refused(field, value, message):
    family = blur.BlurFamily(kind="motion_line", strength=(1.0, 3.0), kernel_size=5)._replace(**{field: value})
    with pytest.raises(ValueError, match=message):
        blur.check_family(family)


# ----------------------------------------------------------------------------------------------- metrics

def test_psnr_and_ssim_of_identical_and_offset_images():
    images = jnp.asarray(rectangles(4, 16))
    assert bool(jnp.all(jnp.isinf(blur.psnr(images, images))))
    np.testing.assert_allclose(blur.ssim(images, images), 1.0, atol=1e-5)
    # An offset of 0.1 in [-1, 1] is 0.05 in [0, 1]: PSNR = 10 log10(1 / 0.05^2) = 26.02 dB.
    np.testing.assert_allclose(blur.psnr(0.8 * images + 0.1, 0.8 * images), 10 * math.log10(1 / 0.05 ** 2),
                               rtol=1e-4)
    blurred = blur.blur_images(images, blur.gaussian_kernels(jax.random.key(0), 4, 5, (1.5, 1.5)))
    assert bool(jnp.all(blur.ssim(blurred, images) < 0.95))


def test_guidance_targets_are_pooled_grayscale_at_each_scale():
    sharp = jax.random.uniform(jax.random.key(7), (2, 28, 28, 3), minval=-1, maxval=1)
    targets = blur.guidance_targets(sharp, (2, 4))
    assert [t.shape for t in targets] == [(2, 14, 14, 1), (2, 7, 7, 1)]
    gray = 0.2989 * sharp[..., :1] + 0.5870 * sharp[..., 1:2] + 0.1140 * sharp[..., 2:]
    np.testing.assert_allclose(targets[0][:, 3, 5], gray[:, 6:8, 10:12].mean(axis=(1, 2)), atol=1e-5)
    np.testing.assert_allclose(targets[1][:, 1, 2], gray[:, 4:8, 8:12].mean(axis=(1, 2)), atol=1e-5)
    gray16 = jnp.asarray(rectangles(2, 16))
    assert [t.shape for t in blur.guidance_targets(gray16, (2, 4))] == [(2, 8, 8, 1), (2, 4, 4, 1)]


# ----------------------------------------------------------------------------------------------- networks

def test_guided_unet_starts_as_the_icdpm_and_the_guidance_reaches_the_encoder():
    config = tiny_config()
    guided, plain = deblur.model_for(config, "guided"), deblur.model_for(config, "icdpm")
    x = jax.random.normal(jax.random.key(8), (2, 8, 8, 1))
    y = jnp.asarray(rectangles(2))
    t = jnp.array([100.0, 700.0])
    params = jax.jit(guided.init)(jax.random.key(9), x, t, y)["params"]
    # Give the zero-initialised output conv weights so the comparison is not trivially 0 == 0.
    params = jax.tree.map(lambda p: p + 0.05, params)
    unguided = {k: v for k, v in params.items() if not k.startswith("guidance_") and not k.endswith("_guide")}
    assert set(params) - set(unguided) == {"guidance_2", "down_1_0_guide"}
    apply_guided = jax.jit(lambda p: guided.apply({"params": p}, x, t, y))
    out_plain = jax.jit(lambda p: plain.apply({"params": p}, x, t, y))(unguided)
    zeroed = dict(params, down_1_0_guide=jax.tree.map(jnp.zeros_like, params["down_1_0_guide"]))
    np.testing.assert_allclose(apply_guided(zeroed), out_plain, atol=1e-5)
    assert float(jnp.max(jnp.abs(apply_guided(params) - out_plain))) > 1e-3


def test_bad_model_inputs_are_refused():
    config = tiny_config()
    config.deblur.guidance_factors = (4,)
    with pytest.raises(ValueError, match=r"model.guidance_factors \[4\] match no encoder level"):
        deblur.validate(config, "guided")
    model = deblur.model_for(tiny_config(), "icdpm")
    with pytest.raises(ValueError, match="the blurry image must have the model's size and channel count"):
        model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,)), jnp.zeros((1, 8, 8, 3)))
    with pytest.raises(ValueError, match="pass blurry="):
        model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,)))


@pytest.mark.parametrize("shape", [(2, 16, 16, 1), (2, 8, 8, 3), (8, 8, 1)])
def test_restorer_refuses_blurry_of_another_size_or_channel_count(shape):
    for variant in ("regression", "guided"):
        restore = deblur.make_restorer(tiny_config(), variant)
        with pytest.raises(ValueError, match=r"\*config.data.image_shape\] = \[B, 8, 8, 1\]"):
            restore(None, np.zeros(shape, np.float32), jax.random.key(0))   # refused before params are read


# ----------------------------------------------------------------------------------------------- training

@pytest.fixture(scope="module")
def trained_guided():
    """The guided variant trained 60 steps on 64 rectangles, and its loss (fixed batch and key) before and after."""
    config = tiny_config()
    images = rectangles(64)
    state, history = deblur.train(config, "guided", images, log=None)
    program = deblur.build(config, "guided")
    untrained = jax.jit(program.init)(jax.random.key(0)).params
    loss = jax.jit(program.loss)
    batch, key = jnp.asarray(images[:32]), jax.random.key(123)
    losses = {"before": loss(untrained, batch, key)[1], "after": loss(state.params, batch, key)[1]}
    return config, images, state, history, losses


def test_training_lowers_the_joint_loss_and_the_guidance_loss(trained_guided):
    *_, history, losses = trained_guided
    before, after = losses["before"], losses["after"]
    assert float(after["diffusion"]) < 0.8 * float(before["diffusion"]), (before, after)
    assert float(after["guidance"]) < 0.8 * float(before["guidance"]), (before, after)
    assert [h["step"] for h in history] == [30, 60]


def test_guided_restorer_samples_in_the_given_nfe_without_recompiling(trained_guided):
    config, images, state, _, _ = trained_guided
    restore = deblur.make_restorer(config, "guided", nfe=10)
    family = deblur.blur_family(config.blur.train)
    first, _, _ = blur.degrade(jax.random.key(1), jnp.asarray(images[:8]), family)
    second, _, _ = blur.degrade(jax.random.key(2), jnp.asarray(images[8:16]), family)
    out = restore(state.ema_params, first, jax.random.key(3))
    again = restore(state.ema_params, second, jax.random.key(4))
    assert out.shape == (8, 8, 8, 1) and bool(jnp.all(jnp.isfinite(out))) and bool(jnp.all(jnp.isfinite(again)))
    assert restore.cache_size() == 1
    assert not np.allclose(out, again)      # the blurry batch is an argument, not a baked-in constant
