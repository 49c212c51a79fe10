"""Building blocks shared by the UNet and the DiT (flax.linen).

Every module takes ``dtype`` (the compute dtype, e.g. ``jnp.bfloat16``) and ``param_dtype`` (the storage
dtype of its parameters, float32 by default). Reductions that lose accuracy in bfloat16 (normalisation
statistics, attention softmax) are computed in float32 and cast back.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "timestep_embedding", "TimestepEmbed", "LabelEmbed", "drop_labels", "num_groups_for", "group_norm", "layer_norm",
    "dot_product_attention", "AttentionBlock", "CrossAttentionBlock", "Downsample", "Upsample",
    "sincos_pos_embed_2d", "attention_heads",
]

Dtype = Any


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
    """Sinusoidal embedding of (float) timesteps, [B] -> [B, dim] float32 (Vaswani et al. 2017; ADM).

    emb = [cos(t w_0..w_{h-1}), sin(t w_0..w_{h-1})] with w_i = max_period^(-i/h), h = dim // 2; an odd
    ``dim`` gets one zero column. The frequencies assume timesteps on a scale of about [0, 1000].
    """
    if dim < 2:
        raise ValueError(f"timestep embedding dim must be >= 2, got {dim}")
    t = jnp.asarray(t, jnp.float32)
    half = dim // 2
    freqs = jnp.asarray(np.exp(-math.log(max_period) * np.arange(half) / half), jnp.float32)
    args = t[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


class TimestepEmbed(nn.Module):
    """t [B] -> sinusoidal(freq_dim) -> Dense(features) -> SiLU -> Dense(features): [B, features]."""

    features: int
    freq_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, t):
        emb = timestep_embedding(t, self.freq_dim)
        dense = lambda name: nn.Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype,  # noqa: E731
                                      kernel_init=self.kernel_init, name=name)
        return dense("dense_1")(nn.silu(dense("dense_0")(emb)))


def drop_labels(key, y, rate: float, null_label: int):
    """Replace each label by ``null_label`` with probability ``rate`` (label dropout for classifier-free
    guidance, Ho & Salimans 2022, Alg. 1). A pure function a trainer can call itself; [B] int -> [B] int."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"label dropout rate must lie in [0, 1], got {rate}")
    y = jnp.asarray(y)
    drop = jax.random.bernoulli(key, rate, y.shape)
    return jnp.where(drop, jnp.asarray(null_label, y.dtype), y)


class LabelEmbed(nn.Module):
    """Class labels [B] -> embeddings [B, features], with a learned null class (index ``num_classes``).

    ``y=None`` embeds the null class for the whole batch (unconditional model); ``y == num_classes`` does so
    per sample. With ``train=True`` and ``dropout > 0`` labels are dropped to the null class with that
    probability, using the ``"dropout"`` rng stream (pass ``rngs={"dropout": key}`` to ``apply``).
    """

    num_classes: int
    features: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    embedding_init: Any = nn.initializers.normal(1.0)

    @nn.compact
    def __call__(self, y, batch: int, train: bool = False):
        if not 0.0 <= self.dropout <= 1.0:
            raise ValueError(f"label_dropout must lie in [0, 1], got {self.dropout}")
        if y is None:
            y = jnp.full((batch,), self.num_classes, jnp.int32)
        y = jnp.asarray(y)
        if not jnp.issubdtype(y.dtype, jnp.integer):
            raise ValueError(f"class labels y must be integers, got dtype {y.dtype}")
        y = jnp.broadcast_to(y, (batch,))
        if train and self.dropout > 0.0:
            y = drop_labels(self.make_rng("dropout"), y, self.dropout, self.num_classes)
        table = nn.Embed(self.num_classes + 1, self.features, dtype=self.dtype, param_dtype=self.param_dtype,
                         embedding_init=self.embedding_init, name="embedding")
        return table(y)


def num_groups_for(channels: int, max_groups: int) -> int:
    """The largest group count <= ``max_groups`` that divides ``channels`` (GroupNorm needs a divisor)."""
    for g in range(min(max_groups, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


def group_norm(channels: int, max_groups: int, dtype, param_dtype, name=None, epsilon: float = 1e-5):
    """GroupNorm with a group count that divides ``channels``, normalising in float32, output in ``dtype``.

    Returns a callable x -> GN(x). The norm runs with dtype float32 and its output is cast to ``dtype``:
    flax promotes the module dtype with float32 for its statistics, which strict dtype promotion refuses
    for bfloat16.
    """
    norm = nn.GroupNorm(num_groups=num_groups_for(channels, max_groups), epsilon=epsilon, dtype=jnp.float32,
                        param_dtype=param_dtype, name=name)
    return lambda x: norm(x.astype(jnp.float32)).astype(dtype)


def layer_norm(dtype, param_dtype, name=None, epsilon: float = 1e-6, affine: bool = True):
    """LayerNorm over the last axis in float32 (see ``group_norm``), output in ``dtype``; ``affine=False``
    drops the learned scale and bias (adaLN supplies them)."""
    norm = nn.LayerNorm(epsilon=epsilon, use_scale=affine, use_bias=affine, dtype=jnp.float32,
                        param_dtype=param_dtype, name=name)
    return lambda x: norm(x.astype(jnp.float32)).astype(dtype)


def dot_product_attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v for q [B, Lq, H, d], k, v [B, Lk, H, d]; softmax in float32."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * scale
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def attention_heads(channels: int, num_heads: int, num_head_channels: int) -> int:
    """ADM's head rule: ``num_head_channels > 0`` fixes the head width, else ``num_heads`` heads."""
    heads = channels // num_head_channels if num_head_channels > 0 else num_heads
    if heads < 1 or channels % heads:
        raise ValueError(f"attention over {channels} channels: num_heads={num_heads} / num_head_channels="
                         f"{num_head_channels} must split the channels evenly")
    return heads


class AttentionBlock(nn.Module):
    """Spatial self-attention with a residual: x + proj(attn(GroupNorm(x))), x [B, H, W, C] (ADM).

    The output projection starts at zero, so a fresh block is the identity.
    """

    num_heads: int = 1
    num_head_channels: int = -1
    num_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        heads = attention_heads(c, self.num_heads, self.num_head_channels)
        tokens = group_norm(c, self.num_groups, self.dtype, self.param_dtype, name="norm")(x).reshape(b, h * w, c)
        qkv = nn.Dense(3 * c, dtype=self.dtype, param_dtype=self.param_dtype, name="qkv")(tokens)
        q, k, v = jnp.split(qkv.reshape(b, h * w, 3, heads, c // heads), 3, axis=2)
        out = dot_product_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0]).reshape(b, h * w, c)
        out = nn.Dense(c, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=nn.initializers.zeros,
                       name="proj_out")(out)
        return x + out.reshape(b, h, w, c)


class CrossAttentionBlock(nn.Module):
    """x + proj(attn(q = GroupNorm(x), k = v = LayerNorm(context))), x [B, H, W, C], context [B, L, D].

    Queries come from the feature map, keys and values from the conditioning sequence (Rombach et al. 2022,
    Sec. 3.3). Zero-initialised output projection.

    ``negative_adapter=True`` adds SpeedUpNet's adapter (Chai et al., arXiv 2312.08887, Sec. 3.2;
    ``dpmjax.methods.speedupnet``): the negative (unconditional) sequence ``negative_context`` [B, L', D] goes
    through the adapter's own projections ``k_neg`` / ``v_neg`` with the shared queries, its output is rescaled to
    the positive branch's L2 norm ("attention normalisation") and a per-channel affine, and subtracted:

        h_pos = attn(q, k(ctx), v(ctx)),   h_neg = attn(q, k_neg(ctx_neg), v_neg(ctx_neg))
        h     = h_pos - (alpha * (|h_pos| / |h_neg|) h_neg + beta),        out = x + proj(h)

    so one pass can carry classifier-free guidance's offset. Norms are per sample (over tokens and channels); the
    official ``SUNAttnProcessor`` takes them over the whole batch tensor, which makes a sample depend on its batch
    mates. alpha and beta start at 0 (the official code: alpha = 1), so a fresh adapter leaves the block unchanged
    and training starts from the conditional network exactly.
    """

    num_heads: int = 1
    num_head_channels: int = -1
    num_groups: int = 32
    negative_adapter: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context, negative_context=None):
        b, h, w, c = x.shape
        heads = attention_heads(c, self.num_heads, self.num_head_channels)
        dense = lambda name, **kw: nn.Dense(c, dtype=self.dtype, param_dtype=self.param_dtype,  # noqa: E731
                                            name=name, **kw)
        queries = group_norm(c, self.num_groups, self.dtype, self.param_dtype, name="norm")(x)
        context_norm = layer_norm(self.dtype, self.param_dtype, name="context_norm", epsilon=1e-5)
        ctx = context_norm(context)
        q = dense("q")(queries.reshape(b, h * w, c)).reshape(b, h * w, heads, c // heads)

        def attend(keys, values, sequence):
            k = dense(keys)(sequence).reshape(b, sequence.shape[1], heads, c // heads)
            v = dense(values)(sequence).reshape(b, sequence.shape[1], heads, c // heads)
            return dot_product_attention(q, k, v).reshape(b, h * w, c)

        out = attend("k", "v", ctx)
        if self.negative_adapter:
            if negative_context is None:
                raise ValueError("this cross-attention block has a SpeedUpNet adapter (negative_adapter=True): "
                                 "give negative_context [B, L', D]")
            negative = attend("k_neg", "v_neg", context_norm(negative_context))
            scale = (jnp.sqrt(jnp.sum(jnp.square(out.astype(jnp.float32)), axis=(1, 2), keepdims=True))
                     / (jnp.sqrt(jnp.sum(jnp.square(negative.astype(jnp.float32)), axis=(1, 2), keepdims=True))
                        + 1e-6))
            alpha = self.param("neg_alpha", nn.initializers.zeros, (c,), self.param_dtype)
            beta = self.param("neg_beta", nn.initializers.zeros, (c,), self.param_dtype)
            out = out - (alpha * (scale * negative.astype(jnp.float32)) + beta).astype(out.dtype)
        out = dense("proj_out", kernel_init=nn.initializers.zeros)(out)
        return x + out.reshape(b, h, w, c)


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 convolution (odd sizes round up: 7 -> 4)."""

    channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return nn.Conv(self.channels, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), dtype=self.dtype,
                       param_dtype=self.param_dtype, name="conv")(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling to ``size`` (H, W) (2x, or the skip's size for odd inputs), then a 3x3 conv."""

    channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, size: tuple[int, int]):
        b, h, w, c = x.shape
        if size == (2 * h, 2 * w):
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        else:
            x = jax.image.resize(x, (b, size[0], size[1], c), method="nearest")
        return nn.Conv(self.channels, (3, 3), dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x)


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """Fixed 2-d sine-cosine position embedding [grid_h * grid_w, dim] (MAE / DiT); row-major tokens.

    Half the channels encode the row, half the column, each as [sin(p w), cos(p w)] with w_i = 10000^(-i/(d/4)).
    """
    if dim % 4:
        raise ValueError(f"2-d sin-cos position embedding needs dim divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (np.arange(quarter, dtype=np.float64) / quarter)
    rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64),
                             indexing="ij")

    def encode(pos):
        angles = pos.reshape(-1)[:, None] * omega[None, :]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([encode(rows), encode(cols)], axis=1).astype(np.float32)
