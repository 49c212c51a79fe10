"""The 2D Haar wavelet transform of NHWC feature maps in ``jnp`` (one level), its inverse, and the wavelet-gating
blocks of Spectral Diffusion.

    ll, lh, hl, hh = haar_dwt(x)        # each [B, H/2, W/2, C]
    x = haar_idwt(ll, lh, hl, hh)       # [B, H, W, C], exact inverse
    y = WGDown(channels)(x)             # [B, H/2, W/2, channels]: gated sum of the sub-bands
    y = WGUp(channels)(x)               # [B, 2H, 2W, channels]: gated coefficients -> IDWT

Used by DomainStudio's high-frequency terms (``dpmjax.methods.domainstudio``) and by the UNet's
``wavelet_gating`` option (``dpmjax.nn.unet``; ``dpmjax.methods.spectral_distill``). The level-1 Haar transform is a
reshape and four sums, so no wavelet package is needed (jaxwt 0.1.1, last released 2024-02, would add a
dependency and its own padding conventions for these lines); ``tests/test_domainstudio.py`` checks it against
the official DomainStudio filters as a stride-2 depthwise convolution, ``tests/test_spectral.py`` the inverse.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

__all__ = ["haar_dwt", "haar_idwt", "WGDown", "WGUp", "wavelet_gates"]


def haar_dwt(x):
    """One level of the 2D Haar DWT of [B, H, W, C] images (H, W even): (LL, LH, HL, HH), each [B, H/2, W/2, C].

    With a, b the top-left / top-right and c, d the bottom-left / bottom-right pixels of each 2x2 block:
    LL = (a + b + c + d) / 2, LH = (-a + b - c + d) / 2, HL = (-a - b + c + d) / 2, HH = (a - b - c + d) / 2
    (the official filters L^T L, L^T H, H^T L, H^T H with L = [1, 1]/sqrt2, H = [-1, 1]/sqrt2, stride 2).
    """
    batch, height, width, channels = x.shape
    if height % 2 or width % 2:
        raise ValueError(f"the Haar DWT needs even image sides, got {height}x{width}")
    blocks = x.reshape(batch, height // 2, 2, width // 2, 2, channels)
    a, b = blocks[:, :, 0, :, 0], blocks[:, :, 0, :, 1]
    c, d = blocks[:, :, 1, :, 0], blocks[:, :, 1, :, 1]
    return (a + b + c + d) / 2, (-a + b - c + d) / 2, (-a - b + c + d) / 2, (a - b - c + d) / 2


def haar_idwt(ll, lh, hl, hh):
    """The inverse of ``haar_dwt``: four [B, h, w, C] sub-bands -> [B, 2h, 2w, C].

    The Haar analysis matrix is orthonormal and symmetric, so it is its own inverse:
    a = (LL - LH - HL + HH) / 2, b = (LL + LH - HL - HH) / 2, c = (LL - LH + HL - HH) / 2, d = (LL + LH + HL + HH) / 2.
    """
    shapes = {tuple(band.shape) for band in (ll, lh, hl, hh)}
    if len(shapes) != 1 or ll.ndim != 4:
        raise ValueError(f"haar_idwt needs four sub-bands of one shape [B, h, w, C], got {sorted(shapes)}")
    a = (ll - lh - hl + hh) / 2
    b = (ll + lh - hl - hh) / 2
    c = (ll - lh + hl - hh) / 2
    d = (ll + lh + hl + hh) / 2
    top = jnp.stack([a, b], axis=3)       # [B, h, w, 2, C]: columns 2j, 2j + 1
    bottom = jnp.stack([c, d], axis=3)
    blocks = jnp.stack([top, bottom], axis=2)  # [B, h, 2, w, 2, C]
    batch, height, _, width, _, channels = blocks.shape
    return blocks.reshape(batch, 2 * height, 2 * width, channels)


Dtype = Any


def _gate_hidden(channels: int) -> int:
    return max(channels // 4, 4)


class _Gates(nn.Module):
    """g = sigmoid(W2 SiLU(W1 AvgPool(x) + b1) + b2) reshaped [B, 1, 1, 4, C_gate] (one gate per sub-band and channel).

    W2 starts at zero (and b2 = 0), so every gate starts at 1/2."""

    gate_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        pooled = jnp.mean(x, axis=(1, 2))
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        hidden = nn.silu(nn.Dense(_gate_hidden(x.shape[-1]), name="fc1", **kw)(pooled))
        logits = nn.Dense(4 * self.gate_channels, kernel_init=nn.initializers.zeros, name="fc2", **kw)(hidden)
        return nn.sigmoid(logits).reshape(x.shape[0], 1, 1, 4, self.gate_channels)


def wavelet_gates(module_variables):
    """The ``_Gates`` params of a WGDown / WGUp (``{"fc1", "fc2"}``), e.g. to force the gates in tests."""
    return module_variables["params"]["gates"]


class WGDown(nn.Module):
    """Wavelet-gating downsampling (Spectral Diffusion, Yang et al. CVPR 2023, arXiv 2211.17106):

        X_LL, X_LH, X_HL, X_HH = DWT(X);   g = sigmoid(FFN(AvgPool(X))) in (0, 1)^{4 x C};
        X' = sum_{i in {LL, LH, HL, HH}} g_i * X_i                                         [B, H/2, W/2, C]

    then a 3x3 conv to ``channels`` only when ``channels`` differs from C (the UNet keeps the width across its
    downsamplings, so there the block has no conv: it replaces the stride-2 conv of ``Downsample``). The FFN is
    Dense(max(C/4, 4)) -> SiLU -> Dense(4C) (the paper gives no width), its output layer zero-initialised (gates
    start at 1/2). H and W must be even.
    """

    channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        bands = jnp.stack(haar_dwt(x), axis=3)  # [B, H/2, W/2, 4, C]
        gates = _Gates(x.shape[-1], self.dtype, self.param_dtype, name="gates")(x).astype(bands.dtype)
        out = jnp.sum(gates * bands, axis=3)
        if self.channels != x.shape[-1]:
            out = nn.Conv(self.channels, (3, 3), dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(out)
        return out


class WGUp(nn.Module):
    """Wavelet-gating upsampling (Spectral Diffusion, arXiv 2211.17106): the channels are read as the four Haar
    sub-bands, gated, and inverted:

        Z = Conv3x3(X) [B, h, w, 4 C_out];  Z_LL, Z_LH, Z_HL, Z_HH = split(Z, 4, channels);
        g = sigmoid(FFN(AvgPool(X))) in (0, 1)^{4 x C_out};  out = IDWT(g_LL Z_LL, g_LH Z_LH, g_HL Z_HL, g_HH Z_HH)

    out: [B, 2h, 2w, ``channels``]. The paper splits X's own channels (C -> C/4 at 2x); the 3x3 conv at the low
    resolution (to 4 C_out channels) keeps the UNet's widths and costs the same MACs as ``Upsample``'s 3x3 conv
    at the high resolution. The conv is skipped when C == 4 ``channels`` already.
    """

    channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        z = x
        if x.shape[-1] != 4 * self.channels:
            z = nn.Conv(4 * self.channels, (3, 3), dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x)
        bands = z.reshape(z.shape[:3] + (4, self.channels))
        gates = _Gates(self.channels, self.dtype, self.param_dtype, name="gates")(x).astype(bands.dtype)
        gated = gates * bands
        return haar_idwt(*(gated[:, :, :, i] for i in range(4)))
