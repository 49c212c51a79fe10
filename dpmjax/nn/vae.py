"""A small KL-regularised convolutional autoencoder: the latent space of latent diffusion and of LMD.

Rombach et al. 2022 ("High-Resolution Image Synthesis with Latent Diffusion Models", Sec. 3 and App. G): an
encoder E maps x [H, W, C] to the mean and log-variance of a diagonal Gaussian posterior over a latent
z [H / f, W / f, c] (f = 2^(len(channels) - 1)), a decoder D maps z back to pixels:

    q(z | x) = N(mu(x), diag(exp(logvar(x))))          z = mu + exp(logvar / 2) * eps,  eps ~ N(0, I)
    L(x) = sum_pixels rec(x, D(z)) + beta * KL(q(z | x) || N(0, I))
    KL = 1/2 sum_latent (mu^2 + exp(logvar) - 1 - logvar)            (Kingma & Welling 2014, App. B)

with rec the L1 (LDM's choice) or squared error. Departure from the paper: LDM's first stage also has an LPIPS
perceptual term and a patch-GAN discriminator. Neither is here: LPIPS needs pretrained VGG weights, which are not
available offline, and a GAN term doubles the training cost and its instability for the small 28x28 images this
codebase trains on a CPU; the reconstructions are therefore blurrier than LDM's at the same compression.

    model = VAE(channels=(32, 64, 64), latent_channels=4)
    variables = init_params(model, (28, 28, 1), seed=0)       # dpmjax.nn.init_params, like every network
    mean, logvar = model.apply(variables, x, method=VAE.encode)
    x_hat = model.apply(variables, z, method=VAE.decode)
    x_hat, mean, logvar = model.apply(variables, x, train=True, rngs={"latent": key})   # reparameterised z

The call signature ``(x, t=None, y=None, train=False)`` accepts (and ignores) the diffusion networks' ``t`` and
``y`` so the shared helpers (``dpmjax.nn.init_params``, workdir loading, checkpoints) treat it as any network.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpmjax.nn.layers import group_norm

__all__ = ["VAE", "kl_to_standard_normal", "reconstruction_error", "vae_loss", "latent_shape", "RECONSTRUCTIONS"]

Dtype = Any
RECONSTRUCTIONS = ("l1", "mse")


class _ResBlock(nn.Module):
    channels: int
    num_groups: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.silu(group_norm(x.shape[-1], self.num_groups, **kw)(x))
        h = nn.Conv(self.channels, (3, 3), **kw)(h)
        h = nn.silu(group_norm(self.channels, self.num_groups, **kw)(h))
        h = nn.Conv(self.channels, (3, 3), kernel_init=nn.initializers.zeros, **kw)(h)
        skip = x if x.shape[-1] == self.channels else nn.Conv(self.channels, (1, 1), **kw)(x)
        return skip + h


class _Encoder(nn.Module):
    channels: Sequence[int]
    latent_channels: int
    num_groups: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.Conv(self.channels[0], (3, 3), **kw)(x.astype(self.dtype))
        for level, width in enumerate(self.channels):
            h = _ResBlock(width, self.num_groups, **kw)(h)
            if level < len(self.channels) - 1:  # stride-2 conv: H -> ceil(H / 2)
                h = nn.Conv(width, (3, 3), strides=(2, 2), **kw)(h)
        h = nn.silu(group_norm(h.shape[-1], self.num_groups, **kw)(h))
        moments = nn.Conv(2 * self.latent_channels, (3, 3), **kw)(h)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)  # LDM's DiagonalGaussianDistribution clamp


class _Decoder(nn.Module):
    channels: Sequence[int]
    out_channels: int
    image_hw: tuple
    num_groups: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        widths = tuple(reversed(self.channels))
        sizes = [tuple(self.image_hw)]
        for _ in range(len(widths) - 1):  # the encoder's spatial sizes, so odd sizes (7 -> 4) decode back exactly
            sizes.append(tuple(-(-s // 2) for s in sizes[-1]))
        sizes = sizes[::-1]
        h = nn.Conv(widths[0], (3, 3), **kw)(z.astype(self.dtype))
        for level, width in enumerate(widths):
            h = _ResBlock(width, self.num_groups, **kw)(h)
            if level < len(widths) - 1:
                b, _, _, c = h.shape
                h = jax.image.resize(h, (b, *sizes[level + 1], c), "nearest")
                h = nn.Conv(widths[level + 1], (3, 3), **kw)(h)
        h = nn.silu(group_norm(h.shape[-1], self.num_groups, **kw)(h))
        return nn.Conv(self.out_channels, (3, 3), **kw)(h).astype(jnp.float32)


class VAE(nn.Module):
    """KL autoencoder; ``__call__(x [B, H, W, C], t=None, y=None, train=False) -> (x_hat, mean, logvar)``.

    Attributes:
      channels: widths per resolution level; ``len(channels) - 1`` stride-2 downsamplings (f = 2^that).
      latent_channels: c, the latent's channel count.
      image_shape: (H, W, C) of the images it was built for (the decoder restores H and W exactly).
      num_groups: GroupNorm groups (at most; ``dpmjax.nn.layers.group_norm``).
    ``train=True`` samples z by reparameterisation (rng stream "latent"); otherwise z = mean (the posterior's
    mode, what latent diffusion encodes its data with).
    """

    channels: tuple = (32, 64, 64)
    latent_channels: int = 4
    image_shape: tuple = (28, 28, 1)
    num_groups: int = 8
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = _Encoder(tuple(self.channels), self.latent_channels, self.num_groups, **kw)
        self.decoder = _Decoder(tuple(self.channels), int(self.image_shape[-1]), tuple(self.image_shape[:2]),
                                self.num_groups, **kw)

    def encode(self, x):
        """(mean, logvar), each [B, h, w, latent_channels] float32."""
        if tuple(x.shape[1:]) != tuple(self.image_shape):
            raise ValueError(f"the VAE was built for images of shape {tuple(self.image_shape)}, got {tuple(x.shape[1:])}")
        return self.encoder(x)

    def decode(self, z):
        """Images [B, H, W, C] (float32, unclipped) from latents [B, h, w, latent_channels]."""
        return self.decoder(z)

    def __call__(self, x, t=None, y=None, train: bool = False):
        del t, y  # the shared network signature (module docstring)
        mean, logvar = self.encode(x)
        z = mean
        if train:
            z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(self.make_rng("latent"), mean.shape, mean.dtype)
        return self.decode(z), mean, logvar


def latent_shape(model: VAE) -> tuple:
    """(h, w, c) of the latents ``model`` encodes its images to (shapes only: nothing is computed)."""
    x = jnp.zeros((1, *model.image_shape), jnp.float32)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    mean, _ = jax.eval_shape(lambda v: model.apply(v, x, method=VAE.encode), variables)
    return tuple(int(n) for n in mean.shape[1:])


def kl_to_standard_normal(mean, logvar):
    """[B]: KL(N(mean, exp(logvar)) || N(0, I)) = 1/2 sum (mean^2 + exp(logvar) - 1 - logvar) over the latent."""
    per_entry = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return jnp.sum(per_entry, axis=tuple(range(1, mean.ndim)))


def reconstruction_error(x, x_hat, kind: str = "l1"):
    """[B]: sum over pixels of |x - x_hat| ("l1") or (x - x_hat)^2 ("mse")."""
    if kind not in RECONSTRUCTIONS:
        raise ValueError(f"reconstruction must be one of {RECONSTRUCTIONS}, got {kind!r}")
    diff = x_hat.astype(jnp.float32) - x.astype(jnp.float32)
    per_pixel = jnp.abs(diff) if kind == "l1" else jnp.square(diff)
    return jnp.sum(per_pixel, axis=tuple(range(1, x.ndim)))


def vae_loss(model: VAE, params, x, key, *, beta: float, reconstruction: str = "l1"):
    """(loss, scalars): mean over the batch of rec(x, D(z)) + beta KL (module docstring), z reparameterised.

    ``scalars``: "recon_mse" (per-pixel MSE of the reconstruction, whatever ``reconstruction`` is) and "kl"
    (per-image KL in nats), both batch means.
    """
    x_hat, mean, logvar = model.apply(params, x, train=True, rngs={"latent": key})
    rec = reconstruction_error(x, x_hat, reconstruction)
    kl = kl_to_standard_normal(mean, logvar)
    loss = jnp.mean(rec + beta * kl)
    return loss, {"recon_mse": jnp.mean(jnp.square(x_hat - x.astype(jnp.float32))), "kl": jnp.mean(kl)}
