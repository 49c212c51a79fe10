"""optax AdamW with linear warmup (then constant or cosine decay) and global-norm gradient clipping, and the one
optimizer step every training and finetuning update takes. ``adamr_lambda > 0`` swaps AdamW for AdamR (Adam plus
a decoupled pull toward the pretrained weights, ``dpmjax.train.adamr``), whose update takes ``anchor=``."""
from __future__ import annotations

import optax

DECAYS = ("constant", "cosine")


def make_optimizer(*, learning_rate: float, warmup_steps: int = 0, total_steps: int = 1, decay: str = "constant",
                   weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999, grad_clip: float | None = 1.0,
                   adamr_lambda: float = 0.0):
    """clip_by_global_norm(grad_clip) -> adamw(schedule), the DDPM/ADM recipe (Ho et al. 2020 App. B); with
    ``adamr_lambda > 0`` -> ``adamr(schedule, adamr_lambda)`` instead (no decay toward 0: ``weight_decay`` must be 0;
    its ``update`` needs ``anchor=``, see ``optimizer_step``)."""
    if decay not in DECAYS:
        raise ValueError(f"decay must be one of {DECAYS}, got {decay!r}")
    if learning_rate <= 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate}")
    if decay == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(warmup_steps, 1),
                                                      max(total_steps, warmup_steps + 1, 2))
    elif warmup_steps > 0:
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, learning_rate, warmup_steps), optax.constant_schedule(learning_rate)],
            [warmup_steps])
    else:
        schedule = optax.constant_schedule(learning_rate)
    parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip else []
    if adamr_lambda:
        from dpmjax.train.adamr import adamr

        if weight_decay:
            raise ValueError(f"weight_decay={weight_decay} with adamr_lambda={adamr_lambda}: AdamR pulls toward the "
                             "pretrained weights instead of decaying toward 0; set weight_decay to 0")
        parts.append(adamr(schedule, adamr_lambda, b1=b1, b2=b2))
    else:
        parts.append(optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay))
    return optax.chain(*parts)


def optimizer_step(tx: optax.GradientTransformation, grads, opt_state, params, **extra_args):
    """(new params, new optimizer state): ``params + tx.update(grads)``, the step every update of dpmjax takes;
    ``extra_args`` (e.g. AdamR's ``anchor``) go to ``tx.update`` (optax's extra-args protocol).

    Under standard dtype promotion: optax's bias correction raises a float to the int32 step count, which the
    project's strict promotion (``jax_numpy_dtype_promotion="strict"`` in tests) would refuse.
    """
    import jax

    with jax.numpy_dtype_promotion("standard"):
        updates, opt_state = tx.update(grads, opt_state, params, **extra_args)
    return optax.apply_updates(params, updates), opt_state
