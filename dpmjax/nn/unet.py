"""ADM-style UNet in flax.linen (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs", App. A / guided-diffusion).

Layout for ``channel_mult = (m_0, ..., m_{L-1})`` and base width C:

    conv_in -> for each level l: num_res_blocks x [ResBlock(C m_l) (+ attention)], then Downsample (not last)
            -> middle: ResBlock, attention, ResBlock
            -> for each level l reversed: (num_res_blocks + 1) x [concat skip, ResBlock (+ attention)],
               then Upsample (not level 0)
            -> GroupNorm, SiLU, conv_out (zero-initialised: a fresh UNet outputs 0)

Conditioning: emb = MLP(sinusoidal(t)) (+ a learned class embedding with a null class for classifier-free
guidance) enters every ResBlock as a GroupNorm scale and shift, h = GN(h) (1 + s) + b (ADM's
``use_scale_shift_norm``). A conditioning sequence ``context`` [B, L, D] enters through cross-attention
after each self-attention block (Rombach et al. 2022, Sec. 3.3). ``label_tokens = L > 0`` makes the class label
itself that sequence, as a text encoder's output is for Stable Diffusion: a learned table of num_classes + 1 rows of
L tokens of ``context_dim`` (the last row the null class), read by cross-attention only (the label then does not
enter ``emb``). ``negative_adapter=True`` adds SpeedUpNet's adapter to every cross-attention block
(``CrossAttentionBlock``); its negative sequence is the null class's tokens (label tokens) or the caller's
``negative_context``.

``wavelet_gating=True`` replaces every Downsample by ``WGDown`` (Haar DWT, sub-bands gated by a learned function of
the pooled input, summed) and every Upsample by ``WGUp`` (channels read as gated sub-bands, inverse DWT): Spectral
Diffusion's wavelet gating (Yang et al., CVPR 2023, arXiv 2211.17106; ``dpmjax.nn.wavelets``). Every downsampled
feature map then needs even sides (``check_wavelet_sizes``). The default (False) builds the same modules and parameters as
before the option existed.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from dpmjax.nn.layers import (AttentionBlock, CrossAttentionBlock, Downsample, LabelEmbed, TimestepEmbed,
                              Upsample, group_norm)
from dpmjax.nn.wavelets import WGDown, WGUp

__all__ = ["ResBlock", "UNet", "check_wavelet_sizes"]


def check_wavelet_sizes(channel_mult, height: int, width: int) -> None:
    """ValueError naming ``model.wavelet_gating`` when a feature map that a wavelet-gating block downsamples has an
    odd side (the Haar DWT halves exact 2x2 blocks): with L = len(channel_mult) levels, H and W must be divisible
    by 2^(L-1)."""
    h, w = int(height), int(width)
    for level in range(len(channel_mult) - 1):
        if h % 2 or w % 2:
            raise ValueError(f"model.wavelet_gating=True needs even feature-map sides at every downsampling; the "
                             f"{height}x{width} input is {h}x{w} at level {level} of channel_mult="
                             f"{tuple(channel_mult)}: use sides divisible by {2 ** (len(channel_mult) - 1)}, fewer "
                             f"levels, or model.wavelet_gating=False")
        h, w = h // 2, w // 2

Dtype = Any


class ResBlock(nn.Module):
    """h = conv(SiLU(GN(x))); h = GN(h) (1 + scale) + shift with (scale, shift) = Dense(SiLU(emb));
    out = skip(x) + conv_zero(dropout(SiLU(h))) (ADM ResBlock with ``use_scale_shift_norm``).

    ``use_scale_shift_norm=False`` adds Dense(SiLU(emb)) to h before the second norm instead (DDPM).
    """

    out_channels: int
    dropout: float = 0.0
    use_scale_shift_norm: bool = True
    num_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, emb, train: bool = False):
        c_in, c_out = x.shape[-1], self.out_channels
        conv = lambda name, **kw: nn.Conv(c_out, (3, 3), dtype=self.dtype, param_dtype=self.param_dtype,  # noqa: E731
                                          name=name, **kw)
        h = nn.silu(group_norm(c_in, self.num_groups, self.dtype, self.param_dtype, name="norm_in")(x))
        h = conv("conv_in")(h)
        emb_out = nn.Dense(2 * c_out if self.use_scale_shift_norm else c_out, dtype=self.dtype,
                           param_dtype=self.param_dtype, name="emb_proj")(nn.silu(emb))[:, None, None, :]
        norm_out = group_norm(c_out, self.num_groups, self.dtype, self.param_dtype, name="norm_out")
        if self.use_scale_shift_norm:
            scale, shift = jnp.split(emb_out, 2, axis=-1)
            h = norm_out(h) * (1 + scale) + shift
        else:
            h = norm_out(h + emb_out)
        h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(h))
        h = conv("conv_out", kernel_init=nn.initializers.zeros)(h)
        skip = x if c_in == c_out else nn.Conv(c_out, (1, 1), dtype=self.dtype, param_dtype=self.param_dtype,
                                               name="skip")(x)
        return skip + h


class UNet(nn.Module):
    """ADM-style UNet; ``__call__(x [B, H, W, C], t [B], y=None, context=None, train=False)`` -> [B, H, W, C'].

    The output has x's shape (``out_channels`` defaults to C) and x's dtype. What it predicts (eps, x0 or v)
    is decided by the training loss; the network does not know. ``t`` is the float timestep on the scale the
    sinusoidal embedding expects, about [0, 1000] (``dpmjax.nn.make_model_fn`` feeds 1000 (t - 1/N) for a
    DiscreteVP schedule, 1000 t for continuous ones).

    Attributes:
      model_channels: base width C; level l has C * channel_mult[l] channels.
      channel_mult: width multipliers, one per resolution level (len L gives L - 1 downsamplings).
      num_res_blocks: ResBlocks per level on the way down (up: one more, as in ADM).
      attention_resolutions: feature-map side lengths (e.g. (8, 4)) at which self-attention is applied.
      num_heads / num_head_channels: heads per attention block; num_head_channels > 0 fixes the head width.
      dropout: dropout rate inside ResBlocks (rng stream "dropout" when train=True).
      num_classes: enables class conditioning: a learned embedding of num_classes + 1 rows, the last the
        null class used for y=None, y == num_classes, and label dropout.
      label_dropout: probability of replacing a label by the null class when train=True (rng "dropout").
      context_dim: enables cross-attention to ``context`` [B, L, context_dim] after each self-attention block.
      label_tokens: L > 0: class labels become the cross-attention sequence [B, L, context_dim] (a learned token
        table with a null class, label dropout as for ``num_classes``); needs num_classes and context_dim, and
        ``context`` is then not given.
      negative_adapter: SpeedUpNet's negative-branch adapter in every cross-attention block
        (``dpmjax.methods.speedupnet``); needs cross-attention.
      mid_attention: self-attention (and cross-attention) in the middle block.
      num_groups: GroupNorm groups (reduced to a divisor of the channel count where needed).
      dtype / param_dtype: compute dtype (e.g. bfloat16) and parameter dtype (float32).
      wavelet_gating: WGDown / WGUp (``dpmjax.nn.wavelets``) instead of Downsample / Upsample (Spectral Diffusion);
        the modules keep their names (``down_{l}_sample``, ``up_{l}_sample``) with other parameters inside.

    ``return_bottleneck=True`` (a call argument, default False; no parameters change) also returns the middle
    block's output [B, H / 2^(L-1), W / 2^(L-1), C m_{L-1}], e.g. for DMD2's GAN head on the fake score network.
    """

    model_channels: int = 32
    channel_mult: Sequence[int] = (1, 2)
    num_res_blocks: int = 1
    attention_resolutions: Sequence[int] = ()
    num_heads: int = 1
    num_head_channels: int = -1
    dropout: float = 0.0
    num_classes: int | None = None
    label_dropout: float = 0.0
    context_dim: int | None = None
    mid_attention: bool = True
    use_scale_shift_norm: bool = True
    num_groups: int = 32
    out_channels: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    wavelet_gating: bool = False
    label_tokens: int = 0
    negative_adapter: bool = False

    def check_conditioning(self) -> None:
        """ValueError naming the option for conditioning settings that cannot work together (no input needed)."""
        cross_attends = self.context_dim is not None and (bool(self.attention_resolutions) or self.mid_attention)
        if self.negative_adapter and not cross_attends:
            raise ValueError("model.negative_adapter (SpeedUpNet) needs cross-attention: set model.context_dim and "
                             "apply attention somewhere (model.attention_resolutions or model.mid_attention=True)")
        if self.label_tokens:
            if self.label_tokens < 0 or self.num_classes is None or not cross_attends:
                raise ValueError(f"model.label_tokens={self.label_tokens} (labels as a cross-attention sequence) "
                                 "needs model.num_classes, model.context_dim and attention somewhere "
                                 "(model.attention_resolutions or model.mid_attention=True)")

    def _check(self, x, t, y, context, negative_context):
        if x.ndim != 4:
            raise ValueError(f"UNet expects x of shape [B, H, W, C], got {x.shape}")
        if self.wavelet_gating:
            check_wavelet_sizes(self.channel_mult, x.shape[1], x.shape[2])
        if not self.channel_mult or self.num_res_blocks < 1 or self.model_channels < 1:
            raise ValueError(f"UNet needs a non-empty channel_mult, num_res_blocks >= 1 and model_channels >= 1; "
                             f"got {tuple(self.channel_mult)}, {self.num_res_blocks}, {self.model_channels}")
        if t.shape not in ((), (x.shape[0],)):
            raise ValueError(f"t must be a scalar or of shape [B] = [{x.shape[0]}], got {t.shape}")
        if y is not None and self.num_classes is None:
            raise ValueError("class labels y were given but the UNet was built with num_classes=None")
        if self.context_dim is None and context is not None:
            raise ValueError("context was given but the UNet was built with context_dim=None (no cross-attention)")
        self.check_conditioning()
        if self.label_tokens:
            if context is not None or negative_context is not None:
                raise ValueError("this UNet reads its labels as the cross-attention sequence (label_tokens): give y, "
                                 "not context / negative_context")
        elif self.context_dim is not None:
            if context is None or context.ndim != 3 or context.shape[0] != x.shape[0] \
                    or context.shape[-1] != self.context_dim:
                raise ValueError(f"this UNet cross-attends: context must have shape [B={x.shape[0]}, L, "
                                 f"{self.context_dim}], got {None if context is None else context.shape}")
            if not self.attention_resolutions and not self.mid_attention:
                raise ValueError("context_dim is set but no attention is applied anywhere: set "
                                 "attention_resolutions or mid_attention=True")
            if self.negative_adapter and (negative_context is None or negative_context.ndim != 3
                                          or negative_context.shape[0] != x.shape[0]
                                          or negative_context.shape[-1] != self.context_dim):
                raise ValueError(f"this UNet has a SpeedUpNet adapter: negative_context must have shape "
                                 f"[B={x.shape[0]}, L', {self.context_dim}], got "
                                 f"{None if negative_context is None else negative_context.shape}")
        if negative_context is not None and not self.negative_adapter:
            raise ValueError("negative_context was given but the UNet has no SpeedUpNet adapter (negative_adapter)")

    @nn.compact
    def __call__(self, x, t, y=None, context=None, train: bool = False, return_bottleneck: bool = False,
                 negative_context=None):
        t = jnp.asarray(t)
        self._check(x, t, y, context, negative_context)
        batch = x.shape[0]
        t = jnp.broadcast_to(t.astype(jnp.float32), (batch,))
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        emb_dim = 4 * self.model_channels
        emb = TimestepEmbed(emb_dim, self.model_channels, name="time_embed", **kw)(t)
        if self.label_tokens:  # the label is the cross-attention sequence (and the null row the negative one)
            tokens = LabelEmbed(self.num_classes, self.label_tokens * self.context_dim, self.label_dropout,
                                name="label_tokens", **kw)
            context = tokens(y, batch, train).reshape(batch, self.label_tokens, self.context_dim)
            if self.negative_adapter:
                negative_context = tokens(None, batch).reshape(batch, self.label_tokens, self.context_dim)
        elif self.num_classes is not None:
            emb = emb + LabelEmbed(self.num_classes, emb_dim, self.label_dropout, name="label_embed",
                                   **kw)(y, batch, train)
        if context is not None:
            context = context.astype(self.dtype)
        if negative_context is not None:
            negative_context = negative_context.astype(self.dtype)

        def res_block(h, channels, name):
            return ResBlock(channels, self.dropout, self.use_scale_shift_norm, self.num_groups, name=name,
                            **kw)(h, emb, train)

        def attend(h, name, force=False):
            if not force and h.shape[1] not in self.attention_resolutions:
                return h
            heads = dict(num_heads=self.num_heads, num_head_channels=self.num_head_channels,
                         num_groups=self.num_groups, **kw)
            h = AttentionBlock(name=f"{name}_attn", **heads)(h)
            if self.context_dim is not None:
                h = CrossAttentionBlock(name=f"{name}_xattn", negative_adapter=self.negative_adapter,
                                        **heads)(h, context, negative_context)
            return h

        h = nn.Conv(self.model_channels, (3, 3), name="conv_in", **kw)(x.astype(self.dtype))
        skips = [h]
        last = len(self.channel_mult) - 1
        for level, mult in enumerate(self.channel_mult):
            for i in range(self.num_res_blocks):
                name = f"down_{level}_{i}"
                h = attend(res_block(h, self.model_channels * mult, name), name)
                skips.append(h)
            if level != last:
                down = WGDown if self.wavelet_gating else Downsample
                h = down(h.shape[-1], name=f"down_{level}_sample", **kw)(h)
                skips.append(h)

        h = res_block(h, h.shape[-1], "mid_0")
        if self.mid_attention:
            h = attend(h, "mid", force=True)
        h = res_block(h, h.shape[-1], "mid_1")
        bottleneck = h

        for level in range(last, -1, -1):
            for i in range(self.num_res_blocks + 1):
                name = f"up_{level}_{i}"
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = attend(res_block(h, self.model_channels * self.channel_mult[level], name), name)
            if level != 0:
                if self.wavelet_gating:
                    h = WGUp(h.shape[-1], name=f"up_{level}_sample", **kw)(h)
                else:
                    h = Upsample(h.shape[-1], name=f"up_{level}_sample", **kw)(h, skips[-1].shape[1:3])

        h = nn.silu(group_norm(h.shape[-1], self.num_groups, self.dtype, self.param_dtype, name="norm_out")(h))
        out = nn.Conv(self.out_channels or x.shape[-1], (3, 3), kernel_init=nn.initializers.zeros,
                      name="conv_out", **kw)(h)
        if return_bottleneck:
            return out.astype(x.dtype), bottleneck
        return out.astype(x.dtype)
