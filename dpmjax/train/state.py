"""The train state (a frozen pytree) and the EMA update."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct


@struct.dataclass
class TrainState:
    step: jax.Array       # [] int32
    params: Any           # model parameters
    ema_params: Any       # exponential moving average of params (used for sampling)
    opt_state: Any        # optax state
    key: jax.Array        # PRNG key data (uint32[2]); folded with the step for each batch


def create_train_state(params, tx: optax.GradientTransformation, seed: int) -> TrainState:
    # copies: the train step donates the state, which must not delete the caller's arrays
    return TrainState(step=jnp.zeros((), jnp.int32), params=jax.tree.map(jnp.copy, params),
                      ema_params=jax.tree.map(jnp.copy, params),
                      opt_state=tx.init(params), key=jax.random.key_data(jax.random.key(seed)))


def ema_decay_at(step, decay: float):
    """min(decay, (1 + step)/(10 + step)): the EMA warm-up of the TF/ADM codebases, so early averages are not
    dominated by the random initialisation."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def ema_update(ema, params, decay):
    """ema <- decay * ema + (1 - decay) * params."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
