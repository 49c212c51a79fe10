"""4-bit NormalFloat (NF4) weight quantisation with double quantisation of the scales (QLoRA, Dettmers et al. 2023).

    q = quantize_nf4(w)                      # NF4Tensor: packed 4-bit codes + double-quantised block scales
    w_hat = dequantize_nf4(q)                # w's shape and dtype
    frozen = quantize_tree(params)           # every Dense / Conv kernel -> NF4Tensor, the rest unchanged
    params_hat = dequantize_tree(frozen)     # inside the jitted step: the backbone runs on dequantised weights

NF4 (QLoRA Sec. 3, App. E): a weight block X of 64 values is stored as absmax(X) and 4-bit indices into the
16 levels q_i (``NF4_LEVELS``: quantiles of N(0, 1) normalised to [-1, 1], with an exact zero), each value
mapped to the nearest level:

    X^NF4 = argmin_{q_i} |X / absmax(X) - q_i|,        dequant(X^NF4) = absmax(X) q_{X^NF4}        (QLoRA eq. 1-2)

Double quantisation (QLoRA Sec. 3, "Double Quantization"; bitsandbytes ``quantize_4bit(compress_statistics=
True)``): the float32 absmax of each block is quantised again -- the mean of all of them is subtracted and the
centred values are quantised to 8 bits in blocks of 256 with bitsandbytes' signed dynamic map
(``DYNAMIC_MAP``) and one float32 absmax per 256 -- so the scales cost 8/64 + 32/(64 * 256) bits per weight
instead of 32/64: 4.127 bits per weight in all (plus 4 bytes of mean per tensor), QLoRA's figure.

The 4-bit codes are stored packed, two per uint8 (element 2k in the low nibble, 2k + 1 in the high one), so a
quantised tensor really holds ~4.13 bits per weight on the device (``nbytes``); dequantisation unpacks them
inside the jitted program.

Why our own implementation and not qwix (google/qwix 0.1.8, checked): qwix has NF4 numerics (the same 16
levels) but its ``QArray`` keeps one code per element at the original shape (qvalue.shape == original.shape,
uint4 storage whose packing is left to the backend: one byte per code on CPU) and float scales with no
double quantisation; QST's memory figure is that of bitsandbytes' packed NF4 + DQ, which is a few dozen lines
of jnp here. AQT targets int8 / int4 integer matmuls (no NF4 lookup table). Only Dense and Conv kernels are
quantised (bitsandbytes quantises ``nn.Linear`` layers only; a conv kernel [kh, kw, in, out] is blocked in
its flattened row-major order like any array); biases, norms and embeddings stay in float (as in QLoRA).
Asking to quantise anything else (``quantize_tree(targets=...)``) is a ValueError naming the leaf.
"""
from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct, traverse_util

__all__ = ["NF4_LEVELS", "DYNAMIC_MAP", "BLOCK_SIZE", "SCALE_BLOCK_SIZE", "NF4Tensor", "quantize_nf4",
           "dequantize_nf4", "block_absmax", "quantize_tree", "dequantize_tree", "quantizable", "tree_nbytes", "nf4_levels_from_normal",
           "dynamic_map"]

# QLoRA App. E / bitsandbytes ``get_4bit_type("nf4")``: the 16 NF4 levels (float32 values as published).
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], np.float32)
BLOCK_SIZE = 64          # weights per absmax (QLoRA, bitsandbytes' default blocksize for 4-bit)
SCALE_BLOCK_SIZE = 256   # absmax values per second-level scale (bitsandbytes' nested blocksize)


def nf4_levels_from_normal(offset: float = 0.9677083) -> np.ndarray:
    """The NF4 levels rebuilt from their definition (bitsandbytes ``create_normal_map``, QLoRA App. E): 8 positive
    quantiles Phi^-1(linspace(offset, 1/2, 9)[:-1]) and 7 negative ones -Phi^-1(linspace(offset, 1/2, 8)[:-1]),
    a zero, normalised by the largest. Needs scipy (a test oracle; ``NF4_LEVELS`` is what the code uses)."""
    from scipy.stats import norm

    positive = norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
    negative = -norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
    values = np.sort(np.concatenate([positive, [0.0], negative]))
    return (values / np.max(np.abs(values))).astype(np.float32)


def dynamic_map(max_exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
    """bitsandbytes' signed dynamic (tree) quantisation map ``create_dynamic_map(signed=True)``: 256 sorted values
    in [-1, 1], for exponent e = 0..6 the midpoints of 2^e + 1 evenly spaced fractions in [0.1, 1] times
    10^(e - 6), with both signs, plus 0 and 1 (Dettmers et al. 2022, "8-bit optimizers", dynamic quantisation)."""
    data = []
    non_sign_bits = total_bits - 1
    for i in range(max_exponent_bits):
        items = 2 ** (i + non_sign_bits - max_exponent_bits) + 1
        boundaries = np.linspace(0.1, 1, items)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += list((10 ** (-(max_exponent_bits - 1) + i)) * means)
        data += list(-(10 ** (-(max_exponent_bits - 1) + i)) * means)
    data += [0.0, 1.0]
    data += [0.0] * (2 ** total_bits - len(data))
    return np.sort(np.asarray(data, np.float64)).astype(np.float32)


DYNAMIC_MAP = dynamic_map()


@struct.dataclass
class NF4Tensor:
    """A tensor in NF4 with double-quantised scales; ``n`` = prod(shape), ``b`` = ceil(n / 64) blocks."""

    codes: jax.Array         # [b * 32] uint8: two 4-bit NF4 indices per byte (low nibble first)
    scale_codes: jax.Array   # [b] uint8: indices into DYNAMIC_MAP of (absmax - scale_mean) / scale_absmax
    scale_absmax: jax.Array  # [ceil(b / 256)] float32: absmax of each block of 256 centred scales
    scale_mean: jax.Array    # [] float32: the mean of the blocks' absmax, subtracted before quantising them
    shape: tuple = struct.field(pytree_node=False)
    dtype: str = struct.field(pytree_node=False)

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
                   for x in (self.codes, self.scale_codes, self.scale_absmax, self.scale_mean))


def _nearest(xp, levels: np.ndarray, x):
    """Index of the nearest of the sorted ``levels`` to each x (ties to the upper level, as bitsandbytes'
    midpoint thresholds)."""
    midpoints = xp.asarray((levels[1:] + levels[:-1]) / 2, np.float32)
    return xp.searchsorted(midpoints, x, side="right").astype(np.uint8)


def quantize_nf4(w, *, double_quant: bool = True) -> NF4Tensor:
    """NF4 codes of ``w`` in blocks of ``BLOCK_SIZE`` (row-major; the last block zero-padded) with absmax scales,
    double-quantised (``double_quant``) or kept in float32 (then ``scale_codes`` hold nothing and
    ``scale_absmax`` the raw absmax: for tests of the first level alone).

    Concrete weights are quantised with numpy on the host (a one-off in ``build``: compiling the same program
    with XLA costs ~10 s for a small UNet's ~30 kernel shapes); traced ones (``jax.eval_shape``, ``jit``) with jnp."""
    traced = isinstance(w, jax.core.Tracer)
    xp = jnp if traced else np
    dtype = jnp.dtype(w.dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"NF4 quantises floating-point weights, got dtype {dtype}")
    w = w if traced else np.asarray(w)
    n = math.prod(w.shape)
    blocks = -(-n // BLOCK_SIZE)
    flat = xp.pad(w.reshape(-1).astype(np.float32), (0, blocks * BLOCK_SIZE - n)).reshape(blocks, BLOCK_SIZE)
    absmax = xp.max(xp.abs(flat), axis=1)
    normalised = flat / xp.where(absmax > 0, absmax, np.float32(1.0))[:, None]
    idx = _nearest(xp, NF4_LEVELS, normalised).reshape(-1, 2)
    codes = idx[:, 0] | (idx[:, 1] << 4)
    if not double_quant:
        return NF4Tensor(codes=jnp.asarray(codes), scale_codes=jnp.zeros((0,), jnp.uint8),
                         scale_absmax=jnp.asarray(absmax), scale_mean=jnp.zeros((), jnp.float32),
                         shape=tuple(w.shape), dtype=dtype.name)
    mean = xp.mean(absmax).astype(np.float32)
    groups = -(-blocks // SCALE_BLOCK_SIZE)
    centred = xp.pad(absmax - mean, (0, groups * SCALE_BLOCK_SIZE - blocks)).reshape(groups, SCALE_BLOCK_SIZE)
    scale_absmax = xp.max(xp.abs(centred), axis=1)
    scale_codes = _nearest(xp, DYNAMIC_MAP, centred / xp.where(scale_absmax > 0, scale_absmax, np.float32(1.0))[:, None])
    return NF4Tensor(codes=jnp.asarray(codes), scale_codes=jnp.asarray(scale_codes.reshape(-1)[:blocks]),
                     scale_absmax=jnp.asarray(scale_absmax), scale_mean=jnp.asarray(mean), shape=tuple(w.shape),
                     dtype=dtype.name)


def block_absmax(q: NF4Tensor):
    """[b] float32: the blocks' absmax as stored (dequantised from 8 bits when double-quantised)."""
    if q.scale_codes.shape[0] == 0:
        return q.scale_absmax
    blocks = q.scale_codes.shape[0]
    centred = jnp.asarray(DYNAMIC_MAP)[q.scale_codes.astype(jnp.int32)]
    per_block = jnp.repeat(q.scale_absmax, SCALE_BLOCK_SIZE, total_repeat_length=q.scale_absmax.shape[0]
                           * SCALE_BLOCK_SIZE)[:blocks]
    return centred * per_block + q.scale_mean


def dequantize_nf4(q: NF4Tensor):
    """absmax_hat(block) * NF4_LEVELS[code] in ``q.shape`` and ``q.dtype`` (QLoRA eq. 2 with the double-quantised
    absmax). Jittable: unpacks the nibbles, looks up the 16 levels, scales by block."""
    low, high = q.codes & 15, q.codes >> 4
    idx = jnp.stack([low, high], axis=-1).reshape(-1, BLOCK_SIZE).astype(jnp.int32)
    values = jnp.asarray(NF4_LEVELS)[idx] * block_absmax(q)[:, None]
    n = math.prod(q.shape)
    return values.reshape(-1)[:n].reshape(q.shape).astype(q.dtype)


def _path(key: tuple) -> str:
    return "/".join(str(k) for k in key)


def quantizable(key: tuple, shape) -> str | None:
    """None when the leaf at ``key`` is a Dense / Conv kernel NF4 may quantise, else what it is."""
    name = str(key[-1])
    if name != "kernel":
        kinds = {"bias": "a bias", "scale": "a normalisation scale", "embedding": "an embedding table"}
        return kinds.get(name, f"a {name!r} parameter") + " (NF4 quantises Dense / Conv kernels only)"
    if len(shape) < 2:
        return f"a kernel of rank {len(shape)} (NF4 quantises Dense / Conv kernels of rank >= 2)"
    return None


def quantize_plan(params, targets="kernels") -> dict:
    """{flat path: shape} of the leaves ``quantize_tree`` quantises: regular expressions over "/"-joined paths (one
    or a sequence), the item ``"kernels"`` standing for every Dense / Conv kernel. ValueError naming the pattern when it matches nothing or matches
    a leaf the quantiser does not support (a bias, a norm, an embedding). Shapes only: works on abstract params."""
    flat = traverse_util.flatten_dict(params.unfreeze() if hasattr(params, "unfreeze") else params)
    given = (targets,) if isinstance(targets, str) else tuple(targets)
    if not given:
        raise ValueError("quantize: give at least one pattern (or 'kernels')")
    chosen = {}
    if "kernels" in given:
        chosen = {k: tuple(v.shape) for k, v in flat.items() if quantizable(k, v.shape) is None}
        if not chosen:
            raise ValueError("quantize: the network has no Dense / Conv kernel to quantise")
    for pattern in (p for p in given if p != "kernels"):
        try:
            regex = re.compile(pattern)
        except re.error as err:
            raise ValueError(f"quantize pattern {pattern!r} is not a regular expression: {err}") from None
        hits = [k for k in flat if regex.search(_path(k))]
        if not hits:
            raise ValueError(f"quantize pattern {pattern!r} matches no parameter")
        for key in hits:
            why = quantizable(key, flat[key].shape)
            if why is not None:
                raise ValueError(f"quantize pattern {pattern!r} selects {_path(key)!r} {tuple(flat[key].shape)}, "
                                 f"{why}: unsupported layer")
            chosen[key] = tuple(flat[key].shape)
    return chosen


def quantize_tree(params, targets="kernels", *, double_quant: bool = True):
    """``params`` with the leaves ``quantize_plan`` selects replaced by ``NF4Tensor``s (the rest unchanged)."""
    plan = quantize_plan(params, targets)
    flat = traverse_util.flatten_dict(params.unfreeze() if hasattr(params, "unfreeze") else params)
    out = {k: quantize_nf4(v, double_quant=double_quant) if k in plan else v for k, v in flat.items()}
    return traverse_util.unflatten_dict(out)


def dequantize_tree(tree):
    """Every ``NF4Tensor`` of ``tree`` dequantised (``dequantize_nf4``); other leaves unchanged."""
    return jax.tree.map(lambda x: dequantize_nf4(x) if isinstance(x, NF4Tensor) else x, tree,
                        is_leaf=lambda x: isinstance(x, NF4Tensor))


def tree_nbytes(tree) -> int:
    """Bytes held by the arrays of ``tree`` (``NF4Tensor``s count their packed codes and scales)."""
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
