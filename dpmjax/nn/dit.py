"""DiT: a diffusion transformer over image patches with adaLN-Zero conditioning (Peebles & Xie 2023).

    x [B, H, W, C] -> patchify (p x p conv, stride p) + fixed 2-d sin-cos positions -> tokens [B, N, D]
    c = MLP(sinusoidal(t)) + label embedding (with a null class)
    depth x DiTBlock: (shift, scale, gate) x 2 = Dense_zero(SiLU(c));
        x = x + gate_1 * Attn(LN(x) (1 + scale_1) + shift_1)
        x = x + gate_2 * MLP (LN(x) (1 + scale_2) + shift_2)
    final: LN(x) (1 + scale) + shift -> Dense_zero(p p C) -> unpatchify -> [B, H, W, C]

adaLN-Zero (paper Sec. 3.2): the modulation Dense layers start at zero, so every block starts as the
identity and a fresh DiT outputs 0. Unlike the paper's learn_sigma option, the output has x's channel count.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from dpmjax.nn.layers import (LabelEmbed, TimestepEmbed, attention_heads, dot_product_attention, layer_norm,
                              sincos_pos_embed_2d)

__all__ = ["DiTBlock", "DiT"]

Dtype = Any

_xavier = nn.initializers.xavier_uniform()


def _modulate(x, shift, scale):
    """LN(x) (1 + scale) + shift with per-sample [B, D] shift and scale over tokens [B, N, D]."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


class DiTBlock(nn.Module):
    """One transformer block with adaLN-Zero conditioning on c [B, D] (DiT, Fig. 3)."""

    num_heads: int
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, c):
        b, n, d = x.shape
        heads = attention_heads(d, self.num_heads, -1)
        dense = lambda features, name, init=_xavier: nn.Dense(  # noqa: E731
            features, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=init, name=name)
        mod = dense(6 * d, "adaLN", nn.initializers.zeros)(nn.silu(c))
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = jnp.split(mod, 6, axis=-1)

        h = _modulate(layer_norm(self.dtype, self.param_dtype, "norm_attn", affine=False)(x), shift_a, scale_a)
        q, k, v = jnp.split(dense(3 * d, "qkv")(h).reshape(b, n, 3, heads, d // heads), 3, axis=2)
        h = dot_product_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0]).reshape(b, n, d)
        x = x + gate_a[:, None, :] * dense(d, "proj")(h)

        h = _modulate(layer_norm(self.dtype, self.param_dtype, "norm_mlp", affine=False)(x), shift_m, scale_m)
        h = dense(d, "mlp_out")(nn.gelu(dense(int(d * self.mlp_ratio), "mlp_in")(h), approximate=True))
        return x + gate_m[:, None, :] * h


class DiT(nn.Module):
    """Diffusion transformer; ``__call__(x [B, H, W, C], t [B], y=None, context=None, train=False)`` -> x's shape.

    ``t`` is the float timestep on the scale of about [0, 1000] (see ``dpmjax.nn.make_model_fn``). What it
    predicts (eps, x0 or v) is a training choice. H and W must be multiples of ``patch_size``.

    Attributes:
      patch_size: p; the sequence has (H / p) (W / p) tokens.
      hidden_size: token width D (a multiple of 4 and of num_heads).
      depth / num_heads / mlp_ratio: transformer size.
      num_classes: enables class conditioning (embedding table of num_classes + 1 rows, the last the null
        class for y=None, y == num_classes and label dropout).
      label_dropout: probability of dropping a label to the null class when train=True (rng "dropout").
      freq_dim: width of the sinusoidal timestep features (DiT uses 256).
      out_channels: defaults to C.
      dtype / param_dtype: compute and parameter dtypes.
    """

    patch_size: int = 2
    hidden_size: int = 64
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    num_classes: int | None = None
    label_dropout: float = 0.0
    freq_dim: int = 256
    out_channels: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, t, y=None, context=None, train: bool = False):
        if x.ndim != 4:
            raise ValueError(f"DiT expects x of shape [B, H, W, C], got {x.shape}")
        b, height, width, channels = x.shape
        p = self.patch_size
        if p < 1 or height % p or width % p:
            raise ValueError(f"image size {height}x{width} must be a multiple of patch_size={p}")
        if context is not None:
            raise ValueError("DiT has no cross-attention: context must be None")
        if y is not None and self.num_classes is None:
            raise ValueError("class labels y were given but the DiT was built with num_classes=None")
        t = jnp.asarray(t)
        if t.shape not in ((), (b,)):
            raise ValueError(f"t must be a scalar or of shape [B] = [{b}], got {t.shape}")
        t = jnp.broadcast_to(t.astype(jnp.float32), (b,))
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        d, gh, gw = self.hidden_size, height // p, width // p
        out_channels = self.out_channels or channels

        tokens = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", kernel_init=_xavier, name="patch_embed",
                         **kw)(x.astype(self.dtype)).reshape(b, gh * gw, d)
        tokens = tokens + jnp.asarray(sincos_pos_embed_2d(d, gh, gw), self.dtype)[None]

        c = TimestepEmbed(d, self.freq_dim, kernel_init=nn.initializers.normal(0.02), name="time_embed", **kw)(t)
        if self.num_classes is not None:
            c = c + LabelEmbed(self.num_classes, d, self.label_dropout, embedding_init=nn.initializers.normal(0.02),
                               name="label_embed", **kw)(y, b, train)

        for i in range(self.depth):
            tokens = DiTBlock(self.num_heads, self.mlp_ratio, name=f"block_{i}", **kw)(tokens, c)

        shift, scale = jnp.split(nn.Dense(2 * d, kernel_init=nn.initializers.zeros, name="final_adaLN", **kw)(
            nn.silu(c)), 2, axis=-1)
        tokens = _modulate(layer_norm(self.dtype, self.param_dtype, "final_norm", affine=False)(tokens), shift, scale)
        patches = nn.Dense(p * p * out_channels, kernel_init=nn.initializers.zeros, name="final_linear",
                           **kw)(tokens)
        out = patches.reshape(b, gh, gw, p, p, out_channels).transpose(0, 1, 3, 2, 4, 5)
        return out.reshape(b, height, width, out_channels).astype(x.dtype)
