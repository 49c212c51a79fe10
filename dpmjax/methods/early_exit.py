"""Layer self-distillation for early exit: DiT heads after intermediate blocks, GO-LSD style.

    dpmjax finetune --method early_exit --teacher runs/digits_dit --workdir runs/digits_dit_exit \
        --config configs/methods/early_exit.py
    dpmjax sample --workdir runs/digits_dit_exit          # exits early at high noise, no sampler option needed

D-FINE's GO-LSD (Peng et al., ICLR 2025, Sec. 3.2) distils the final decoder layer's refined prediction into the
shallower layers. Transferred to a DiT (``dpmjax.nn.dit``, ``exit_blocks``): a head after block k (the final
layer's form, own params) predicts the network's output f_k from the first k blocks, trained with

    L = ||f_D - y||^2 + w_exit sum_k ||f_k - y||^2 + w_distill sum_k ||f_k - sg(f_D)||^2

(means over pixels; y the teacher's regression target eps / x0 / v of ``dpmjax.methods.adaptation.noised``, D the
depth, sg = stop_gradient: the final layer teaches, it is not pulled toward the heads). The distillation term is
the squared-error analogue of GO-LSD's KL between the final and the shallow layers' distributions (the outputs here
are regressions, not distributions). At high noise the optimal prediction is smooth (close to the data mean for
x0, close to x_t / sigma for eps), so a shallow head can replace the full stack there; the output workdir's model
gets ``exit_schedule`` and ``dpmjax sample`` runs exit_depth(t) = min({k : t > t_k} | {D}) blocks per call.

config.method:
  exit_blocks: block counts k in [1, depth - 1] that get a head (a list).
  exit_schedule: [(t_k, k), ...]: exit after block k for continuous time t > t_k, t_k in (0, 1]; k in exit_blocks
      (the output model's ``exit_schedule`` is these thresholds on the network's time scale, ``network_time``).
  exit_loss_weight: w_exit (>= 0), the heads' own denoising loss.
  distill_weight: w_distill (>= 0), the GO-LSD term.
  train_trunk: True trains every weight; False only the exit heads (the trunk and final layer stay the
      teacher's, so the full-depth model is exactly the teacher).
  init_heads: "copy" starts each head as the teacher's final layer (a warm start: the final layer applied to
      intermediate tokens); "zeros" as a fresh DiT's final layer (adaLN-Zero: outputs 0).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from dpmjax.methods import adaptation
from dpmjax.methods.base import Method, Program, Teacher, method_settings

__all__ = ["METHOD", "build", "validate", "exit_loss", "network_schedule", "DEFAULTS"]

DEFAULTS: dict = {"exit_blocks": (2,), "exit_schedule": ((0.6, 2),), "exit_loss_weight": 1.0,
                  "distill_weight": 1.0, "train_trunk": True, "init_heads": "copy"}


def _settings(config) -> dict:
    return method_settings(config, DEFAULTS)


def _is_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def validate(config, teacher: Teacher) -> None:
    """ValueError naming the setting, before anything compiles: a non-DiT teacher, unknown settings, exit blocks
    outside [1, depth - 1], schedule thresholds outside (0, 1] or exits that have no head, negative weights."""
    from dpmjax.nn.dit import check_exits

    kind = teacher.config.model.get("kind")
    if kind != "dit":
        raise ValueError(f"--method early_exit adds exit heads to a DiT teacher; this teacher's model is "
                         f"config.model.kind={kind!r}")
    settings = _settings(config)
    unknown = sorted(set(settings) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"config.method: unknown early_exit settings {unknown}; it has {sorted(DEFAULTS)}")
    depth = int(teacher.config.model.depth)
    blocks = settings["exit_blocks"]
    if not isinstance(blocks, (list, tuple)) or not blocks:
        raise ValueError(f"config.method.exit_blocks must be a non-empty list of block counts, got {blocks!r}")
    check_exits(depth, tuple(blocks), (), name="config.method")
    schedule = settings["exit_schedule"]
    if not isinstance(schedule, (list, tuple)):
        raise ValueError(f"config.method.exit_schedule must be a list of (t_threshold, exit_block), got {schedule!r}")
    for entry in schedule:
        if not isinstance(entry, (list, tuple)) or len(entry) != 2:
            raise ValueError(f"config.method.exit_schedule entries are (t_threshold, exit_block), got {entry!r}")
        threshold, k = entry
        if not _is_number(threshold) or not 0.0 < threshold <= 1.0:
            raise ValueError(f"config.method.exit_schedule threshold {threshold!r} must be a time in (0, 1]")
        if k not in tuple(blocks):
            raise ValueError(f"config.method.exit_schedule exits at block {k!r}, which has no head: "
                             f"config.method.exit_blocks={list(blocks)}")
    for name in ("exit_loss_weight", "distill_weight"):
        if not _is_number(settings[name]) or not settings[name] >= 0:
            raise ValueError(f"config.method.{name} must be a number >= 0, got {settings[name]!r}")
    if not isinstance(settings["train_trunk"], bool):
        raise ValueError(f"config.method.train_trunk must be True or False, got {settings['train_trunk']!r}")
    if settings["init_heads"] not in ("copy", "zeros"):
        raise ValueError(f"config.method.init_heads must be 'copy' or 'zeros', got {settings['init_heads']!r}")
    adaptation.check_target_data(config)


def network_schedule(schedule, exit_schedule) -> list:
    """The model config's ``exit_schedule``: each continuous-time threshold t_k on the network's time scale
    (``dpmjax.nn.network_time``, e.g. 1000 t), as [[threshold, k], ...] (JSON-friendly)."""
    from dpmjax.nn import network_time

    return [[float(network_time(schedule, jnp.float32(t))), int(k)] for t, k in exit_schedule]


def exit_loss(final, exits: dict, target, *, exit_loss_weight: float, distill_weight: float):
    """(L, scalars): L = mse(f_D, y) + w_exit sum_k mse(f_k, y) + w_distill sum_k mse(f_k, sg(f_D)) (module
    docstring); scalars "final_mse", "exit_mse" (sum over heads) and "distill" (sum over heads)."""
    mse = lambda a, b: jnp.mean((a - b) ** 2)  # noqa: E731
    teacher_signal = jax.lax.stop_gradient(final)
    final_mse = mse(final, target)
    exit_mse = sum((mse(out, target) for out in exits.values()), jnp.zeros((), final.dtype))
    distill = sum((mse(out, teacher_signal) for out in exits.values()), jnp.zeros((), final.dtype))
    value = final_mse + exit_loss_weight * exit_mse + distill_weight * distill
    return value, {"final_mse": final_mse, "exit_mse": exit_mse, "distill": distill}


def _is_head(name: str) -> bool:
    return name.startswith("exit_")


def build(config, teacher: Teacher) -> Program:
    """Init: the teacher's variables plus the exit heads (copies of its final layer, or zeros); update: one
    Adam step on ``exit_loss`` (trunk frozen by zeroed updates and stop_gradient when ``train_trunk`` is False)."""
    from dpmjax.nn import network_time

    settings = _settings(config)
    blocks = tuple(int(k) for k in settings["exit_blocks"])
    schedule = [(float(t), int(k)) for t, k in settings["exit_schedule"]]
    model = teacher.model.clone(exit_blocks=blocks, exit_schedule=())
    train_trunk = bool(settings["train_trunk"])
    weights = dict(exit_loss_weight=float(settings["exit_loss_weight"]),
                   distill_weight=float(settings["distill_weight"]))
    zeros = settings["init_heads"] == "zeros"
    conditional = teacher.num_classes is not None
    noise_schedule, prediction = teacher.schedule, teacher.prediction

    def init(frozen, key):
        params = dict(jax.tree.map(jnp.copy, frozen["teacher"]["params"]))
        for k in blocks:
            for part in ("adaLN", "linear"):
                name = f"exit_{k}_{part}"
                if name not in params:  # a teacher that already has this head keeps it
                    source = frozen["teacher"]["params"][f"final_{part}"]
                    params[name] = jax.tree.map(jnp.zeros_like if zeros else jnp.copy, source)
        return {"params": params}

    def loss(variables, frozen, batch, key):
        noise_key, model_key = jax.random.split(key)
        x_t, t, target = adaptation.noised(batch, noise_key, noise_schedule, prediction)
        params = variables["params"]
        if not train_trunk:  # no gradient flows into the trunk: the backward pass stops at the heads
            params = {n: v if _is_head(n) else jax.lax.stop_gradient(v) for n, v in params.items()}
        final, exits = model.apply({"params": params}, x_t, network_time(noise_schedule, t),
                                   y=batch.get("label") if conditional else None, train=True,
                                   rngs={"dropout": model_key}, return_exits=True)
        return exit_loss(final.astype(x_t.dtype), {k: v.astype(x_t.dtype) for k, v in exits.items()}, target,
                         **weights)

    tx = adaptation.make_optimizer(config)
    if not train_trunk:
        def labels(variables):
            return {"params": {n: jax.tree.map(lambda _: "heads" if _is_head(n) else "trunk", v)
                               for n, v in variables["params"].items()}}
        tx = optax.multi_transform({"heads": tx, "trunk": optax.set_to_zero()}, labels)
    output = {"model": {"exit_blocks": list(blocks), "exit_schedule": network_schedule(noise_schedule, schedule)}}
    return adaptation.student_program(config, teacher, init=init, loss=loss, student=lambda variables: variables,
                                      frozen={"teacher": {"params": teacher.params["params"]}},
                                      metric_names=("final_mse", "exit_mse", "distill"), output=output, tx=tx)


METHOD = Method(name="early_exit", build=build, validate=validate,
                doc="DiT exit heads self-distilled from the final block (GO-LSD); shallow exits at high noise")
