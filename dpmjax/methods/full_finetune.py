"""Plain (full) finetuning on the denoising loss: every weight of the teacher trained on the target images.

    dpmjax finetune --method full_finetune --teacher runs/digits --workdir runs/digits_invert \
        --config configs/methods/full_finetune.py --config.data.name=folder:runs/targets/invert10

The baseline of the adaptation methods (``dpmjax.methods.adaptation``): on 10 shots it memorises them -- the
copying DomainStudio's relative-distance terms prevent -- and its weights minus the teacher's are the deltas
DARE / DAREx prune (``dpmjax delta prune``).

config.method: no settings of its own (the optimizer is ``config.optim``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dpmjax.methods import adaptation
from dpmjax.methods.base import Method, Program, Teacher, method_settings

__all__ = ["METHOD", "build", "validate"]

DEFAULTS: dict = {}


def validate(config, teacher: Teacher) -> None:
    """ValueError naming the setting: unknown method settings, a target folder with fewer images than
    ``data.shots``, a batch larger than the shots."""
    unknown = sorted(set(method_settings(config, DEFAULTS)) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"config.method: unknown full_finetune settings {unknown}; it has none")
    adaptation.check_target_data(config)


def build(config, teacher: Teacher) -> Program:
    """Init copies the teacher's variables; the loss is the teacher's denoising loss on the target batch."""
    apply = adaptation.training_apply_fn(teacher)
    schedule, prediction = teacher.schedule, teacher.prediction

    def init(frozen, key):
        return jax.tree.map(jnp.copy, frozen["teacher"])

    def loss(params, frozen, batch, key):
        noise_key, model_key = jax.random.split(key)
        x_t, t, target = adaptation.noised(batch, noise_key, schedule, prediction)
        out = apply(params, x_t, t, batch.get("label"), model_key).astype(x_t.dtype)
        return jnp.mean((out - target) ** 2), {}

    return adaptation.student_program(config, teacher, init=init, loss=loss, student=lambda params: params,
                                      frozen={"teacher": teacher.params})


METHOD = Method(name="full_finetune", build=build, validate=validate,
                doc="plain finetuning of every weight on the denoising loss (the adaptation baseline)")
