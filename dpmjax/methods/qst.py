"""Quantized Side Tuning (``--method qst``; Zhang et al., "QST: Fast and Memory-Efficient Tuning of Quantized LLMs",
ACL 2024) of a diffusion model: a 4-bit frozen backbone and a small trained side network beside it.

    dpmjax finetune --method qst --teacher runs/digits --workdir runs/digits_invert_qst --config configs/methods/qst.py
    dpmjax sample --workdir runs/digits_invert_qst

The teacher's Dense / Conv kernels are quantised once, in ``build``, to NF4 with double-quantised scales
(``dpmjax.nn.quantize``: packed 4-bit codes, ~4.13 bits per weight) and kept in ``Program.frozen``; each update
dequantises them inside the jitted step and runs the backbone forward under ``jax.lax.stop_gradient`` (no
backward pass through it: the gradient reaches the side network only through the backbone's frozen output head).
The side network (``dpmjax.nn.side``) reads every block's output h_i through a low-rank downsampler and a
learned gate, and its result is mixed into the head's input by a second gate:

    h_side_i = side_block_i((1 - sigmoid(z_i)) down_i(h_i) + sigmoid(z_i) h_side_{i-1})
    out      = head((1 - sigmoid(z_out)) up(h_side_L) + sigmoid(z_out) h_L)                  (QST, Sec. 3.2)

trained on the adaptation core's denoising loss (``dpmjax.methods.adaptation``; the teacher's own target).
Trainable: the side network and its gates only; the optimizer state and checkpoints hold nothing else.
``up`` starts at zero, so the network starts as the (quantised) teacher (``dpmjax.nn.side``, departure (a)).

The output workdir's model is kind ``"qst"`` (``dpmjax.nn.side.QSTModel``: the teacher's model section plus
``backbone_kind`` and ``qst_*`` fields) with variables ``{"params": {"backbone": the dequantised NF4 weights,
"side": the side network}}``: ``dpmjax sample --workdir OUT`` rebuilds the quantised backbone from the teacher's
workdir (``config.teacher.workdir``; ``student_reads_frozen``) and samples it like any model.

config.method:
  reduction:    r, side widths d_i / r (8; QST uses 16 on LLaMA); at most the narrowest block width.
  adapter_dim:  the downsamplers' bottleneck (16, QST's ``peft_hidden_size``).
  gate_init:    the initial z of every gate (0.5, the official code's; sigmoid(0.5) = 0.62 keeps the backbone).
  quantize:     a tuple of regular expressions over "/"-joined param paths, the item "kernels" (the default,
                ("kernels",)) standing for every Dense / Conv kernel; a pattern that selects a bias, a norm or
                an embedding is refused (unsupported layer).
  double_quant: quantise the NF4 block scales to 8 bits again (True, as QLoRA / QST).
Supported teachers: model kinds "unet", "diffusers_unet" (each ResBlock's output) and "dit" (each block's tokens).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from dpmjax.methods import adaptation
from dpmjax.methods.base import Method, Program, Teacher, method_settings
from dpmjax.nn import network_time
from dpmjax.nn import quantize as nf4
from dpmjax.nn import side as side_lib

__all__ = ["METHOD", "build", "validate", "DEFAULTS", "quantized_backbone", "example_inputs"]

DEFAULTS: dict = {"reduction": 8, "adapter_dim": 16, "gate_init": 0.5, "quantize": ("kernels",), "double_quant": True}
SUPPORTED_KINDS = ("unet", "diffusers_unet", "dit")


def _settings(config) -> dict:
    s = method_settings(config, DEFAULTS)
    if not isinstance(s["quantize"], str):
        s["quantize"] = tuple(s["quantize"])
    return s


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def example_inputs(teacher: Teacher):
    """(x [1, H, W, C], t [1], y or None) zeros of the teacher's input shapes (for tracing shapes)."""
    x = jnp.zeros((1,) + teacher.image_shape, jnp.float32)
    y = jnp.zeros((1,), jnp.int32) if teacher.num_classes is not None else None
    return x, jnp.zeros((1,), jnp.float32), y


def _is_abstract(tree) -> bool:
    return any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(tree))


def quantized_backbone(teacher: Teacher, targets="kernels", double_quant: bool = True):
    """The teacher's variables with the selected kernels as ``NF4Tensor``s (shapes only for an abstract teacher)."""
    quantize = lambda params: nf4.quantize_tree(params, targets, double_quant=double_quant)  # noqa: E731
    if _is_abstract(teacher.params):
        return jax.eval_shape(quantize, teacher.params)
    return quantize(teacher.params)  # numpy on the host (dpmjax.nn.quantize.quantize_nf4)


def validate(config, teacher: Teacher) -> None:
    """ValueError naming the setting before anything compiles: unknown settings, a model kind QST does not read
    (anything but unet / diffusers_unet / dit), a quantize pattern that selects an unsupported layer or nothing,
    reduction above a block's width, bad adapter_dim / gate_init / double_quant, and the target data checks."""
    given = method_settings(config, DEFAULTS)
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"config.method: unknown qst settings {unknown}; it has {sorted(DEFAULTS)}")
    s = _settings(config)
    kind = teacher.config.model.get("kind")
    if kind not in SUPPORTED_KINDS:
        raise ValueError(f"qst reads the blocks of model kinds {SUPPORTED_KINDS}; the teacher ({teacher.workdir}) is "
                         f"model kind {kind!r}")
    side_lib.backbone_spec(teacher.model)
    for name in ("reduction", "adapter_dim"):
        if not _positive_int(s[name]):
            raise ValueError(f"config.method.{name} must be a positive integer, got {s[name]!r}")
    gate = s["gate_init"]
    if isinstance(gate, bool) or not isinstance(gate, (int, float)) or not math.isfinite(gate):
        raise ValueError(f"config.method.gate_init must be a finite number, got {gate!r}")
    if not isinstance(s["double_quant"], bool):
        raise ValueError(f"config.method.double_quant must be True or False, got {s['double_quant']!r}")
    try:
        nf4.quantize_plan(teacher.params, s["quantize"])
    except ValueError as err:
        raise ValueError(f"config.method.quantize: {err}") from None
    x, t, y = example_inputs(teacher)
    shapes, _ = side_lib.feature_shapes(teacher.model, teacher.params, x, t, y)
    try:
        side_lib.side_widths(shapes, s["reduction"])
    except ValueError as err:
        raise ValueError(f"config.method.reduction: {err}") from None
    adaptation.check_target_data(config)


def build(config, teacher: Teacher) -> Program:
    """Frozen: the NF4 backbone (quantised here, once); trainable: the side network (``init_side``); the student:
    ``{"params": {"backbone": dequantised, "side": ...}}`` of model kind ``"qst"``."""
    s = _settings(config)
    backbone, schedule, prediction = teacher.model, teacher.schedule, teacher.prediction
    conditional = teacher.num_classes is not None
    reduction, adapter_dim, gate_init = int(s["reduction"]), int(s["adapter_dim"]), float(s["gate_init"])
    x_example, t_example, y_example = example_inputs(teacher)

    def init(frozen, key):
        variables = nf4.dequantize_tree(frozen["backbone"])
        return side_lib.init_side(key, backbone, variables, x_example, t_example, reduction=reduction,
                                  adapter_dim=adapter_dim, gate_init=gate_init, y=y_example)

    def loss(side, frozen, batch, key):
        x_t, t, target = adaptation.noised(batch, key, schedule, prediction)
        variables = nf4.dequantize_tree(frozen["backbone"])  # stop_gradient'ed inside qst_apply
        out = side_lib.qst_apply(backbone, variables, side, x_t, network_time(schedule, t),
                                 y=batch.get("label") if conditional else None).astype(x_t.dtype)
        return jnp.mean((out - target) ** 2), {}

    def student(side, frozen):
        return {"params": {"backbone": nf4.dequantize_tree(frozen["backbone"])["params"], "side": side}}

    kind = teacher.config.model.get("kind")
    output = {"model": {"kind": "qst", "backbone_kind": kind, "qst_reduction": reduction,
                        "qst_adapter_dim": adapter_dim, "qst_gate_init": gate_init}}
    frozen = {"backbone": quantized_backbone(teacher, s["quantize"], bool(s["double_quant"]))}
    return adaptation.student_program(config, teacher, init=init, loss=loss, student=student, frozen=frozen,
                                      output=output, student_reads_frozen=True)


METHOD = Method(name="qst", build=build, validate=validate,
                doc="Quantized Side Tuning: NF4 frozen backbone, a gated side network on its block features")
