"""LoRA as a pure transform of a params pytree: low-rank adapters on chosen kernels, merged into the weights.

    lora = init_lora(teacher_params, key, rank=4, targets="blocks")      # {"params": {...: {"kernel": {"a", "b"}}}}
    params = merge_lora(teacher_params, lora, alpha=4.0, rank=4)          # the same tree as teacher_params

Low-Rank Adaptation (Hu et al. 2021, eq. 3) keeps a pretrained weight W_0 frozen and learns a rank-r update:

    h = W_0 x + (alpha / r) B A x,        B in R^{d x r} (zero at init),  A in R^{r x k} (random at init)

so the adapted network equals the pretrained one at step 0 and only r (d + k) numbers per layer are trained.
Flax kernels act on the right (y = x W, W [in, out]), so here W = W_0 + (alpha / r) A^T B with A [r, in] and
B [r, out]. A convolution kernel [kh, kw, in, out] is the (kh kw in) x out matrix of its im2col form: its
update A^T B [kh kw in, out] is reshaped to the kernel's shape (LoCon / diffusers' conv LoRA).

Architecture-agnostic: no module changes; the adapters live in a pytree that mirrors the params' nesting
(only the targeted kernels, each replaced by ``{"a", "b"}``), so the sampler, checkpoints and sharding see
ordinary dicts. Targets are regular expressions searched in the "/"-joined path of each leaf
("params/down_0_0/conv_in/kernel"); ``"blocks"`` (``DEFAULT_TARGETS``) names every conv and dense kernel
inside the residual and attention blocks of the dpmjax UNet, the diffusers UNet port and the DiT, and leaves
out the input / output convolutions, the resamplers and the timestep / adaLN projections (diffusers' LoRA
for UNets adapts attention and, in its LoCon form, the resblock convolutions; the stem and head stay frozen).
A: N(0, 1 / in) (peft initialises A with kaiming-uniform of the same scale); B: 0.
"""
from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
from flax import traverse_util

__all__ = ["DEFAULT_TARGETS", "lora_targets", "check_lora", "init_lora", "merge_lora", "merge_scaled", "lora_delta"]

DEFAULT_TARGETS = (
    r"/(down_\d+_\d+|mid_\d+|up_\d+_\d+)/(conv_in|conv_out|skip)/kernel$",      # dpmjax UNet ResBlocks
    r"_x?attn/(qkv|proj_out|q|k|v)/kernel$",                                      # dpmjax UNet attention
    r"/block_\d+/(qkv|proj|mlp_in|mlp_out)/kernel$",                              # DiT blocks
    r"/resnets_\d+/(conv1|conv2|conv_shortcut)/kernel$",                         # diffusers UNet2DModel port
    r"/attentions_\d+/(to_q|to_k|to_v|to_out_0)/kernel$",
)


def _path(key: tuple) -> str:
    return "/".join(str(k) for k in key)


def _matrix_shape(shape) -> tuple[int, int]:
    """(in, out) of a Dense [in, out] or Conv [kh, kw, in, out] kernel as a matrix."""
    return math.prod(shape[:-1]), shape[-1]


def lora_targets(params, targets="blocks") -> dict:
    """{flat path tuple: kernel shape} of the kernels ``targets`` selects.

    ``targets``: one regular expression or a sequence of them, searched in each leaf's "/"-joined path; the
    item ``"blocks"`` stands for ``DEFAULT_TARGETS`` (whose patterns may each match nothing). ValueError naming the pattern when an explicit pattern matches no kernel (or the
    preset none at all), or when it matches a leaf that is not a kernel of rank >= 2 (a bias, a norm scale)."""
    given = (targets,) if isinstance(targets, str) else tuple(targets)
    if not given:
        raise ValueError("LoRA targets: give at least one pattern (or 'blocks')")
    patterns = [(p, True) for p in DEFAULT_TARGETS] if "blocks" in given else []
    patterns += [(p, False) for p in given if p != "blocks"]
    flat = traverse_util.flatten_dict(_unfrozen(params))
    chosen = {}
    for pattern, preset in patterns:
        try:
            regex = re.compile(pattern)
        except re.error as err:
            raise ValueError(f"LoRA target pattern {pattern!r} is not a regular expression: {err}") from None
        hits = [key for key in flat if regex.search(_path(key))]
        for key in hits:
            shape = tuple(flat[key].shape)
            if key[-1] != "kernel" or len(shape) < 2:
                raise ValueError(f"LoRA target pattern {pattern!r} matches {_path(key)!r} of shape {shape}, which is "
                                 "not a Dense or Conv kernel; LoRA adapts kernels only (end the pattern in /kernel$)")
            chosen[key] = shape
        if not hits and not preset:
            raise ValueError(f"LoRA target pattern {pattern!r} matches no parameter; kernels look like "
                             f"{[_path(k) for k in flat if k[-1] == 'kernel'][:4]}")
    if not chosen:
        raise ValueError(f"LoRA targets {targets!r} match no kernel of this network")
    return chosen


def _unfrozen(params):
    return params.unfreeze() if hasattr(params, "unfreeze") else params


def check_lora(params, rank, targets="blocks") -> dict:
    """``lora_targets`` plus the rank checks (shapes only: ``params`` may be ``jax.ShapeDtypeStruct``s).

    ValueError: rank < 1, or rank above min(in, out) of a targeted kernel (naming it)."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"LoRA rank must be an integer >= 1, got {rank!r}")
    chosen = lora_targets(params, targets)
    for path, shape in chosen.items():
        fan_in, fan_out = _matrix_shape(shape)
        if rank > min(fan_in, fan_out):
            raise ValueError(f"LoRA rank {rank} exceeds min(in, out) = min({fan_in}, {fan_out}) of {_path(path)!r} "
                             f"{shape}: a rank-{rank} update of that matrix is not low-rank")
    return chosen


def init_lora(params, key, rank: int, targets="blocks") -> dict:
    """Adapters for the kernels ``targets`` selects (``lora_targets``): {"a": [r, in], "b": [r, out]} each, nested
    like ``params``; A ~ N(0, 1/in), B = 0 (so ``merge_lora`` returns ``params`` exactly at init).

    ValueError: rank < 1, or rank above min(in, out) of a targeted kernel (naming it)."""
    chosen = check_lora(params, rank, targets)
    flat = traverse_util.flatten_dict(_unfrozen(params))
    keys = jax.random.split(key, len(chosen))
    adapters = {}
    for k, (path, shape) in zip(keys, sorted(chosen.items())):
        fan_in, fan_out = _matrix_shape(shape)
        dtype = flat[path].dtype
        adapters[path] = {"a": jax.random.normal(k, (rank, fan_in), dtype) / jnp.sqrt(jnp.asarray(fan_in, dtype)),
                          "b": jnp.zeros((rank, fan_out), dtype)}
    return traverse_util.unflatten_dict(adapters)


def lora_delta(adapter: dict, shape, scale):
    """scale * A^T B reshaped to the kernel ``shape`` (Hu et al. 2021, eq. 3 with W acting on the right)."""
    a, b = adapter["a"], adapter["b"]
    return (jnp.asarray(scale, a.dtype) * (a.T @ b)).reshape(shape)


def _adapter_paths(lora) -> dict:
    """{kernel path tuple: {"a", "b"}} of an adapter tree."""
    flat = traverse_util.flatten_dict(_unfrozen(lora))
    grouped: dict = {}
    for key, leaf in flat.items():
        if key[-1] not in ("a", "b"):
            raise ValueError(f"not a LoRA adapter tree: leaf {_path(key)!r} is neither 'a' nor 'b'")
        grouped.setdefault(key[:-1], {})[key[-1]] = leaf
    return grouped


def merge_lora(params, lora, alpha: float, rank: int):
    """``params`` with W + (alpha / r) A^T B at every adapted kernel (the others unchanged); a pure function,
    differentiable w.r.t. both trees. ValueError when an adapter names a kernel ``params`` lacks."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    return merge_scaled(params, lora, float(alpha) / float(rank))


def merge_scaled(params, lora, scale):
    """``params`` with W + scale A^T B at every adapted kernel: ``merge_lora`` with the scale given directly, which
    may be traced (``dpmjax.serve`` selects one of several adapter slots, each with its own scale, per row)."""
    flat = traverse_util.flatten_dict(_unfrozen(params))
    for path, adapter in _adapter_paths(lora).items():
        if path not in flat:
            raise ValueError(f"LoRA adapter for {_path(path)!r}, which the params do not have")
        weight = flat[path]
        flat[path] = weight + lora_delta(adapter, weight.shape, scale).astype(weight.dtype)
    return traverse_util.unflatten_dict(flat)
