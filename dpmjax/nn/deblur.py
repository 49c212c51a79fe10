"""Networks of multiscale structure-guided deblurring (Ren et al., ICCV 2023, arXiv 2212.01789): the image-conditioned
UNet (icDPM) with optional guided residual blocks, and the multiscale guidance network.

icDPM (Sec. 3.1; Whang et al. 2022's conditioning): the denoiser sees the blurry image y as extra input channels,

    eps_theta(x_t, t, y) = UNet(concat(x_t, y), t)                                                    (2)

so sampling any registered solver with ``y`` closed over (or passed as ``blurry=`` conditioning) draws from
p(x | y). With ``condition_on_blurry=False`` and x = y, t = 0 the same network is the regression baseline
x_hat = UNet(y) that the paper compares with.

Multiscale structure guidance (Sec. 3.2): for each factor f in ``guidance_factors`` (e.g. 2, 4), a small regression
network G_f reads gray(y) average-pooled by f and predicts gray(x) at that resolution; its last residual block's
output g_f is the guidance feature. The UNet encoder's residual blocks at resolution H/f become guided residual
blocks,

    h <- ResBlock(h, emb) + W_f g_f         (W_f a zero-initialised 1x1 convolution)                 (3)

and everything trains jointly on L = L_diffusion + lambda sum_f || G_f(y) - down_f(gray(x)) ||^2 (eq. 4,
``dpmjax.methods.deblur``). Departures from the paper, for CPU scale: G_f are separate small residual nets per
scale (the paper's exact widths are unpublished); the guidance enters by addition of a projection rather than a
concatenation (same expressiveness for a following convolution, no change of block widths, and the zero init
makes a guided UNet start as the unguided one); G_f predicts a residual over its own (blurry) input.

Why a wrapper and not ``dpmjax.nn.unet.UNet``: the guidance has to reach inside the encoder, which the generic UNet
has no hook for; this module reuses its ``ResBlock``, ``Downsample``, ``Upsample`` and time embedding and keeps the
same layout (``dpmjax/nn/unet.py``'s docstring), without attention (deblurring at 16-32 px does not need it).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from dpmjax.data.blur import downsample, to_grayscale
from dpmjax.nn.layers import Downsample, TimestepEmbed, Upsample, group_norm
from dpmjax.nn.unet import ResBlock

__all__ = ["PlainResBlock", "GuidanceNet", "DeblurUNet"]

Dtype = Any


class PlainResBlock(nn.Module):
    """out = x + conv(SiLU(GN(conv(SiLU(GN(x)))))): a residual block without time conditioning (guidance net)."""

    channels: int
    num_groups: int = 8

    @nn.compact
    def __call__(self, x):
        h = nn.silu(group_norm(self.channels, self.num_groups, jnp.float32, jnp.float32, name="norm_0")(x))
        h = nn.Conv(self.channels, (3, 3), name="conv_0")(h)
        h = nn.silu(group_norm(self.channels, self.num_groups, jnp.float32, jnp.float32, name="norm_1")(h))
        return x + nn.Conv(self.channels, (3, 3), name="conv_1")(h)


class GuidanceNet(nn.Module):
    """G_f of eq. (3): gray(y) pooled by ``factor`` -> conv -> ``num_blocks`` residual blocks = g_f -> structure.

    ``__call__(blurry [B, H, W, C]) -> (feature g_f [B, H/f, W/f, channels], prediction [B, H/f, W/f, 1])``; the
    prediction is the pooled gray input plus a zero-initialised residual head (a fresh net predicts "no change").
    """

    factor: int
    channels: int = 16
    num_blocks: int = 2
    num_groups: int = 8

    @nn.compact
    def __call__(self, blurry):
        gray = downsample(to_grayscale(blurry), self.factor)
        h = nn.Conv(self.channels, (3, 3), name="conv_in")(gray)
        for i in range(self.num_blocks):
            h = PlainResBlock(self.channels, self.num_groups, name=f"block_{i}")(h)
        head = nn.silu(group_norm(self.channels, self.num_groups, jnp.float32, jnp.float32, name="norm_out")(h))
        prediction = gray + nn.Conv(1, (3, 3), kernel_init=nn.initializers.zeros, name="conv_out")(head)
        return h, prediction


class DeblurUNet(nn.Module):
    """icDPM UNet (eq. 2) with guided encoder blocks (eq. 3) for each factor in ``guidance_factors``.

    ``__call__(x [B, H, W, C], t [B], blurry=None [B, H, W, C], train=False, return_guidance=False)`` -> out
    [B, H, W, out_channels or C] (and the tuple of guidance predictions, one per factor, if asked).

    Attributes:
      model_channels, channel_mult, num_res_blocks, dropout, use_scale_shift_norm, num_groups, out_channels: as
        ``dpmjax.nn.unet.UNet``.
      condition_on_blurry: True: ``blurry`` is required and concatenated to x (icDPM); False: x alone (the
        regression baseline feeds x = y, t = 0).
      guidance_factors: downsampling factors with a guidance network each; every factor must be the factor of
        an encoder level, 2^l for l < len(channel_mult). Empty: no guidance (plain icDPM).
      guidance_channels, guidance_blocks: width and depth of each G_f.
    """

    model_channels: int = 32
    channel_mult: Sequence[int] = (1, 2, 2)
    num_res_blocks: int = 1
    dropout: float = 0.0
    use_scale_shift_norm: bool = True
    num_groups: int = 8
    out_channels: int | None = None
    condition_on_blurry: bool = True
    guidance_factors: Sequence[int] = ()
    guidance_channels: int = 16
    guidance_blocks: int = 2
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def check_guidance(self) -> None:
        """Raise ``ValueError`` naming ``model.guidance_factors`` if a factor has no encoder level of its size."""
        levels = tuple(2 ** level for level in range(len(self.channel_mult)))
        bad = [f for f in self.guidance_factors if f not in levels]
        if bad:
            raise ValueError(f"model.guidance_factors {list(bad)} match no encoder level: with channel_mult="
                             f"{tuple(self.channel_mult)} the encoder runs at factors {levels}")

    def _check(self, x, blurry):
        self.check_guidance()
        if self.condition_on_blurry and blurry is None:
            raise ValueError("this DeblurUNet conditions on the blurry image (condition_on_blurry=True): pass blurry=")
        if blurry is not None and blurry.shape != x.shape:
            raise ValueError(f"blurry has shape {tuple(blurry.shape)}, the model's input x has {tuple(x.shape)}: "
                             "the blurry image must have the model's size and channel count")
        if self.guidance_factors and blurry is None:
            raise ValueError("model.guidance_factors needs the blurry image: pass blurry=")

    @nn.compact
    def __call__(self, x, t, blurry=None, train: bool = False, return_guidance: bool = False):
        self._check(x, blurry)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        batch = x.shape[0]
        t = jnp.broadcast_to(jnp.asarray(t).astype(jnp.float32), (batch,))
        emb = TimestepEmbed(4 * self.model_channels, self.model_channels, name="time_embed", **kw)(t)

        features, predictions = {}, []
        for factor in self.guidance_factors:
            feature, prediction = GuidanceNet(int(factor), self.guidance_channels, self.guidance_blocks,
                                              self.num_groups, name=f"guidance_{factor}")(blurry)
            features[int(factor)] = feature
            predictions.append(prediction)

        def res_block(h, channels, name):
            return ResBlock(channels, self.dropout, self.use_scale_shift_norm, self.num_groups, name=name,
                            **kw)(h, emb, train)

        inputs = jnp.concatenate([x, blurry], axis=-1) if self.condition_on_blurry else x
        h = nn.Conv(self.model_channels, (3, 3), name="conv_in", **kw)(inputs.astype(self.dtype))
        skips = [h]
        last = len(self.channel_mult) - 1
        for level, mult in enumerate(self.channel_mult):
            for i in range(self.num_res_blocks):
                name = f"down_{level}_{i}"
                h = res_block(h, self.model_channels * mult, name)
                if 2 ** level in features:   # guided residual block, eq. (3)
                    h = h + nn.Conv(h.shape[-1], (1, 1), kernel_init=nn.initializers.zeros,
                                    name=f"{name}_guide", **kw)(features[2 ** level].astype(self.dtype))
                skips.append(h)
            if level != last:
                h = Downsample(h.shape[-1], name=f"down_{level}_sample", **kw)(h)
                skips.append(h)

        h = res_block(h, h.shape[-1], "mid_0")
        h = res_block(h, h.shape[-1], "mid_1")
        for level in range(last, -1, -1):
            for i in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = res_block(h, self.model_channels * self.channel_mult[level], f"up_{level}_{i}")
            if level != 0:
                h = Upsample(h.shape[-1], name=f"up_{level}_sample", **kw)(h, skips[-1].shape[1:3])

        h = nn.silu(group_norm(h.shape[-1], self.num_groups, self.dtype, self.param_dtype, name="norm_out")(h))
        out = nn.Conv(self.out_channels or x.shape[-1], (3, 3), kernel_init=nn.initializers.zeros,
                      name="conv_out", **kw)(h).astype(x.dtype)
        if return_guidance:
            return out, tuple(predictions)
        return out
