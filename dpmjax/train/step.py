"""The jitted, sharded train step: loss -> grads -> optax update -> EMA, in one program."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from dpmjax.train import losses
from dpmjax.sharding import data_sharding, replicated
from dpmjax.train.state import TrainState, ema_decay_at, ema_update


def make_train_step(apply_fn: Callable, tx: optax.GradientTransformation, schedule, mesh, *, target: str = "eps",
                    min_snr_gamma: float | None = None, ema_decay: float = 0.999):
    """Returns ``step(state, batch) -> (state, metrics)`` jitted with explicit shardings over ``mesh``.

    ``apply_fn(params, x_t, t, y, key) -> prediction`` (``key`` drives dropout and label dropout). Params,
    optimizer state and EMA are replicated; the batch is split over "data"; the state buffer is donated.
    """
    def step(state: TrainState, batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)

        def loss_fn(params):
            return losses.denoising_loss(apply_fn, params, batch, key, schedule, target=target,
                                         min_snr_gamma=min_snr_gamma)

        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes int step counts with floats
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = ema_update(state.ema_params, params, ema_decay_at(state.step, ema_decay))
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        return new_state, metrics

    state_sharding = replicated(mesh)
    return jax.jit(step, in_shardings=(state_sharding, data_sharding(mesh)),
                   out_shardings=(state_sharding, replicated(mesh)), donate_argnums=0)
