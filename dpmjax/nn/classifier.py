"""A small CNN classifier for 8x8 digits and 28x28 Fashion-MNIST; its penultimate layer is the feature space
of the dataset-specific Frechet distance (a domain metric in the spirit of FID, Heusel et al. 2017).

    for each stage s: [Conv3x3(c_s), SiLU] x 2, then 2x2 average pooling (not after the last stage)
    global average pool -> Dense(feature_dim), SiLU  (= features) -> dropout -> Dense(num_classes) (= logits)
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

__all__ = ["Classifier"]


def _avg_pool_2x2(x):
    """2x2 mean pooling, stride 2; odd sizes are edge-padded first (7 -> 4). (flax's avg_pool divides by an
    int, which strict dtype promotion refuses.)"""
    b, h, w, c = x.shape
    x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    return x.reshape(b, (h + 1) // 2, 2, (w + 1) // 2, 2, c).mean(axis=(2, 4))


class Classifier(nn.Module):
    """``__call__(x [B, H, W, C], train=False, return_features=False)`` -> logits [B, num_classes]
    (or (logits, features [B, feature_dim]) with ``return_features=True``).

    Defaults fit 8x8 digits; use ``channels=(32, 64, 128)`` for 28x28 images (28 -> 14 -> 7).
    Dropout (rng stream "dropout") acts only with ``train=True``.
    """

    num_classes: int = 10
    channels: Sequence[int] = (32, 64)
    feature_dim: int = 128
    dropout: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, return_features: bool = False):
        if x.ndim != 4:
            raise ValueError(f"Classifier expects x of shape [B, H, W, C], got {x.shape}")
        if not self.channels:
            raise ValueError("Classifier needs at least one stage in channels")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = x.astype(self.dtype)
        for stage, width in enumerate(self.channels):
            for i in range(2):
                h = nn.silu(nn.Conv(width, (3, 3), name=f"conv_{stage}_{i}", **kw)(h))
            if stage != len(self.channels) - 1:
                h = _avg_pool_2x2(h)
        features = nn.silu(nn.Dense(self.feature_dim, name="features", **kw)(jnp.mean(h, axis=(1, 2))))
        logits = nn.Dense(self.num_classes, name="logits", **kw)(
            nn.Dropout(self.dropout, deterministic=not train)(features))
        logits = logits.astype(jnp.float32)
        return (logits, features.astype(jnp.float32)) if return_features else logits
