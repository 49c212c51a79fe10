"""Latent datasets: images encoded by a trained VAE workdir, scaled to unit variance (latent diffusion's data).

A latent-diffusion config keeps its image dataset in ``config.data.name`` and says which VAE encodes it:

    config.data = dict(name="fashion_mnist", image_shape=(7, 7, 4),          # the *latent* shape the model sees
                       latent=dict(vae_workdir="runs/vae_fashion", scale_factor=0.0), batch_size=64)

``dpmjax.train.loop.build_data`` then yields ``z = s * mu(x)`` for every image x, with mu the VAE encoder's
posterior mean (LDM encodes with ``posterior.mode()`` for its data too when it caches latents) and the latent
scale factor s = 1 / std(mu(x)) over the training split (Rombach et al. 2022, Sec. 4.3.2 / App. G: "we rescale the
latents by the component-wise standard deviation" -- LDM's ``scale_by_std`` uses the first batch; the whole
training split is used here, which is cheaper than it sounds on these small sets and does not depend on the seed).
``scale_factor > 0`` in the config fixes s instead. ``dpmjax sample`` on such a workdir decodes
``D(z / s)`` (``decode_latents``), so its PNG grids show images.

The unscaled latents of each (dataset, split, VAE checkpoint step) are cached in ``VAE_WORKDIR/latents/*.npz``
beside the scale factor: encoding runs once per VAE checkpoint, and sampling reads only the scale.
"""
from __future__ import annotations

import os

import numpy as np

__all__ = ["latent_settings", "vae_latent_shape", "check_latent_config", "latent_scale", "encode_images",
           "latent_source", "decode_latents", "load_vae", "LATENT_CACHE_DIR"]

LATENT_CACHE_DIR = "latents"


def latent_settings(config) -> dict:
    """{vae_workdir, scale_factor} of ``config.data.latent`` (ValueError naming the setting when malformed)."""
    section = config.data.get("latent")
    section = section.to_dict() if hasattr(section, "to_dict") else dict(section or {})
    unknown = sorted(set(section) - {"vae_workdir", "scale_factor"})
    if unknown:
        raise ValueError(f"config.data.latent: unknown settings {unknown}; it has ['scale_factor', 'vae_workdir']")
    where = section.get("vae_workdir")
    if not where:
        raise ValueError("config.data.latent.vae_workdir must name a trained VAE workdir "
                         "(`dpmjax train --config configs/vae_fashion_mnist.py --workdir DIR`)")
    scale = section.get("scale_factor", 0.0) or 0.0
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not np.isfinite(scale) or scale < 0:
        raise ValueError(f"config.data.latent.scale_factor must be 0 (computed: 1 / std of the latents) or a "
                         f"positive number, got {scale!r}")
    return {"vae_workdir": str(where), "scale_factor": float(scale)}


def vae_latent_shape(vae_config) -> tuple:
    """(h, w, c) of the latents of the VAE whose config is ``vae_config`` (shapes only)."""
    from dpmjax.nn import build_model
    from dpmjax.nn.vae import latent_shape

    return latent_shape(build_model(vae_config.model))


def check_latent_config(config):
    """The VAE workdir of ``config.data.latent`` exists, holds a VAE, and encodes to ``config.data.image_shape``;
    ValueError naming the option otherwise. Reads only the VAE's config.json (nothing is restored). Returns the
    VAE's config."""
    from dpmjax.workdir import checkpoint_steps, load_config_of

    where = latent_settings(config)["vae_workdir"]
    try:
        vae_config = load_config_of(where)
        checkpoint_steps(where)
    except FileNotFoundError as err:
        raise ValueError(f"config.data.latent.vae_workdir={where!r}: {err}") from None
    if vae_config.model.get("kind") != "vae":
        raise ValueError(f"config.data.latent.vae_workdir={where!r} holds a {vae_config.model.get('kind')!r} model, "
                         "not a VAE (config.model.kind='vae')")
    shape = vae_latent_shape(vae_config)
    expected = tuple(int(n) for n in config.data.image_shape)
    if shape != expected:
        raise ValueError(f"config.data.latent.vae_workdir={where!r} encodes images to latents of shape {shape}, but "
                         f"config.data.image_shape (the latent model's input) is {expected}: set image_shape to "
                         f"{shape} or use a VAE of latent shape {expected}")
    return vae_config


def load_vae(vae_workdir: str):
    """(module, EMA variables, config, checkpoint step) of a trained VAE workdir."""
    from dpmjax.workdir import checkpoint_steps, load_params

    model, variables, _, config = load_params(vae_workdir)
    return model, variables, config, checkpoint_steps(vae_workdir)[-1]


def encode_images(model, variables, images: np.ndarray, *, batch_size: int = 500) -> np.ndarray:
    """Posterior means mu(x) [N, h, w, c] float32 of ``images`` [N, H, W, C], in batches (one compiled program:
    the variables are an argument; the last batch is padded)."""
    import jax
    import jax.numpy as jnp

    from dpmjax.nn.vae import VAE

    encode = jax.jit(lambda v, x: model.apply(v, x, method=VAE.encode)[0])
    count = len(images)
    size = min(batch_size, count)
    parts = []
    for lo in range(0, count, size):
        chunk = np.asarray(images[lo:lo + size], np.float32)
        pad = size - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), np.float32)])
        parts.append(np.asarray(encode(variables, jnp.asarray(chunk)))[:size - pad])
    return np.concatenate(parts).astype(np.float32)


def _cache_path(vae_workdir: str, dataset: str, split: str, step: int) -> str:
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in dataset)
    return os.path.join(os.path.abspath(vae_workdir), LATENT_CACHE_DIR, f"{safe}_{split}_step{step}.npz")


def _cached_latents(vae_workdir: str, config, split: str, source=None):
    """(unscaled latents [N, h, w, c], labels [N]) of ``config.data``'s ``split``, encoded once per VAE step."""
    from dpmjax.data import get_dataset, materialize
    from dpmjax.workdir import checkpoint_steps

    step = checkpoint_steps(vae_workdir)[-1]
    path = _cache_path(vae_workdir, str(config.data.name), split, step)
    if os.path.isfile(path):
        with np.load(path) as saved:
            return saved["latents"], saved["labels"]
    if source is None:
        source = get_dataset(config.data.name, split, **dict(config.data.get("kwargs") or {}))
    images = materialize(source)
    model, variables, _, _ = load_vae(vae_workdir)
    latents = encode_images(model, variables, images.images)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, latents=latents, labels=images.labels)
    os.replace(tmp, path)  # atomic: a half-written cache is never read
    return latents, images.labels


def latent_scale(config) -> float:
    """s = 1 / std of the training split's unscaled latents, or ``config.data.latent.scale_factor`` when > 0."""
    settings = latent_settings(config)
    if settings["scale_factor"] > 0:
        return settings["scale_factor"]
    latents, _ = _cached_latents(settings["vae_workdir"], config, "train")
    return float(1.0 / np.std(latents.astype(np.float64)))


def latent_source(config, source=None, split: str = "train"):
    """An ``ArraySource`` of scaled latents s * mu(x) of ``config.data``'s images (``source`` when given), with
    their labels; ValueError (``check_latent_config``) when the VAE does not fit the config."""
    from dpmjax.data.pipeline import ArraySource

    check_latent_config(config)
    settings = latent_settings(config)
    latents, labels = _cached_latents(settings["vae_workdir"], config, split, source)
    scale = latent_scale(config)
    num_classes = getattr(source, "num_classes", None) if source is not None else None
    return ArraySource((latents * np.float32(scale)).astype(np.float32), np.asarray(labels, np.int32), num_classes,
                       name=f"latent:{config.data.name}")


def decode_latents(config, latents, *, batch_size: int = 500) -> np.ndarray:
    """Images D(z / s) [N, H, W, C] (float32, unclipped) of a latent workdir's samples z [N, h, w, c]."""
    import jax
    import jax.numpy as jnp

    from dpmjax.nn.vae import VAE

    settings = latent_settings(config)
    scale = latent_scale(config)
    model, variables, _, _ = load_vae(settings["vae_workdir"])
    decode = jax.jit(lambda v, z: model.apply(v, z, method=VAE.decode))
    latents = np.asarray(latents, np.float32) / np.float32(scale)
    parts = [np.asarray(decode(variables, jnp.asarray(latents[lo:lo + batch_size])))
             for lo in range(0, len(latents), batch_size)]
    return np.concatenate(parts).astype(np.float32)
