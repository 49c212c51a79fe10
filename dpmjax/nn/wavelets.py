"""The 2D Haar wavelet transform of NHWC feature maps in ``jnp`` (one level).

    ll, lh, hl, hh = haar_dwt(x)        # each [B, H/2, W/2, C]

Used by DomainStudio's high-frequency terms (``dpmjax.methods.domainstudio``). The level-1 Haar transform is a
reshape and four sums, so no wavelet package is needed (jaxwt 0.1.1, last released 2024-02, would add a
dependency and its own padding conventions for these lines); ``tests/test_domainstudio.py`` checks it against
the official DomainStudio filters as a stride-2 depthwise convolution.
"""
from __future__ import annotations

__all__ = ["haar_dwt"]


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
