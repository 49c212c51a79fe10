"""The jitted, sharded train step: loss -> grads -> optax update -> EMA, plus on-device metrics, in one program.

    step = make_train_step(apply_fn, tx, schedule, mesh, state_sharding=shardings)
    state, metrics = step(state, batch, metrics)          # no host sync: metrics stay on device
    host = jax.device_get(metrics)                          # only at log / checkpoint steps

The metrics are a small accumulator (running sums since the last log, and a "finite so far" flag) that the
step returns and takes back, so the loop reads one tiny pytree at log and checkpoint steps instead of
syncing on every step (big_vision's pattern). The finite flag covers the loss, the gradient norm and every
leaf of the new state: a state is checked before it could ever be saved, whatever the log interval.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from dpmjax.sharding import data_sharding, replicated
from dpmjax.train import losses
from dpmjax.train.optim import optimizer_step
from dpmjax.train.state import TrainState, ema_decay_at, ema_update


@struct.dataclass
class StepMetrics:
    sums: dict                  # {name: [] float32}: sum of each per-step scalar since the last reset (log step)
    count: jax.Array            # [] int32: steps summed
    finite: jax.Array           # [] bool: every step since this accumulator started gave finite metrics and state
    first_nonfinite: jax.Array  # [] int32: the state's step after the first non-finite step (-1: none)

    def mean(self, name: str) -> float:
        """Mean of metric ``name`` over the summed steps (host-side, after ``jax.device_get``)."""
        return float(self.sums[name]) / max(int(self.count), 1)

    def means(self) -> dict:
        """{name: mean} of every metric (host-side)."""
        return {name: self.mean(name) for name in self.sums}


def init_metrics(names=("loss", "grad_norm")) -> StepMetrics:
    """A fresh accumulator for the scalars ``names`` (numpy scalars; the jitted step places them)."""
    return StepMetrics(sums={name: np.float32(0.0) for name in names}, count=np.int32(0), finite=np.bool_(True),
                       first_nonfinite=np.int32(-1))


def accumulate(metrics: StepMetrics, scalars: dict, state_finite, step) -> StepMetrics:
    """``metrics`` plus one step's ``scalars`` ({name: []}, the names of ``metrics.sums``); the step is finite when
    every scalar and ``state_finite`` are; ``step`` (the new state's step) is recorded at the first that is not.
    Runs inside the jitted step: nothing reaches the host."""
    if set(scalars) != set(metrics.sums):
        raise ValueError(f"step metrics {sorted(scalars)} differ from the accumulator's {sorted(metrics.sums)}")
    finite_now = jnp.asarray(state_finite)
    for value in scalars.values():
        finite_now = finite_now & jnp.all(jnp.isfinite(value))
    first = jnp.where(metrics.finite & ~finite_now, step, metrics.first_nonfinite)
    sums = {name: metrics.sums[name] + jnp.asarray(value, jnp.float32) for name, value in scalars.items()}
    return StepMetrics(sums=sums, count=metrics.count + 1, finite=metrics.finite & finite_now,
                       first_nonfinite=jnp.asarray(first, jnp.int32))


def tree_all_finite(tree) -> jax.Array:
    """[] bool: no NaN or inf in any floating leaf of ``tree`` (one fused reduction per leaf)."""
    flags = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)
             if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.inexact)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)


def make_gradient_step(loss_fn: Callable, tx: optax.GradientTransformation, mesh, *, metric_names=(),
                       ema_decay: float = 0.999, state_sharding=None):
    """``step(state, batch, metrics=None) -> (state, metrics)`` for any objective, jitted with explicit shardings.

    ``loss_fn(params, batch, key) -> (loss, scalars)``, ``scalars`` a dict of [] arrays named by ``metric_names``;
    ``key`` is ``fold_in(state.key, state.step)``. One program: grads -> optax update -> EMA -> on-device metrics
    ("loss", the scalars, "grad_norm") with the finite check of loss, gradient norm and every leaf of the new state.
    The batch is split over "data"; the state is placed by ``state_sharding`` (default replicated); the metrics are
    replicated. The state and metrics buffers are donated; ``metrics=None`` starts a fresh accumulator.
    """
    if not 0.0 <= ema_decay <= 1.0:
        raise ValueError(f"ema_decay must be in [0, 1], got {ema_decay!r}")
    names = ("loss", *metric_names, "grad_norm")

    def step(state: TrainState, batch, metrics: StepMetrics):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
        (loss, scalars), grads = jax.value_and_grad(lambda p: loss_fn(p, batch, key), has_aux=True)(state.params)
        params, opt_state = optimizer_step(tx, grads, state.opt_state, state.params)
        ema = ema_update(state.ema_params, params, ema_decay_at(state.step, ema_decay))
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)
        new_metrics = accumulate(metrics, {"loss": loss, **scalars, "grad_norm": optax.tree.norm(grads)},
                                 tree_all_finite((params, ema, opt_state)), new_state.step)
        return new_state, new_metrics

    state_sharding = replicated(mesh) if state_sharding is None else state_sharding
    repl = replicated(mesh)
    jitted = jax.jit(step, in_shardings=(state_sharding, data_sharding(mesh), repl),
                     out_shardings=(state_sharding, repl), donate_argnums=(0, 2))

    def fresh_metrics():
        # placed like the step's own output: a numpy accumulator would be an uncommitted argument, and the
        # second call (committed metrics) would compile the step a second time
        return jax.device_put(init_metrics(names), repl)

    def train_step(state: TrainState, batch, metrics: StepMetrics | None = None):
        return jitted(state, batch, fresh_metrics() if metrics is None else metrics)

    train_step.jitted = jitted
    train_step.init_metrics = fresh_metrics
    return train_step


def make_train_step(apply_fn: Callable, tx: optax.GradientTransformation, schedule, mesh, *, target: str = "eps",
                    min_snr_gamma: float | None = None, ema_decay: float = 0.999, state_sharding=None):
    """The diffusion objective's ``step(state, batch, metrics=None) -> (state, metrics)`` (``make_gradient_step``
    on ``losses.denoising_loss``), jitted with explicit shardings over ``mesh``.

    Args:
      apply_fn: ``apply_fn(params, x_t, t, y, key) -> prediction`` (``key`` drives dropout and label dropout).
      tx: the optax transformation whose state ``state.opt_state`` holds.
      target: what the network predicts ("eps", "x0" or "v"); min_snr_gamma: Min-SNR-gamma weighting or None.
      state_sharding: a pytree of ``NamedSharding`` like the state (``dpmjax.sharding.sharding_rule``) or one
        sharding for all of it; default replicated. The batch is split over "data"; the metrics are replicated.

    The state and metrics buffers are donated. ``metrics=None`` starts a fresh accumulator
    (``step.init_metrics()``). The step is pure: its metrics carry the sums and the finite flag; the caller
    decides when to fetch them.
    """
    if target not in losses.TARGETS:
        raise ValueError(f"target must be one of {losses.TARGETS}, got {target!r}")
    if min_snr_gamma is not None and not min_snr_gamma > 0:
        raise ValueError(f"min_snr_gamma must be None or > 0, got {min_snr_gamma!r}")

    def loss_fn(params, batch, key):
        loss, _ = losses.denoising_loss(apply_fn, params, batch, key, schedule, target=target,
                                        min_snr_gamma=min_snr_gamma)
        return loss, {}

    return make_gradient_step(loss_fn, tx, mesh, ema_decay=ema_decay, state_sharding=state_sharding)
