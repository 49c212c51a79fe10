"""diffusers' ``UNet2DModel`` (the DDPM UNet of Ho et al. 2020, as diffusers builds it) in flax.linen, NHWC.

The module tree mirrors diffusers' ``state_dict`` names with ``.N`` folded into the preceding name
(``down_blocks.1.attentions.0.to_q.weight`` -> ``down_blocks_1/attentions_0/to_q/kernel``), so a
``UNet2DModel`` checkpoint maps one-to-one (``dpmjax.convert``). Built from a diffusers ``config.json``
with ``DiffusersUNet2D.from_config``; keys missing from an old config take the defaults of diffusers'
``UNet2DModel.__init__`` (0.42), as ``from_pretrained`` does.

Layout (diffusers ``unets/unet_2d.py``):

    emb = linear_2(SiLU(linear_1(sinusoidal(k))))                 (k: diffusers' timestep 0..N-1)
    h = conv_in(x); skips = [h]
    down block l: layers_per_block x [ResnetBlock2D (+ Attention)], then a downsampler (not the last level);
                  every intermediate output is a skip
    mid block:    ResnetBlock2D, Attention (add_attention), ResnetBlock2D
    up block l:   (layers_per_block + 1) x [concat skip, ResnetBlock2D (+ Attention)], then an upsampler
    out = conv_out(SiLU(GroupNorm(h)))

ResnetBlock2D: h = conv1(act(GN(x))); h = GN(h + Dense(act(emb))) ("default") or GN(h) (1 + s) + b
("scale_shift"); out = (shortcut(x) + conv2(act(h))) / output_scale_factor. Attention: single self-attention
over the H*W positions with GroupNorm in front, residual, ``heads = C // attention_head_dim``.

Supported: down blocks ``DownBlock2D`` / ``AttnDownBlock2D``, up blocks ``UpBlock2D`` / ``AttnUpBlock2D``
(``UNetRes`` prefixes allowed), mid block ``UNetMidBlock2D`` or none, positional time embedding, act fns
silu / swish / mish / gelu / relu, ``resnet_time_scale_shift`` default / scale_shift, conv or resnet up/down
sampling. Anything else (Fourier or learned time embeddings, skip blocks, cross-attention blocks, class
embeddings) raises ``UnsupportedConfigError`` naming the option.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from dpmjax.nn.layers import dot_product_attention

__all__ = ["DiffusersUNet2D", "UnsupportedConfigError", "UNET2D_DEFAULTS", "timestep_embedding_diffusers"]

Dtype = Any

# UNet2DModel.__init__'s defaults in diffusers 0.42 (tests check them against the installed diffusers).
UNET2D_DEFAULTS = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0, "flip_sin_to_cos": True,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (224, 448, 672, 896), "layers_per_block": 2, "mid_block_scale_factor": 1,
    "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv", "dropout": 0.0, "act_fn": "silu",
    "attention_head_dim": 8, "norm_num_groups": 32, "attn_norm_num_groups": None, "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None,
    "num_class_embeds": None, "num_train_timesteps": None,
}
DOWN_BLOCKS = ("DownBlock2D", "AttnDownBlock2D")
UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D")
_ACTIVATIONS = {
    "silu": nn.silu, "swish": nn.silu, "relu": nn.relu,
    "gelu": lambda x: nn.gelu(x, approximate=False),  # torch.nn.GELU() is the exact (erf) GELU
    "mish": lambda x: x * jnp.tanh(nn.softplus(x)),
}


class UnsupportedConfigError(ValueError):
    """A UNet2DModel config option (or value) that this port does not implement."""


def timestep_embedding_diffusers(timesteps, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                                 max_period: float = 10000.0):
    """diffusers' ``get_timestep_embedding``: [B] -> [B, dim] float32.

    w_i = exp(-log(max_period) i / (dim/2 - freq_shift)), emb = [sin(k w), cos(k w)] ([cos, sin] when
    ``flip_sin_to_cos``), one zero column for odd ``dim``. DDPM's own code is freq_shift = 1, no flip.
    """
    half = dim // 2
    exponent = -math.log(max_period) * np.arange(half, dtype=np.float32) / np.float32(half - freq_shift)
    freqs = jnp.asarray(np.exp(exponent.astype(np.float32)), jnp.float32)
    args = jnp.asarray(timesteps, jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def _group_norm(groups: int, eps: float, dtype, param_dtype, name: str):
    # two-pass variance like torch.nn.GroupNorm (flax's fast E[x^2] - E[x]^2 loses digits on large means)
    return nn.GroupNorm(num_groups=groups, epsilon=eps, use_fast_variance=False, dtype=dtype,
                        param_dtype=param_dtype, name=name)


def _upsample_nearest(x):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _avg_pool_2x2(x):
    batch, height, width, channels = x.shape
    x = x[:, : height // 2 * 2, : width // 2 * 2]  # torch's AvgPool2d(2) floors odd sizes
    return x.reshape(batch, height // 2, 2, width // 2, 2, channels).mean(axis=(2, 4))


class ResnetBlock2D(nn.Module):
    """diffusers' ``ResnetBlock2D`` (pre-norm, with optional nearest-up / avg-pool-down inside)."""

    out_channels: int
    groups: int
    eps: float
    act_fn: str = "silu"
    time_embedding_norm: str = "default"
    output_scale_factor: float = 1.0
    dropout: float = 0.0
    up: bool = False
    down: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb, train: bool = False):
        act = _ACTIVATIONS[self.act_fn]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        conv = lambda name: nn.Conv(self.out_channels, (3, 3), padding=((1, 1), (1, 1)), name=name, **kw)  # noqa: E731
        h = act(_group_norm(self.groups, self.eps, self.dtype, self.param_dtype, "norm1")(x))
        if self.up:
            x, h = _upsample_nearest(x), _upsample_nearest(h)
        elif self.down:
            x, h = _avg_pool_2x2(x), _avg_pool_2x2(h)
        h = conv("conv1")(h)
        proj = 2 * self.out_channels if self.time_embedding_norm == "scale_shift" else self.out_channels
        temb = nn.Dense(proj, name="time_emb_proj", **kw)(act(temb))[:, None, None, :]
        norm2 = _group_norm(self.groups, self.eps, self.dtype, self.param_dtype, "norm2")
        if self.time_embedding_norm == "scale_shift":
            scale, shift = jnp.split(temb, 2, axis=-1)
            h = norm2(h) * (1 + scale) + shift
        else:
            h = norm2(h + temb)
        h = nn.Dropout(self.dropout, deterministic=not train)(act(h))
        h = conv("conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = nn.Conv(self.out_channels, (1, 1), name="conv_shortcut", **kw)(x)
        return (x + h) / self.output_scale_factor


class Attention(nn.Module):
    """diffusers' ``Attention`` as built for UNet2DModel (``_from_deprecated_attn_block``): GroupNorm, one
    multi-head self-attention over H*W positions (softmax in float32), output projection, residual."""

    heads: int
    head_dim: int
    groups: int | None
    eps: float
    rescale_output_factor: float = 1.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        batch, height, width, channels = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = x
        if self.groups is not None:
            h = _group_norm(self.groups, self.eps, self.dtype, self.param_dtype, "group_norm")(h)
        h = h.reshape(batch, height * width, channels)
        inner = self.heads * self.head_dim
        q, k, v = (nn.Dense(inner, name=name, **kw)(h).reshape(batch, -1, self.heads, self.head_dim)
                   for name in ("to_q", "to_k", "to_v"))
        out = dot_product_attention(q, k, v).reshape(batch, height * width, inner)
        out = nn.Dense(channels, name="to_out_0", **kw)(out).reshape(batch, height, width, channels)
        return (out + x) / self.rescale_output_factor


class _ConvResample(nn.Module):
    """``Downsample2D(use_conv=True)`` (3x3 stride 2; padding 0 pads bottom/right by one, as diffusers) or
    ``Upsample2D(use_conv=True)`` (nearest x2, then 3x3); the conv is named ``conv`` as in diffusers."""

    channels: int
    mode: str  # "down" or "up"
    padding: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, name="conv")
        if self.mode == "up":
            return nn.Conv(self.channels, (3, 3), padding=((1, 1), (1, 1)), **kw)(_upsample_nearest(x))
        pad = ((0, 1), (0, 1)) if self.padding == 0 else ((self.padding, self.padding),) * 2
        return nn.Conv(self.channels, (3, 3), strides=(2, 2), padding=pad, **kw)(x)


class _Block(nn.Module):
    """One down or up block: ``resnets_i`` (+ ``attentions_i``) and ``downsamplers_0`` / ``upsamplers_0``."""

    kind: str                 # "down" or "up"
    num_layers: int
    out_channels: int
    attention: bool
    resample: str | None      # None, "conv" or "resnet"
    head_dim: int
    groups: int
    eps: float
    act_fn: str
    time_embedding_norm: str
    downsample_padding: int
    dropout: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h, temb, skips=(), train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        res_kw = dict(groups=self.groups, eps=self.eps, act_fn=self.act_fn,
                      time_embedding_norm=self.time_embedding_norm, dropout=self.dropout, **kw)
        skips, outputs = list(skips), []
        for i in range(self.num_layers):
            if self.kind == "up":
                h = jnp.concatenate([h, skips.pop()], axis=-1)
            h = ResnetBlock2D(self.out_channels, name=f"resnets_{i}", **res_kw)(h, temb, train)
            if self.attention:
                h = Attention(self.out_channels // self.head_dim, self.head_dim, self.groups, self.eps,
                              name=f"attentions_{i}", **kw)(h)
            outputs.append(h)
        name = "downsamplers_0" if self.kind == "down" else "upsamplers_0"
        if self.resample == "conv":
            h = _ConvResample(self.out_channels, self.kind, self.downsample_padding, name=name, **kw)(h)
            outputs.append(h)
        elif self.resample == "resnet":
            h = ResnetBlock2D(self.out_channels, up=self.kind == "up", down=self.kind == "down", name=name,
                              **res_kw)(h, temb, train)
            outputs.append(h)
        return h, tuple(outputs)


class _MidBlock(nn.Module):
    """``UNetMidBlock2D``: resnets_0, attentions_0 (if add_attention), resnets_1; all outputs / scale."""

    channels: int
    head_dim: int
    groups: int
    attn_groups: int | None
    eps: float
    act_fn: str
    time_embedding_norm: str
    add_attention: bool
    output_scale_factor: float
    dropout: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h, temb, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        res = lambda name: ResnetBlock2D(self.channels, self.groups, self.eps, self.act_fn,  # noqa: E731
                                         self.time_embedding_norm, self.output_scale_factor, self.dropout,
                                         name=name, **kw)
        h = res("resnets_0")(h, temb, train)
        if self.add_attention:
            h = Attention(self.channels // self.head_dim, self.head_dim, self.attn_groups, self.eps,
                          self.output_scale_factor, name="attentions_0", **kw)(h)
        return res("resnets_1")(h, temb, train)


class _TimestepEmbedding(nn.Module):
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, emb):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        return nn.Dense(self.features, name="linear_2", **kw)(nn.silu(nn.Dense(self.features, name="linear_1",
                                                                              **kw)(emb)))


def _strip_unetres(name: str) -> str:
    return name[7:] if name.startswith("UNetRes") else name


class DiffusersUNet2D(nn.Module):
    """diffusers' ``UNet2DModel``; ``__call__(x [B, H, W, C], t [B], y=None, context=None, train=False,
    return_bottleneck=False)``.

    Takes dpmjax's generative-network signature. ``t`` is the float timestep on the ~[0, 1000] scale that
    ``dpmjax.nn.network_time`` gives (1000 (t - 1/N) for a ``DiscreteVP``); the embedding sees
    ``timestep_scale * t``, which the converter sets to N / 1000 so that diffusers' integer timestep
    k = N t - 1 goes in (identity for N = 1000). H and W must be multiples of 2^(levels - 1). Build it with
    ``from_config``; the fields are diffusers' config keys (see ``UNET2D_DEFAULTS``) plus dtypes.

    ``return_bottleneck=True`` (no parameters change) also returns the mid block's output
    [B, H / 2^(L-1), W / 2^(L-1), block_out_channels[-1]] (the last down block's output when there is no mid
    block), as dpmjax's own ``UNet`` does: DMD2's GAN head reads it.
    """

    sample_size: Any = None
    in_channels: int = 3
    out_channels: int = 3
    center_input_sample: bool = False
    time_embedding_dim: int | None = None
    freq_shift: float = 0
    flip_sin_to_cos: bool = True
    down_block_types: Sequence[str] = UNET2D_DEFAULTS["down_block_types"]
    mid_block_type: str | None = "UNetMidBlock2D"
    up_block_types: Sequence[str] = UNET2D_DEFAULTS["up_block_types"]
    block_out_channels: Sequence[int] = UNET2D_DEFAULTS["block_out_channels"]
    layers_per_block: int = 2
    mid_block_scale_factor: float = 1.0
    downsample_padding: int = 1
    downsample_type: str = "conv"
    upsample_type: str = "conv"
    dropout: float = 0.0
    act_fn: str = "silu"
    attention_head_dim: int | None = 8
    norm_num_groups: int = 32
    attn_norm_num_groups: int | None = None
    norm_eps: float = 1e-5
    resnet_time_scale_shift: str = "default"
    add_attention: bool = True
    timestep_scale: float = 1.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @classmethod
    def from_config(cls, config: dict, **overrides) -> "DiffusersUNet2D":
        """Validate a diffusers UNet2DModel ``config.json`` dict and build the module.

        Keys starting with ``_`` are metadata; ``_class_name``, when present, must be ``UNet2DModel``.
        ``overrides`` (and non-diffusers keys of ``config``) set ``dtype``, ``param_dtype``, ``timestep_scale``.
        Raises ``UnsupportedConfigError`` naming every unsupported option, and ``ValueError`` for
        inconsistent ones.
        """
        return cls(**normalize_config(config), **overrides)

    @nn.compact
    def __call__(self, x, t, y=None, context=None, train: bool = False, return_bottleneck: bool = False):
        self._check(x, t, y, context)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        batch = x.shape[0]
        channels = tuple(self.block_out_channels)
        levels = len(channels)
        eps, groups = self.norm_eps, self.norm_num_groups
        timesteps = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (batch,)) * self.timestep_scale
        h = x.astype(self.dtype)
        if self.center_input_sample:
            h = 2 * h - 1.0
        emb = timestep_embedding_diffusers(timesteps, channels[0], self.flip_sin_to_cos, self.freq_shift)
        emb = _TimestepEmbedding(self.time_embedding_dim or 4 * channels[0], name="time_embedding",
                                 **kw)(emb.astype(self.dtype))
        block_kw = dict(groups=groups, eps=eps, act_fn=self.act_fn, time_embedding_norm=self.resnet_time_scale_shift,
                        downsample_padding=self.downsample_padding, dropout=self.dropout, **kw)

        h = nn.Conv(channels[0], (3, 3), padding=((1, 1), (1, 1)), name="conv_in", **kw)(h)
        skips = [h]
        for i, block_type in enumerate(self.down_block_types):
            attention = _strip_unetres(block_type) == "AttnDownBlock2D"
            resample = None if i == levels - 1 else (self.downsample_type or "conv") if attention else "conv"
            h, outputs = _Block("down", self.layers_per_block, channels[i], attention, resample,
                                self.attention_head_dim or channels[i], name=f"down_blocks_{i}", **block_kw)(
                                    h, emb, train=train)
            skips.extend(outputs)

        if self.mid_block_type is not None:
            attn_groups = self.attn_norm_num_groups
            if attn_groups is None and self.resnet_time_scale_shift == "default":
                attn_groups = groups
            h = _MidBlock(channels[-1], self.attention_head_dim or channels[-1], groups, attn_groups, eps,
                          self.act_fn, self.resnet_time_scale_shift, self.add_attention,
                          self.mid_block_scale_factor, self.dropout, name="mid_block", **kw)(h, emb, train)
        bottleneck = h

        for i, block_type in enumerate(self.up_block_types):
            out = channels[levels - 1 - i]
            attention = _strip_unetres(block_type) == "AttnUpBlock2D"
            resample = None if i == levels - 1 else (self.upsample_type or "conv") if attention else "conv"
            count = self.layers_per_block + 1
            block_skips, skips = skips[-count:], skips[:-count]
            h, _ = _Block("up", count, out, attention, resample, self.attention_head_dim or out,
                          name=f"up_blocks_{i}", **block_kw)(h, emb, block_skips, train=train)

        h = nn.silu(_group_norm(groups, eps, self.dtype, self.param_dtype, "conv_norm_out")(h))
        h = nn.Conv(self.out_channels, (3, 3), padding=((1, 1), (1, 1)), name="conv_out", **kw)(h)
        if return_bottleneck:
            return h.astype(x.dtype), bottleneck
        return h.astype(x.dtype)

    def _check(self, x, t, y, context):
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"DiffusersUNet2D expects x of shape [B, H, W, {self.in_channels}] (NHWC), got {x.shape}")
        factor = 2 ** (len(self.block_out_channels) - 1)
        if x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(f"H and W must be multiples of {factor} (2^(levels - 1)) for this UNet, got "
                             f"{x.shape[1]}x{x.shape[2]}")
        if jnp.shape(t) not in ((), (x.shape[0],)):
            raise ValueError(f"t must be a scalar or of shape [B] = [{x.shape[0]}], got {jnp.shape(t)}")
        if y is not None or context is not None:
            raise ValueError("this UNet2DModel is unconditional: y and context must be None")


def normalize_config(config: dict) -> dict:
    """A diffusers UNet2DModel config -> validated ``DiffusersUNet2D`` field values (tuples, defaults filled)."""
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict (a parsed config.json), got {type(config).__name__}")
    class_name = config.get("_class_name", "UNet2DModel")
    if class_name != "UNet2DModel":
        raise UnsupportedConfigError(f"_class_name is {class_name!r}: only diffusers' UNet2DModel is supported")
    own = {"dtype", "param_dtype", "timestep_scale"}
    unknown = sorted(k for k in config if not k.startswith("_") and k not in UNET2D_DEFAULTS and k not in own)
    if unknown:
        raise UnsupportedConfigError(f"unknown UNet2DModel config keys {unknown} (this port follows diffusers "
                                     "0.42's UNet2DModel)")
    c = {**UNET2D_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    problems = []

    def require(ok: bool, message: str):
        if not ok:
            problems.append(message)

    require(c["time_embedding_type"] == "positional",
            f"time_embedding_type={c['time_embedding_type']!r} (only 'positional')")
    require(c["class_embed_type"] is None and c["num_class_embeds"] is None,
            f"class conditioning (class_embed_type={c['class_embed_type']!r}, "
            f"num_class_embeds={c['num_class_embeds']!r})")
    require(c["mid_block_type"] in ("UNetMidBlock2D", None), f"mid_block_type={c['mid_block_type']!r}")
    bad = [b for b in c["down_block_types"] if _strip_unetres(b) not in DOWN_BLOCKS]
    require(not bad, f"down_block_types {bad} (supported: {list(DOWN_BLOCKS)})")
    bad = [b for b in c["up_block_types"] if _strip_unetres(b) not in UP_BLOCKS]
    require(not bad, f"up_block_types {bad} (supported: {list(UP_BLOCKS)})")
    require(c["act_fn"] in _ACTIVATIONS, f"act_fn={c['act_fn']!r} (supported: {sorted(_ACTIVATIONS)})")
    require(c["resnet_time_scale_shift"] in ("default", "scale_shift"),
            f"resnet_time_scale_shift={c['resnet_time_scale_shift']!r} (supported: 'default', 'scale_shift')")
    require(c["downsample_type"] in ("conv", "resnet", None), f"downsample_type={c['downsample_type']!r}")
    require(c["upsample_type"] in ("conv", "resnet", None), f"upsample_type={c['upsample_type']!r}")
    require(isinstance(c["norm_num_groups"], int), f"norm_num_groups={c['norm_num_groups']!r} (must be an int)")
    head = c["attention_head_dim"]
    require(head is None or isinstance(head, int), f"attention_head_dim={head!r} (an int or null)")
    if problems:
        raise UnsupportedConfigError("unsupported UNet2DModel config: " + "; ".join(problems))

    channels = tuple(int(n) for n in c["block_out_channels"])
    if not (len(c["down_block_types"]) == len(c["up_block_types"]) == len(channels) >= 1):
        raise ValueError(f"down_block_types ({len(c['down_block_types'])}), up_block_types "
                         f"({len(c['up_block_types'])}) and block_out_channels ({len(channels)}) must have one "
                         "entry per level")
    if int(c["layers_per_block"]) < 1:
        raise ValueError(f"layers_per_block must be >= 1, got {c['layers_per_block']}")
    sample_size = c["sample_size"]
    fields = dict(
        sample_size=tuple(sample_size) if isinstance(sample_size, (list, tuple)) else sample_size,
        in_channels=int(c["in_channels"]), out_channels=int(c["out_channels"]),
        center_input_sample=bool(c["center_input_sample"]), time_embedding_dim=c["time_embedding_dim"],
        freq_shift=float(c["freq_shift"]), flip_sin_to_cos=bool(c["flip_sin_to_cos"]),
        down_block_types=tuple(c["down_block_types"]), mid_block_type=c["mid_block_type"],
        up_block_types=tuple(c["up_block_types"]), block_out_channels=channels,
        layers_per_block=int(c["layers_per_block"]), mid_block_scale_factor=float(c["mid_block_scale_factor"]),
        downsample_padding=int(c["downsample_padding"]), downsample_type=c["downsample_type"] or "conv",
        upsample_type=c["upsample_type"] or "conv", dropout=float(c["dropout"]), act_fn=c["act_fn"],
        attention_head_dim=head, norm_num_groups=int(c["norm_num_groups"]),
        attn_norm_num_groups=c["attn_norm_num_groups"], norm_eps=float(c["norm_eps"]),
        resnet_time_scale_shift=c["resnet_time_scale_shift"], add_attention=bool(c["add_attention"]),
    )
    fields.update({k: config[k] for k in own if k in config})
    return fields
