"""Plain (full) finetuning on the denoising loss: every weight of the teacher trained on the target images.

    dpmjax finetune --method full_finetune --teacher runs/digits --workdir runs/digits_invert \
        --config configs/methods/full_finetune.py --config.data.name=folder:runs/targets/invert10

The baseline of the adaptation methods (``dpmjax.methods.adaptation``): on 10 shots it memorises them -- the
copying DomainStudio's relative-distance terms prevent -- and its weights minus the teacher's are the deltas
DARE / DAREx prune (``dpmjax delta prune``).

config.method (the optimizer is ``config.optim``):
  adamr_lambda: 0 (default) = plain AdamW as ``config.optim`` says; > 0 = AdamR (``dpmjax.train.adamr``, DAREx-L2,
      Deng et al. 2025): Adam plus the decoupled pull theta -= lr lambda / sqrt(mean v_hat) (theta - theta_teacher)
      toward the teacher's weights, which keeps the delta small so DARE can prune it at extreme rates
      (``dpmjax delta prune``). The anchor is the frozen teacher (``frozen["teacher"]``), an argument of the update;
      ``config.optim.weight_decay`` must then be 0.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dpmjax.methods import adaptation
from dpmjax.methods.base import Method, Program, Teacher, method_settings

__all__ = ["METHOD", "build", "validate"]

DEFAULTS: dict = {"adamr_lambda": 0.0}


def validate(config, teacher: Teacher) -> None:
    """ValueError naming the setting: unknown method settings, a target folder with fewer images than
    ``data.shots``, a batch larger than the shots."""
    unknown = sorted(set(method_settings(config, DEFAULTS)) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"config.method: unknown full_finetune settings {unknown}; it has {sorted(DEFAULTS)}")
    pull = method_settings(config, DEFAULTS)["adamr_lambda"]
    if isinstance(pull, bool) or not isinstance(pull, (int, float)) or not pull >= 0:
        raise ValueError(f"config.method.adamr_lambda must be a number >= 0, got {pull!r}")
    if pull and config.optim.get("weight_decay", 0.0):
        raise ValueError(f"config.optim.weight_decay={config.optim.weight_decay} with config.method.adamr_lambda="
                         f"{pull}: AdamR pulls toward the teacher instead of decaying toward 0; set weight_decay=0")
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

    pull = float(method_settings(config, DEFAULTS)["adamr_lambda"])
    tx = adaptation.make_optimizer(config, adamr_lambda=pull)
    return adaptation.student_program(config, teacher, init=init, loss=loss, student=lambda params: params,
                                      frozen={"teacher": teacher.params}, tx=tx,
                                      optimizer_args=(lambda frozen: {"anchor": frozen["teacher"]}) if pull else None)

METHOD = Method(name="full_finetune", build=build, validate=validate,
                doc="plain finetuning of every weight on the denoising loss (the adaptation baseline)")
