"""Sparse finetuning with SquareHead distillation (Kurtic et al. 2023, arXiv 2310.06927): gradual magnitude pruning
of the teacher's weights while finetuning them on the teacher's own data, distilled from the dense teacher.

    dpmjax finetune --method sparse --teacher runs/digits --workdir runs/digits_sparse90 \
        --config configs/methods/sparse.py:sparsity=0.9,distill=squarehead
    dpmjax sample --workdir runs/digits_sparse90

The student starts as the dense teacher f_T and is trained on the teacher's dataset (``config.data.name`` unset:
the output workdir records the teacher's data) with

    L(theta) = E || f_theta(x_t, t) - target ||^2                                 (denoising loss, Ho et al. eq. 14)
             + output_weight     * E || f_theta(x_t, t) - f_T(x_t, t) ||^2             (output distillation)
             + squarehead_weight * sum_l  mean((h_S^l - h_T^l)^2) / (mean((h_T^l)^2) + eps)   (SquareHead, Sec. 3)

h^l the output of block l (UNet / diffusers UNet: every ResBlock; DiT: every transformer block), read with flax
method interception (as ``dpmjax.nn.side``) on the same x_t, t for teacher and student; the means run over the
batch and every feature axis, one normalised MSE per block, as the SparseFinetuning / Composer code (which sums
over the transformer's hidden states) does. eps = 1e-6 (the official code uses bf16's epsilon because it runs in
bf16; these networks run in float32). The student runs in training mode (dropout), the teacher in eval mode, as
in every method here; with dropout 0 (the digits teachers) both distillation terms are 0 at init.

Gradual magnitude pruning (Zhu & Gupta 2017, "To prune, or not to prune", eq. 1): at the pruning updates
t in {t_0, t_0 + dt, ..., t_end} (and t_end itself) the target sparsity is

    s_t = s_f + (s_i - s_f) (1 - (t - t_0) / (t_end - t_0))^3        (t_end - t_0 = n dt in the paper)

and each prunable tensor W keeps its n - round(s_t n) largest |W| entries (``scope="per_tensor"``; ``"global"``
ranks all prunable weights together, as Zhu & Gupta's "global" variant: layers then end at different sparsities).
Between pruning updates and after t_end the masks stay fixed and are re-applied after every optimizer step (the
``ConstantPruningModifier`` of the official code): pruned weights are exactly 0 in the state and in the saved
student. The masks live in the optimizer state (``PruneState``), part of the method's state, so a resumed run
keeps them. Prunable: the kernels of Dense and Conv layers (every leaf named ``kernel`` with >= 2 axes, the
time-embedding MLP, attention projections and the input / output convolutions included); biases, norm scales and
embeddings stay dense, as SparseGPT / SquareHead prune only the linear layers (these are a few % of the weights).

Departures from the paper, and why: the paper prunes its LLMs one-shot with SparseGPT and then finetunes (T5 /
Whisper with gradual magnitude pruning); here every run prunes gradually by magnitude (SparseGPT's Hessian solve
is not implemented), and the task loss is the denoising loss instead of cross-entropy, so "output distillation"
is the MSE between the outputs (KL between logits has no analogue for a regression output).

config.method:
  sparsity: s_f, the final fraction of prunable weights set to 0, in [0, 1).
  initial_sparsity: s_i (0), in [0, sparsity].
  prune_start / prune_end: t_0 / t_end, update indices (0 / 0.75 * num_steps when ``prune_end`` is None), with
      0 <= t_0 <= t_end < train.num_steps (the recovery updates t_end + 1 ... run at s_f).
  prune_every: dt, updates between pruning steps (>= 1).
  scope: "per_tensor" (default) or "global".
  output_weight, squarehead_weight: the weights of the distillation terms (>= 0; 0 turns a term off and skips the
      teacher's forward when both are 0).
The EMA (``train.ema_decay``) is masked with the current masks after each update, so an EMA student is sparse too.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from dpmjax.methods import adaptation
from dpmjax.methods.base import Method, Program, StudentState, Teacher, method_settings

__all__ = ["METHOD", "build", "validate", "cubic_sparsity", "prunable", "magnitude_masks", "apply_masks",
           "PruneState", "gradual_pruning", "block_features", "squarehead_loss", "sparsity_of", "settings"]

DEFAULTS: dict = {"sparsity": 0.5, "initial_sparsity": 0.0, "prune_start": 0, "prune_end": None, "prune_every": 10,
                  "scope": "per_tensor", "output_weight": 0.0, "squarehead_weight": 0.0}
SCOPES = ("per_tensor", "global")
# model class -> the block class whose outputs SquareHead matches (the blocks QST's side network reads)
BLOCKS = {"UNet": "ResBlock", "DiffusersUNet2D": "ResnetBlock2D", "DiT": "DiTBlock"}
SQUAREHEAD_EPS = 1e-6


def _number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def settings(config) -> dict:
    """The method settings with ``prune_end`` resolved (0.75 * ``train.num_steps`` when None)."""
    s = method_settings(config, DEFAULTS)
    if s["prune_end"] is None and _number(config.train.get("num_steps")):
        s["prune_end"] = int(0.75 * int(config.train.num_steps))
    return s


def validate(config, teacher: Teacher) -> None:
    """ValueError naming the setting: unknown settings, a sparsity outside [0, 1), negative weights, a pruning
    schedule outside the run's updates, a SquareHead weight for a network without known blocks."""
    s = method_settings(config, DEFAULTS)
    unknown = sorted(set(s) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"config.method: unknown sparse settings {unknown}; it has {sorted(DEFAULTS)}")
    for name in ("sparsity", "initial_sparsity"):
        value = s[name]
        if not _number(value) or not 0.0 <= value < 1.0:
            raise ValueError(f"config.method.{name} must be a fraction in [0, 1) (1 would prune every weight), "
                             f"got {value!r}")
    if s["initial_sparsity"] > s["sparsity"]:
        raise ValueError(f"config.method.initial_sparsity={s['initial_sparsity']} exceeds config.method.sparsity="
                         f"{s['sparsity']}: the cubic schedule only raises sparsity")
    for name in ("output_weight", "squarehead_weight"):
        if not _number(s[name]) or not s[name] >= 0:
            raise ValueError(f"config.method.{name} must be a number >= 0, got {s[name]!r}")
    if s["scope"] not in SCOPES:
        raise ValueError(f"config.method.scope must be one of {SCOPES}, got {s['scope']!r}")
    num_steps = config.train.get("num_steps")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"config.train.num_steps must be an int >= 1, got {num_steps!r}")
    s = settings(config)
    for name in ("prune_start", "prune_end", "prune_every"):
        if isinstance(s[name], bool) or not isinstance(s[name], int):
            raise ValueError(f"config.method.{name} must be an int (an update index), got {s[name]!r}")
    if s["prune_every"] < 1:
        raise ValueError(f"config.method.prune_every must be >= 1, got {s['prune_every']}")
    if not 0 <= s["prune_start"] <= s["prune_end"] < num_steps:
        raise ValueError(f"config.method.prune_start={s['prune_start']} and config.method.prune_end={s['prune_end']} "
                         f"must satisfy 0 <= prune_start <= prune_end < config.train.num_steps={num_steps} (the "
                         f"pruning ramp must end within the run)")
    if s["squarehead_weight"] and type(teacher.model).__name__ not in BLOCKS:
        raise ValueError(f"config.method.squarehead_weight={s['squarehead_weight']}: SquareHead reads the blocks of "
                         f"{sorted(BLOCKS)}; {type(teacher.model).__name__} is not supported (set it to 0)")
    adaptation.check_target_data(config)


# ----------------------------------------------------------------------------------------------- the schedule

def cubic_sparsity(step, *, final: float, initial: float = 0.0, start: int = 0, end: int = 0):
    """s_t = s_f + (s_i - s_f)(1 - (t - t_0)/(t_end - t_0))^3 (Zhu & Gupta 2017, eq. 1), clipped to [t_0, t_end]:
    s_i before t_0, s_f from t_end on (``end == start``: one-shot at t_0). ``step`` may be traced; float32."""
    t = jnp.asarray(step, jnp.float32)
    span = float(max(end - start, 1))
    progress = jnp.clip((t - float(start)) / span, 0.0, 1.0)
    if end == start:
        progress = jnp.where(t >= float(start), 1.0, 0.0).astype(jnp.float32)
    return jnp.float32(final) + jnp.float32(initial - final) * (1.0 - progress) ** 3


def is_pruning_step(step, *, start: int, end: int, every: int):
    """Whether update ``step`` (0-based, traced) recomputes the masks: t_0 <= t <= t_end, (t - t_0) % dt == 0 or
    t == t_end (so the last pruning reaches s_f even when dt does not divide t_end - t_0)."""
    step = jnp.asarray(step, jnp.int32)
    return (step >= start) & (step <= end) & (((step - start) % every == 0) | (step == end))


# ------------------------------------------------------------------------------------------------ the masks

def prunable(path, leaf) -> bool:
    """A Dense / Conv kernel: a leaf named ``kernel`` with >= 2 axes (biases, norms, embeddings stay dense)."""
    name = getattr(path[-1], "key", getattr(path[-1], "name", None)) if path else None
    return name == "kernel" and getattr(leaf, "ndim", 0) >= 2


def _ranks(flat):
    """The rank of each entry of ``flat`` by |value| (0 = smallest; ties by position: exact counts)."""
    order = jnp.argsort(jnp.abs(flat), stable=True)
    return jnp.zeros(flat.shape, jnp.int32).at[order].set(jnp.arange(flat.size, dtype=jnp.int32))


def magnitude_masks(params, sparsity, scope: str = "per_tensor"):
    """Boolean masks keeping the largest |w| of each prunable tensor (``per_tensor``: exactly
    n - round(s n) of its n entries) or of all of them together (``global``: n_total - round(s n_total)); every
    other leaf gets a scalar True. ``sparsity`` may be traced."""
    sparsity = jnp.asarray(sparsity, jnp.float32)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    chosen = [i for i, (path, leaf) in enumerate(leaves) if prunable(path, leaf)]
    masks = [jnp.ones((), bool) for _ in leaves]
    if scope == "per_tensor":
        for i in chosen:
            leaf = leaves[i][1]
            count = jnp.round(sparsity * leaf.size).astype(jnp.int32)
            masks[i] = (_ranks(leaf.reshape(-1)) >= count).reshape(leaf.shape)
    elif scope == "global":
        if chosen:
            flat = jnp.concatenate([leaves[i][1].reshape(-1).astype(jnp.float32) for i in chosen])
            keep = _ranks(flat) >= jnp.round(sparsity * flat.size).astype(jnp.int32)
            offset = 0
            for i in chosen:
                leaf = leaves[i][1]
                masks[i] = keep[offset:offset + leaf.size].reshape(leaf.shape)
                offset += leaf.size
    else:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    return jax.tree_util.tree_unflatten(treedef, masks)


def apply_masks(params, masks):
    """``params`` with the masked-out entries set to exactly 0."""
    return jax.tree.map(lambda p, m: jnp.where(m, p, jnp.zeros((), p.dtype)), params, masks)


def sparsity_of(params) -> dict:
    """{path: fraction of exact zeros} of every prunable tensor, plus "total" over all of them (host side)."""
    import numpy as np

    out, zeros, size = {}, 0, 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if prunable(path, leaf):
            z = int(np.sum(np.asarray(leaf) == 0))
            out[jax.tree_util.keystr(path)] = z / leaf.size
            zeros, size = zeros + z, size + leaf.size
    out["total"] = zeros / max(size, 1)
    return out


class PruneState(NamedTuple):
    """The pruning optimizer's state: the update count, the masks and the inner optimizer's state."""

    count: jax.Array     # [] int32: updates done
    masks: Any           # bool, like the params (scalar True for leaves never pruned)
    inner: Any           # the wrapped optimizer's state


def gradual_pruning(inner: optax.GradientTransformation, *, final: float, initial: float = 0.0, start: int = 0,
                    end: int = 0, every: int = 1, scope: str = "per_tensor") -> optax.GradientTransformation:
    """``inner`` followed by gradual magnitude pruning: w' = m_t * (w + u), m_t recomputed from |w + u| at the pruning
    updates (``cubic_sparsity``, ``is_pruning_step``) and kept otherwise. The returned update is w' - w, so
    ``optax.apply_updates`` yields w' with pruned entries exactly 0 (w + (-w) = 0 in IEEE arithmetic)."""

    def init_fn(params):
        masks = jax.tree_util.tree_map_with_path(
            lambda path, p: jnp.ones(p.shape, bool) if prunable(path, p) else jnp.ones((), bool), params)
        return PruneState(count=jnp.zeros((), jnp.int32), masks=masks, inner=inner.init(params))

    def update_fn(updates, state: PruneState, params=None, **extra_args):
        if params is None:
            raise ValueError("gradual_pruning needs the params (optax.GradientTransformation update's third argument)")
        updates, inner_state = inner.update(updates, state.inner, params, **extra_args)
        candidate = optax.apply_updates(params, updates)
        sparsity = cubic_sparsity(state.count, final=final, initial=initial, start=start, end=end)
        masks = jax.lax.cond(is_pruning_step(state.count, start=start, end=end, every=every),
                             lambda: magnitude_masks(candidate, sparsity, scope), lambda: state.masks)
        new = apply_masks(candidate, masks)
        updates = jax.tree.map(lambda n, p: n - p, new, params)
        return updates, PruneState(count=state.count + 1, masks=masks, inner=inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ----------------------------------------------------------------------------------------- block features

def block_features(model, variables, x, t_network, *, y=None, train=False, rngs=None):
    """(output, [h_1, ..., h_L]): ``model.apply`` with every block's output recorded by flax method interception
    (``BLOCKS``; the network is not modified). ``t_network`` is the network's own time input."""
    block_class = BLOCKS.get(type(model).__name__)
    if block_class is None:
        raise ValueError(f"SquareHead reads the blocks of {sorted(BLOCKS)}; {type(model).__name__} is not supported")
    features = []

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and type(context.module).__name__ == block_class:
            features.append(out)
        return out

    with nn.intercept_methods(interceptor):
        out = model.apply(variables, x, t_network, y=y, train=train, rngs=rngs or {})
    return out, features


def squarehead_loss(student_features, teacher_features, eps: float = SQUAREHEAD_EPS):
    """sum_l mean((h_S^l - h_T^l)^2) / (mean((h_T^l)^2) + eps) (SquareHead, Kurtic et al. 2023, Sec. 3); the
    teacher's features carry no gradient."""
    if len(student_features) != len(teacher_features):
        raise ValueError(f"{len(student_features)} student blocks vs {len(teacher_features)} teacher blocks")
    total = jnp.zeros((), jnp.float32)
    for s, t in zip(student_features, teacher_features):
        t = jax.lax.stop_gradient(t).astype(jnp.float32)
        total = total + jnp.mean((s.astype(jnp.float32) - t) ** 2) / (jnp.mean(t ** 2) + eps)
    return total


# ------------------------------------------------------------------------------------------------ the method

def build(config, teacher: Teacher) -> Program:
    """Init copies the teacher; the loss is the denoising loss plus the weighted distillation terms; the optimizer
    is ``config.optim``'s wrapped by ``gradual_pruning``; the EMA is masked like the params."""
    from dpmjax.nn import network_time

    s = settings(config)
    model, schedule, prediction = teacher.model, teacher.schedule, teacher.prediction
    conditional = teacher.num_classes is not None
    output_weight, squarehead_weight = float(s["output_weight"]), float(s["squarehead_weight"])
    needs_teacher = output_weight > 0 or squarehead_weight > 0

    def init(frozen, key):
        return jax.tree.map(jnp.copy, frozen["teacher"])

    def loss(params, frozen, batch, key):
        noise_key, model_key = jax.random.split(key)
        x_t, t, target = adaptation.noised(batch, noise_key, schedule, prediction)
        y = batch.get("label") if conditional else None
        t_net = network_time(schedule, t)
        if squarehead_weight > 0:
            out, feats = block_features(model, params, x_t, t_net, y=y, train=True, rngs={"dropout": model_key})
        else:
            out, feats = model.apply(params, x_t, t_net, y=y, train=True, rngs={"dropout": model_key}), []
        out = out.astype(x_t.dtype)
        denoise = jnp.mean((out - target) ** 2)
        total, output_mse, square = denoise, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)
        if needs_teacher:
            teacher_out, teacher_feats = block_features(model, frozen["teacher"], x_t, t_net, y=y, train=False) \
                if squarehead_weight > 0 else (model.apply(frozen["teacher"], x_t, t_net, y=y, train=False), [])
            teacher_out = jax.lax.stop_gradient(teacher_out.astype(x_t.dtype))
            output_mse = jnp.mean((out - teacher_out) ** 2)
            if squarehead_weight > 0:
                square = squarehead_loss(feats, teacher_feats)
            total = total + output_weight * output_mse + squarehead_weight * square
        return total, {"denoise": denoise, "output_mse": output_mse, "squarehead": square}

    tx = gradual_pruning(adaptation.make_optimizer(config), final=float(s["sparsity"]),
                         initial=float(s["initial_sparsity"]), start=int(s["prune_start"]), end=int(s["prune_end"]),
                         every=int(s["prune_every"]), scope=str(s["scope"]))
    core = adaptation.student_program(config, teacher, init=init, loss=loss, student=lambda params: params,
                                      frozen={"teacher": teacher.params},
                                      metric_names=("denoise", "output_mse", "squarehead", "sparsity"), tx=tx)

    def update(state: StudentState, batch, frozen, key):
        new, scalars = core.update(state, batch, frozen, key)
        masks = new.opt_state.masks
        new = new.replace(ema_params=apply_masks(new.ema_params, masks))
        kept = [(jnp.sum(m), m.size) for m in jax.tree.leaves(masks) if m.ndim > 0]
        total = sum(n for _, n in kept)
        fraction = 1.0 - sum(k.astype(jnp.float32) for k, _ in kept) / float(max(total, 1)) if kept else \
            jnp.zeros((), jnp.float32)
        return new, {**scalars, "sparsity": jnp.asarray(fraction, jnp.float32)}

    return Program(init=core.init, update=update, frozen=core.frozen, student=core.student,
                   metric_names=core.metric_names, output=core.output, needs_data=True)


def prunable_count(params) -> int:
    """How many weights the masks cover (host side; works on ``ShapeDtypeStruct``s)."""
    return sum(math.prod(leaf.shape) for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
               if prunable(path, leaf))


METHOD = Method(name="sparse", build=build, validate=validate,
                doc="gradual magnitude pruning while finetuning, with output / SquareHead distillation (Kurtic 2023)")
