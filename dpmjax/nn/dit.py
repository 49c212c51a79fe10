"""DiT: a diffusion transformer over image patches with adaLN-Zero conditioning (Peebles & Xie 2023).

    x [B, H, W, C] -> patchify (p x p conv, stride p) + fixed 2-d sin-cos positions -> tokens [B, N, D]
    c = MLP(sinusoidal(t)) + label embedding (with a null class)
    depth x DiTBlock: (shift, scale, gate) x 2 = Dense_zero(SiLU(c));
        x = x + gate_1 * Attn(LN(x) (1 + scale_1) + shift_1)
        x = x + gate_2 * MLP (LN(x) (1 + scale_2) + shift_2)
    final: LN(x) (1 + scale) + shift -> Dense_zero(p p C) -> unpatchify -> [B, H, W, C]

adaLN-Zero (paper Sec. 3.2): the modulation Dense layers start at zero, so every block starts as the
identity and a fresh DiT outputs 0. Unlike the paper's learn_sigma option, the output has x's channel count.

Early-exit heads (``exit_blocks``; ``dpmjax.methods.early_exit``, GO-LSD-style layer self-distillation after
D-FINE, Peng et al. 2025): after block k (k in ``exit_blocks``, 1 <= k < depth) a head of the final layer's form,
with its own params ``exit_{k}_adaLN`` / ``exit_{k}_linear``, predicts the output from the first k blocks:

    out_k = Dense_k(LN(x_k) (1 + scale_k) + shift_k),   (shift_k, scale_k) = Dense_k(SiLU(c))

``__call__(..., exit_at=k)`` runs blocks [0, k) and head k (``exit_at=depth`` or None: the full model);
``return_exits=True`` runs the full model once and returns (final output, {k: out_k}) (training the heads).
``init`` always runs the full depth and every head (it creates all params) whatever ``exit_at`` says.
``exit_schedule`` = ((threshold, k), ...) makes a plain call pick the depth by the time input: a sample at network
time t runs depth(t) = min({k : t > threshold} | {depth}) blocks (``exit_depth``), so ``dpmjax sample`` on such a
model exits early at high noise without any sampler change. With ``exit_schedule=()`` and ``exit_at=None`` the
call is the unmodified DiT, op for op (old checkpoints load and sample as before).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from dpmjax.nn.layers import (LabelEmbed, TimestepEmbed, attention_heads, dot_product_attention, layer_norm,
                              sincos_pos_embed_2d)

__all__ = ["DiTBlock", "DiT", "exit_depth", "block_evaluations", "check_exits"]

Dtype = Any

_xavier = nn.initializers.xavier_uniform()


def _modulate(x, shift, scale):
    """LN(x) (1 + scale) + shift with per-sample [B, D] shift and scale over tokens [B, N, D]."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


def _output_head(tokens, c, prefix, d, p, out_channels, kw):
    """The final layer's form: LN(x) (1 + scale) + shift -> Dense_zero(p p C), params ``{prefix}_adaLN`` and
    ``{prefix}_linear`` (``final_*`` is the full model's head, ``exit_{k}_*`` the exit heads)."""
    shift, scale = jnp.split(nn.Dense(2 * d, kernel_init=nn.initializers.zeros, name=f"{prefix}_adaLN", **kw)(
        nn.silu(c)), 2, axis=-1)
    tokens = _modulate(layer_norm(kw["dtype"], kw["param_dtype"], f"{prefix}_norm", affine=False)(tokens), shift,
                       scale)
    return nn.Dense(p * p * out_channels, kernel_init=nn.initializers.zeros, name=f"{prefix}_linear", **kw)(tokens)


def check_exits(depth: int, exit_blocks=(), exit_schedule=(), *, name: str = "model") -> None:
    """ValueError naming ``{name}.exit_blocks`` / ``{name}.exit_schedule``: exit blocks must be distinct ints in
    [1, depth - 1] and every scheduled exit one of them, with a finite threshold."""
    blocks = tuple(exit_blocks)
    for k in blocks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= depth - 1:
            raise ValueError(f"{name}.exit_blocks={list(blocks)}: every exit block must be an int in [1, depth - 1] "
                             f"= [1, {depth - 1}] (the DiT has depth {depth}), got {k!r}")
    if len(set(blocks)) != len(blocks):
        raise ValueError(f"{name}.exit_blocks={list(blocks)} repeats a block")
    for entry in exit_schedule:
        if len(entry) != 2:
            raise ValueError(f"{name}.exit_schedule entries are (threshold, exit_block) pairs, got {entry!r}")
        threshold, k = entry
        if k not in blocks:
            raise ValueError(f"{name}.exit_schedule exits at block {k!r}, which is not in {name}.exit_blocks="
                             f"{list(blocks)}")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not np.isfinite(threshold):
            raise ValueError(f"{name}.exit_schedule threshold {threshold!r} must be a finite number")


def exit_depth(exit_schedule, depth: int, t):
    """Blocks a sample at network time ``t`` runs: depth(t) = min({k : t > threshold_k} | {depth}), int32 like t."""
    t = jnp.asarray(t)
    used = jnp.full(t.shape, depth, jnp.int32)
    for threshold, k in exit_schedule:
        used = jnp.where(t > threshold, jnp.minimum(used, k), used)
    return used


def block_evaluations(exit_schedule, depth: int, times) -> int:
    """Transformer blocks evaluated by one sample over model calls at network times ``times`` (one per NFE):
    sum_i depth(t_i) (``exit_depth``); the full model gives NFE x depth. Heads (one LN + Dense) are not counted."""
    return int(np.sum(np.asarray(exit_depth(exit_schedule, depth, np.asarray(times, np.float32)))))


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
      exit_blocks: block counts k (1 <= k < depth) after which an exit head predicts the output (module docstring).
      exit_schedule: ((threshold, k), ...) on the network's time scale: a plain call runs ``exit_depth(t)`` blocks
        per sample (blocks no sample of the batch needs are skipped by ``nn.cond``; when the batch shares one t,
        as in the samplers, the whole batch exits at that depth). Empty: always the full model.
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
    exit_blocks: tuple = ()
    exit_schedule: tuple = ()
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, t, y=None, context=None, train: bool = False, exit_at: int | None = None,
                 return_exits: bool = False):
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
        exit_blocks = tuple(int(k) for k in self.exit_blocks)
        schedule = tuple((float(th), int(k)) for th, k in self.exit_schedule)
        check_exits(self.depth, exit_blocks, schedule)
        if exit_at is not None and exit_at != self.depth and exit_at not in exit_blocks:
            raise ValueError(f"exit_at={exit_at!r}: the DiT has exit heads after blocks {list(exit_blocks)} and "
                             f"depth {self.depth} (exit_at=None or {self.depth} is the full model)")
        if return_exits and (exit_at is not None or not exit_blocks):
            raise ValueError("return_exits=True needs exit_blocks and the full depth (exit_at=None)")
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

        head = lambda tokens, prefix: _output_head(tokens, c, prefix, d, p, out_channels, kw)  # noqa: E731
        initializing = self.is_initializing()
        exits = {}
        if exit_at is not None or not schedule or initializing or return_exits:
            stop = self.depth if exit_at is None or initializing else int(exit_at)
            for i in range(stop):
                tokens = DiTBlock(self.num_heads, self.mlp_ratio, name=f"block_{i}", **kw)(tokens, c)
                if (initializing or return_exits) and i + 1 in exit_blocks:  # init creates every head's params
                    exits[i + 1] = head(tokens, f"exit_{i + 1}")
            patches = head(tokens, "final" if stop == self.depth else f"exit_{stop}")
        else:
            patches = self._scheduled(tokens, c, t, schedule, head, kw)

        def unpatchify(patches):
            out = patches.reshape(b, gh, gw, p, p, out_channels).transpose(0, 1, 3, 2, 4, 5)
            return out.reshape(b, height, width, out_channels).astype(x.dtype)

        if return_exits:  # one pass, for training the heads: (final output, {k: exit k's output})
            return unpatchify(patches), {k: unpatchify(v) for k, v in exits.items()}
        return unpatchify(patches)

    def _scheduled(self, tokens, c, t, schedule, head, kw):
        """Blocks and head by ``exit_depth`` of each sample's t: block i runs (``nn.cond``) only when some sample
        needs it, and a sample past its exit keeps its tokens (``where``); each sample takes its own head."""
        used = exit_depth(schedule, self.depth, t)                        # [B] blocks per sample
        first = min(k for _, k in schedule)
        for i in range(self.depth):
            block = DiTBlock(self.num_heads, self.mlp_ratio, name=f"block_{i}", **kw)
            if i < first:
                tokens = block(tokens, c)
                continue
            keep = (used > i)[:, None, None]

            def run(module, tokens, c, keep=keep):
                return jnp.where(keep, module(tokens, c), tokens)

            tokens = nn.cond(jnp.any(used > i), run, lambda module, tokens, c: tokens, block, tokens, c)
        exits = sorted({k for _, k in schedule})
        patches = head(tokens, "final")
        for k in exits:  # heads are one LN + Dense: evaluate each scheduled one and select per sample
            patches = jnp.where((used == k)[:, None, None], head(tokens, f"exit_{k}"), patches)
        return patches
