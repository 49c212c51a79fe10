"""LoRA finetuning (``--method lora``): low-rank adapters on the teacher's kernels, trained on the denoising loss.

    dpmjax finetune --method lora --teacher runs/digits --workdir runs/digits_invert_lora \
        --config configs/methods/lora.py
    dpmjax sample --workdir runs/digits_invert_lora

Each targeted kernel becomes W = W_0 + (alpha / r) A^T B (Hu et al. 2021, eq. 3; ``dpmjax.nn.lora``) with W_0
the frozen teacher's weight, and only (A, B) are trained on the adaptation core's loss
(``dpmjax.methods.adaptation``): the optimizer state and the checkpoint hold the adapters alone. B = 0 at
init, so update 0 starts from the teacher exactly. The output network is the merged weights
(``student_reads_frozen``: the checkpoint stores the adapters and ``dpmjax sample`` merges them into the
teacher it loads from ``config.teacher.workdir``), so the output workdir samples as fast as the teacher.

config.method:
  rank:    r, the adapters' rank (4); at most min(in, out) of every targeted kernel (conv kernels count as
           (kh kw in) x out matrices).
  alpha:   the scale's numerator (None: = rank, scale 1; Hu et al. fix alpha to the first r they try).
  targets: a tuple of regular expressions over "/"-joined param paths; the item "blocks" (the default,
           ("blocks",)) stands for every conv and dense kernel inside the residual and attention blocks (see
           ``dpmjax.nn.lora.DEFAULT_TARGETS``); e.g. ("_attn/(qkv|proj_out)/kernel$",) for attention only
           (the digits UNet has no attention).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from dpmjax.methods import adaptation
from dpmjax.methods.base import Method, Program, Teacher, method_settings
from dpmjax.nn import lora as lora_lib

__all__ = ["METHOD", "build", "validate", "DEFAULTS", "settings"]

DEFAULTS: dict = {"rank": 4, "alpha": None, "targets": ("blocks",)}


def _targets(value):
    return value if isinstance(value, str) else tuple(value)


def settings(config) -> dict:
    """The method settings with alpha resolved (None -> rank) and targets as a string or a tuple."""
    s = method_settings(config, DEFAULTS)
    s["targets"] = _targets(s["targets"])
    if s["alpha"] is None:
        s["alpha"] = s["rank"]
    return s


def validate(config, teacher: Teacher) -> None:
    """ValueError naming the setting: unknown settings, rank < 1 or above a targeted kernel's min(in, out),
    alpha not a positive finite number, a target pattern matching no kernel (or a non-kernel), and the target
    data checks of the adaptation core."""
    unknown = sorted(set(method_settings(config, DEFAULTS)) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"config.method: unknown lora settings {unknown}; it has {sorted(DEFAULTS)}")
    s = settings(config)
    rank = s["rank"]
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"config.method.rank must be an integer >= 1, got {rank!r}")
    alpha = s["alpha"]
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"config.method.alpha must be a positive number (or None for alpha = rank), got {alpha!r}")
    try:
        lora_lib.check_lora(teacher.params, s["rank"], s["targets"])
    except ValueError as err:
        raise ValueError(f"config.method.rank / config.method.targets: {err}") from None
    adaptation.check_target_data(config)


def build(config, teacher: Teacher) -> Program:
    """Trainable: the adapters (``init_lora`` of the teacher's params); frozen: the teacher's variables; the
    student: ``merge_lora`` of the two."""
    s = settings(config)
    rank, alpha, targets = int(s["rank"]), float(s["alpha"]), s["targets"]
    apply = adaptation.training_apply_fn(teacher)
    schedule, prediction = teacher.schedule, teacher.prediction

    def merged(adapters, frozen):
        return lora_lib.merge_lora(frozen["teacher"], adapters, alpha, rank)

    def init(frozen, key):
        return lora_lib.init_lora(frozen["teacher"], key, rank, targets)

    def loss(adapters, frozen, batch, key):
        noise_key, model_key = jax.random.split(key)
        x_t, t, target = adaptation.noised(batch, noise_key, schedule, prediction)
        out = apply(merged(adapters, frozen), x_t, t, batch.get("label"), model_key).astype(x_t.dtype)
        return jnp.mean((out - target) ** 2), {}

    return adaptation.student_program(config, teacher, init=init, loss=loss, student=merged,
                                      frozen={"teacher": teacher.params}, student_reads_frozen=True)


METHOD = Method(name="lora", build=build, validate=validate,
                doc="LoRA: train rank-r adapters W0 + (alpha/r) A^T B on the teacher's block kernels")
