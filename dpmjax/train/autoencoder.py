"""The autoencoder objective of ``dpmjax train`` (``config.train.objective = "vae"``): the KL autoencoder's step.

    step = make_autoencoder_step(model, tx, mesh, beta=1e-3, reconstruction="l1", state_sharding=shardings)
    state, metrics = step(state, batch, metrics)        # the same contract as dpmjax.train.step.make_train_step

One jitted, sharded program: rec + beta KL (``dpmjax.nn.vae.vae_loss``, Rombach et al. 2022 Sec. 3) -> grads ->
optax update -> EMA, with the on-device metrics and finite check of the diffusion step, so the training loop
(checkpoints, resume, logs, the non-finite stop) runs it unchanged. Config (``config.train``): ``objective``
("diffusion", the default, or "vae"), ``vae_beta`` (default 1e-3) and ``vae_reconstruction`` ("l1" or "mse").
"""
from __future__ import annotations

import optax

from dpmjax.train.step import make_gradient_step

__all__ = ["OBJECTIVES", "METRIC_NAMES", "make_autoencoder_step", "validate_autoencoder_config"]

OBJECTIVES = ("diffusion", "vae")
METRIC_NAMES = ("loss", "recon_mse", "kl", "grad_norm")


def validate_autoencoder_config(config) -> str:
    """The objective of ``config.train`` (ValueError naming the setting for a bad objective, beta or loss)."""
    from dpmjax.nn.vae import RECONSTRUCTIONS

    objective = config.train.get("objective", "diffusion")
    if objective not in OBJECTIVES:
        raise ValueError(f"config.train.objective must be one of {OBJECTIVES}, got {objective!r}")
    if objective == "vae":
        if config.model.get("kind") != "vae":
            raise ValueError(f"config.train.objective='vae' trains a model of kind 'vae', but config.model.kind is "
                             f"{config.model.get('kind')!r}")
        beta = config.train.get("vae_beta", 1e-3)
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or beta < 0:
            raise ValueError(f"config.train.vae_beta must be a number >= 0, got {beta!r}")
        if config.train.get("vae_reconstruction", "l1") not in RECONSTRUCTIONS:
            raise ValueError(f"config.train.vae_reconstruction must be one of {RECONSTRUCTIONS}, got "
                             f"{config.train.get('vae_reconstruction')!r}")
    elif config.model.get("kind") == "vae":
        raise ValueError("config.model.kind='vae' is an autoencoder: set config.train.objective='vae'")
    return objective


def make_autoencoder_step(model, tx: optax.GradientTransformation, mesh, *, beta: float, reconstruction: str = "l1",
                          ema_decay: float = 0.999, state_sharding=None):
    """``step(state, batch, metrics=None) -> (state, metrics)`` for a ``dpmjax.nn.vae.VAE``, jitted over ``mesh``
    (``dpmjax.train.step.make_gradient_step`` on ``vae_loss``).

    The state is the training loop's ``TrainState`` (params, EMA, optimizer state, key); the reparameterisation
    noise is drawn from ``fold_in(state.key, state.step)``. Metrics: loss, recon_mse, kl, grad_norm.
    """
    from dpmjax.nn.vae import vae_loss

    def loss_fn(params, batch, key):
        return vae_loss(model, params, batch["image"], key, beta=beta, reconstruction=reconstruction)

    return make_gradient_step(loss_fn, tx, mesh, metric_names=METRIC_NAMES[1:-1], ema_decay=ema_decay,
                              state_sharding=state_sharding)
