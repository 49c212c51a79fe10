"""DARE / DAREx: pruning the delta of a finetuned model (``dpmjax delta prune``), and storing it sparsely.

    d = delta(finetuned, base)                              # d = theta_ft - theta_pre, ValueError on another arch
    pruned = dare(d, p=0.99, key=key)                       # Bernoulli drop, survivors x 1 / (1 - p)
    q, changes = find_q(apply_fn, base, d, p, key, x_t, t)  # DAREx-q: q minimising the output change on one batch
    pruned = dare_q(d, p, key, q)                           # the same mask, survivors x 1 / q
    pruned = magnitude_prune(d, p)                          # the importance baseline: top (1 - p) of |d| per tensor
    sparse = sparsify(pruned); save("delta.npz", sparse)    # indices (or a bit mask) + values, atomic, verified
    params = apply(base, load("delta.npz"))                 # theta = theta_pre + d'

DARE (Yu et al., "Language Models are Super Mario", ICML 2024, eq. 2-3): with a mask m_i ~ Bernoulli(1 - p),

    d'_i = m_i d_i / (1 - p),      theta = theta_pre + d',      E[d'] = d.

DAREx (Deng et al., "DARE the Extreme", ICLR 2025, arXiv 2410.09344): the rescale 1/(1 - p) multiplies the
variance of a layer's output change sum_i (m_i / (1 - p) - 1) d_i x_i by p / (1 - p) (99 at p = 0.99), which
breaks the model when p is large or the deltas are large. DAREx-q rescales by 1/q with q in [1 - p, 1] instead
(q = 1 - p is DARE, q = 1 keeps the survivors as they are), choosing q

  * on one unlabelled batch (``find_q``): the q of a grid minimising the change of the last layer's output,
    mean |f_ft(x) - f_pruned(x)| (official ``utils/outputchange.py``); here the network output *is* the last layer:
    the denoiser's prediction on noisy target images x_t at random t;
  * per layer, analytically (``analytic_q``, official ``utils/analyticalq.py``): for each output unit r of a layer
    with input-weighted deltas c_rj = |d_rj xbar_j| (xbar: the layer's mean input on one batch),

        q_r = argmin_{q in [1-p, 0.999)} | eta (1 - (1-p)/q) sum_j c_rj + eta^2 phi(p) sum_j c_rj^2 / (4 q^2)
                                          + log(2 / (1 - gamma)) |,      phi(p) = (1 - 2p) / log((1 - p) / p),

    scanned upwards on the official 0.001 grid and stopped once ``stop_fraction`` (0.8) of the rows stopped
    improving; the layer's q is the mean of its rows' (official ``optimal_q_calculation``); eta 0.45, gamma 0.95.

Departures, and why:
  * Official ``getwx`` multiplies the delta by the signed mean input and takes |.| of the whole objective; with a
    negative row sum that objective grows with q only through its absolute value. We use c = |d xbar| (the
    paper's bound is on magnitudes, and the reference notes say |w x|), which makes the objective a proper
    trade-off with an interior minimum q* = eta phi(p) sum c^2 / (2 (1-p) sum c), clipped to the grid.
  * Convolutions: xbar_j is the mean of input channel j over batch and positions, broadcast over the kernel's
    spatial taps (a row is an output channel, its columns the kh*kw*C_in taps); Dense layers are as in the paper.
    Layer inputs are captured with ``flax.linen.intercept_methods`` (every ``nn.Dense`` / ``nn.Conv`` call sows
    the mean of its input), one forward pass of the finetuned model.
  * Which leaves are pruned: every floating leaf of the delta -- kernels, biases, normalisation scales and
    biases, embeddings -- as DARE does (the official ``drop`` spares only a newly initialised classifier head,
    which a diffusion finetune does not have). ``dense`` (substrings of leaf paths) keeps chosen leaves whole and
    unscaled, e.g. ``dense=("norm",)``; the leaves of a layer without an analytic q (normalisations) take the
    mean of the layers' q, as the official ``rescale_q`` does.
  * The output change (``find_q``) is measured on a fixed mask drawn from ``key``: the q it picks is for that mask,
    which is the mask ``dare_q(d, p, key, q)`` applies.

Why here (layer 7, ``dpmjax/methods``): pruning a delta is an operation on a finetuned *model*, and DAREx reads
the network (its outputs for ``find_q``, its layers' inputs for ``analytic_q``), so it lives with the methods it
post-processes (``full_finetune`` and its AdamR setting, ``dpmjax.train.adamr``). It is not a registered
``Method``: it trains nothing; ``dpmjax delta prune`` (``prune_workdirs``) runs it on two workdirs.

Sparse files (``save`` / ``load``): one ``.npz`` (no pickle: ``allow_pickle=False``), written to a temporary file
and renamed into place; per pruned leaf the kept values and either their flat indices (uint8/16/32/64, the
smallest that fits) or a packed bit mask, whichever is smaller (the mask wins above 1/(8 * index bytes) kept),
all leaves' values / indices / masks concatenated into a few arrays; a JSON header with every leaf's path, shape,
dtype, offsets and the 64-bit fingerprints of the stored arrays (``dpmjax.train.checkpoint.fingerprint``), checked
on load. Values are stored in the delta's dtype (float32): the round trip is exact.
"""
from __future__ import annotations

import functools
import json
import math
import os
import tempfile
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["VARIANTS", "SPARSE_FORMAT", "PRUNED_FORMAT", "DELTA_FILE", "check_same_architecture", "delta",
           "check_rate", "keep_mask", "dare", "dare_q", "magnitude_prune", "output_change", "find_q",
           "layer_input_means", "analytic_q_rows", "analytic_q", "find_eta",
           "SparseLeaf", "SparseDelta", "sparsify", "densify", "apply", "save", "load", "dense_nbytes",
           "prune_workdirs", "abstract_params_of", "calibration_batch", "write_pruned_workdir"]

VARIANTS = ("dare", "dare_q", "dare_q_analytic", "magnitude")
SPARSE_FORMAT = "dpmjax-sparse-delta/1"
PRUNED_FORMAT = "dpmjax-pruned-delta/1"  # config.pretrained.format of a `dpmjax delta prune` output workdir
DELTA_FILE = "delta.npz"
_META_KEY = "__meta__"


# ------------------------------------------------------------------------------------------------ pytree helpers

def _path_names(path) -> tuple[str, ...]:
    names = []
    for entry in path:
        key = getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", None)))
        if key is None:
            raise ValueError(f"unsupported pytree path entry {entry!r}: deltas are nested dicts of arrays")
        names.append(str(key))
    return tuple(names)


def _flat(tree) -> list[tuple[tuple[str, ...], Any]]:
    return [(_path_names(path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _is_float(leaf) -> bool:
    return jnp.issubdtype(jnp.asarray(leaf).dtype if not hasattr(leaf, "dtype") else leaf.dtype, jnp.floating)


def _prunable(names, leaf, dense) -> bool:
    joined = "/".join(names)
    return _is_float(leaf) and not any(part in joined for part in dense)


def check_rate(p) -> float:
    """``p`` as a float in [0, 1); ValueError otherwise (p = 1 would drop everything and divide by 0)."""
    if isinstance(p, bool) or not isinstance(p, (int, float, np.floating, np.integer)) or not 0.0 <= float(p) < 1.0:
        raise ValueError(f"the drop rate p must be a number in [0, 1), got {p!r}")
    return float(p)


def _check_q(q, p) -> None:
    values = [float(v) for v in jax.tree.leaves(q)] if not isinstance(q, (int, float)) else [float(q)]
    for value in values:
        if not (0.0 < value <= 1.0) or value < (1.0 - p) - 1e-6:
            raise ValueError(f"q must be in [1 - p, 1] = [{1.0 - p:g}, 1], got {value!r}")


# ------------------------------------------------------------------------------------------------ delta, DARE

def check_same_architecture(finetuned, base) -> None:
    """ValueError naming the first path present in only one tree, or whose shape or dtype differs. Reads shapes
    only: works on ``jax.ShapeDtypeStruct`` trees (``jax.eval_shape`` of two models' init) before any loading."""
    flat_ft, flat_base = dict(_flat(finetuned)), dict(_flat(base))
    for names in sorted(set(flat_ft) | set(flat_base)):
        if names not in flat_base or names not in flat_ft:
            where = "finetuned" if names in flat_ft else "base"
            raise ValueError(f"architectures differ: {'/'.join(names)} exists only in the {where} params")
        a, b = flat_ft[names], flat_base[names]
        if tuple(a.shape) != tuple(b.shape) or a.dtype != b.dtype:
            raise ValueError(f"architectures differ at {'/'.join(names)}: finetuned {tuple(a.shape)} {a.dtype}, "
                             f"base {tuple(b.shape)} {b.dtype}")
    if jax.tree.structure(finetuned) != jax.tree.structure(base):
        raise ValueError("architectures differ: the two params trees have different structures")


def delta(finetuned, base):
    """d = theta_ft - theta_pre, leaf by leaf (non-floating leaves: zeros).

    Raises ValueError (``check_same_architecture``) naming the first path present in only one tree, or whose shape
    or dtype differs: the two checkpoints are of different architectures (checked before any arithmetic).
    """
    check_same_architecture(finetuned, base)
    return jax.tree.map(lambda a, b: a - b if _is_float(a) else jnp.zeros_like(a), finetuned, base)


def keep_mask(tree, p: float, key, *, dense=()):
    """Bernoulli keep masks (True with probability 1 - p) of ``tree``'s prunable leaves; leaf i draws from
    ``fold_in(key, i)`` (so the mask of a leaf does not depend on the others' shapes); all-True where not pruned."""
    p = check_rate(p)
    flat = _flat(tree)
    masks = [jax.random.bernoulli(jax.random.fold_in(key, i), 1.0 - p, jnp.shape(leaf))
             if _prunable(names, leaf, dense) else jnp.ones(jnp.shape(leaf), bool)
             for i, (names, leaf) in enumerate(flat)]
    return jax.tree.unflatten(jax.tree.structure(tree), masks)


def _rescale_tree(tree, q, dense):
    """A pytree of per-leaf divisors: ``q`` itself (a tree of scalars) or the scalar q broadcast; 1 on leaves kept
    dense."""
    if isinstance(q, (int, float, np.floating)) or (hasattr(q, "shape") and jnp.ndim(q) == 0):
        qs = [q for _ in _flat(tree)]
    else:
        qs = jax.tree.leaves(q)
        if len(qs) != len(jax.tree.leaves(tree)):
            raise ValueError("a per-leaf q must be a pytree of scalars with the structure of the delta")
    return jax.tree.unflatten(jax.tree.structure(tree),
                              [q_i if _prunable(names, leaf, dense) else 1.0
                               for (names, leaf), q_i in zip(_flat(tree), qs)])


def dare_q(d, p: float, key, q, *, dense=()):
    """DAREx-q: d' = m * d / q with m ~ Bernoulli(1 - p) (``keep_mask(d, p, key)``); ``q`` a scalar in [1 - p, 1] or
    a pytree of per-leaf scalars (``analytic_q``). q = 1 - p is DARE. One jitted program per (shapes, p)."""
    p = check_rate(p)
    if not any(isinstance(v, jax.core.Tracer) for v in jax.tree.leaves(q)):
        _check_q(q, p)
    return _dare_q(d, key, q, p=p, dense=tuple(dense))


@functools.partial(jax.jit, static_argnames=("p", "dense"))
def _dare_q(d, key, q, *, p, dense):
    mask = keep_mask(d, p, key, dense=dense)
    divisors = _rescale_tree(d, q, dense)
    return jax.tree.map(lambda x, m, s: jnp.where(m, x / jnp.asarray(s, x.dtype), jnp.zeros((), x.dtype))
                        if _is_float(x) else x, d, mask, divisors)


def dare(d, p: float, key, *, dense=()):
    """DARE (Yu et al. 2024, eq. 2-3): d' = m * d / (1 - p), m ~ Bernoulli(1 - p); p = 0 returns d exactly."""
    p = check_rate(p)
    return dare_q(d, p, key, 1.0 - p, dense=dense)


def magnitude_prune(d, p: float, *, dense=()):
    """Magnitude pruning of the delta (the importance baseline of DAREx sec. 5): per tensor, keep the
    k = round((1 - p) n) entries of largest |d| (ties broken by position), zero the rest, no rescaling."""
    return _magnitude_prune(d, p=check_rate(p), dense=tuple(dense))


@functools.partial(jax.jit, static_argnames=("p", "dense"))
def _magnitude_prune(d, *, p, dense):
    def prune(names, x):
        if not _prunable(names, x, dense):
            return x
        flat = jnp.ravel(x)
        k = int(round((1.0 - p) * flat.size))
        order = jnp.argsort(-jnp.abs(flat), stable=True)[:k]
        kept = jnp.zeros(flat.shape, bool).at[order].set(True)
        return jnp.where(kept, flat, jnp.zeros((), x.dtype)).reshape(x.shape)

    flat = _flat(d)
    return jax.tree.unflatten(jax.tree.structure(d), [prune(names, x) for names, x in flat])


# ------------------------------------------------------------------------------------------------ DAREx-q: 1 batch

def _add(base, d):
    return jax.tree.map(lambda b, x: b + x if _is_float(b) else b, base, d)


def output_change(apply_fn, base, dropped, q, reference, x, t):
    """mean |f_ref(x, t) - f_{base + dropped / q}(x, t)|: the DAREx output change (official ``get_outpuchage``) of
    one rescale ``q`` (a scalar or a per-leaf tree); ``dropped`` = m * d, ``reference`` the finetuned output."""
    divisors = _rescale_tree(dropped, q, ())
    params = _add(base, jax.tree.map(lambda x_, s: x_ / jnp.asarray(s, x_.dtype) if _is_float(x_) else x_,
                                     dropped, divisors))
    return jnp.mean(jnp.abs(apply_fn(params, x, t) - reference))


def _changes(apply_fn, base, dropped, finetuned, qs, x, t):
    """Output changes [K] for the K rescales ``qs`` (a tree whose leaves have a leading axis K), one compiled
    program: params and batch are arguments, ``lax.map`` over the rescales."""
    reference = apply_fn(finetuned, x, t)
    return jax.lax.map(lambda q: output_change(apply_fn, base, dropped, q, reference, x, t), qs)


def find_q(apply_fn: Callable, base, d, p: float, key, x, t, *, num_q: int = 41, dense=()):
    """DAREx-q's unsupervised q: the q of ``linspace(1 - p, 1, num_q)`` minimising ``output_change`` on one batch.

    Args:
      apply_fn: ``apply_fn(params, x, t) -> prediction`` (``dpmjax.nn.make_apply_fn``; the network's output is
        the last layer whose change DAREx measures).
      base, d: the pretrained params and the delta (``delta``); the finetuned params are ``base + d``.
      key: the drop mask's key (``keep_mask``): the q is chosen for this mask, the one ``dare_q(d, p, key, q)`` uses.
      x, t: one unlabelled batch of noisy inputs x_t [B, ...] and their times [B].
    Returns:
      (q, grid [num_q], changes [num_q]) as (float, numpy, numpy).
    """
    p = check_rate(p)
    if isinstance(num_q, bool) or not isinstance(num_q, int) or num_q < 2:
        raise ValueError(f"num_q must be an integer >= 2, got {num_q!r}")
    grid = np.linspace(1.0 - p, 1.0, num_q)
    mask = keep_mask(d, p, key, dense=dense)
    dropped = jax.tree.map(lambda x_, m: jnp.where(m, x_, jnp.zeros((), x_.dtype)) if _is_float(x_) else x_, d, mask)
    finetuned = _add(base, d)
    # leaves kept dense are never rescaled: their per-leaf q is 1 whatever the grid value
    qs = jax.tree.unflatten(jax.tree.structure(d), [
        jnp.asarray(grid, jnp.float32) if _prunable(names, leaf, dense) else jnp.ones((num_q,), jnp.float32)
        for names, leaf in _flat(d)])
    changes = np.asarray(jax.jit(_changes, static_argnums=0)(apply_fn, base, dropped, finetuned, qs, x, t))
    best = int(np.argmin(changes))
    return float(grid[best]), grid, changes


# ------------------------------------------------------------------------------------------------ DAREx-q: analytic

def _sow_input_mean(next_fun, args, kwargs, context):
    import flax.linen as nn

    if context.method_name == "__call__" and isinstance(context.module, (nn.Dense, nn.Conv)) and args:
        inputs = args[0]
        context.module.sow("intermediates", "input_mean",
                           jnp.mean(inputs.reshape(-1, inputs.shape[-1]).astype(jnp.float32), axis=0))
    return next_fun(*args, **kwargs)


def layer_input_means(module, variables, x, network_t, **cond) -> dict:
    """{layer path (tuple of names under ``params``): mean input per input feature [C_in]} of every ``nn.Dense``
    and ``nn.Conv`` of ``module`` on one batch (``network_t``: the network's time input, ``dpmjax.nn.network_time``).

    Captured with ``flax.linen.intercept_methods`` sowing each layer's mean input into "intermediates"; a layer
    called twice keeps its first call's mean (weight sharing does not occur in dpmjax's networks)."""
    import flax.linen as nn

    def run(variables, x, network_t):
        with nn.intercept_methods(_sow_input_mean):
            _, state = module.apply(variables, x, network_t, train=False, mutable=["intermediates"], **cond)
        return state.get("intermediates", {})

    captured = jax.jit(run)(variables, x, network_t)
    means = {}
    for names, leaf in _flat(captured):
        if names[-2] == "input_mean":  # (..., layer, "input_mean", call index)
            means.setdefault(names[:-2], np.asarray(leaf, np.float64))
    return means


def _phi(p: float) -> float:
    """phi(p) = (1 - 2p) / log((1 - p) / p), with its limit 1/2 at p = 1/2 and 0 at p = 0."""
    if p == 0.0:
        return 0.0
    if abs(p - 0.5) < 1e-9:
        return 0.5
    return (1.0 - 2.0 * p) / math.log((1.0 - p) / p)


def analytic_q_rows(c, p: float, *, eta: float = 0.45, gamma: float = 0.95, stop_fraction: float = 0.8):
    """Per-row q of the official ``analytical_resolve_new``: scan q = (1-p), (1-p) + 0.001, ..., 0.998 upwards,
    keep each row's best |objective| (module docstring), stop once ``stop_fraction`` of the rows stopped
    improving. ``c`` [rows, cols] are the input-weighted deltas (>= 0). Returns q [rows] (float64 numpy)."""
    c = np.asarray(c, np.float64)
    rows = c.shape[0]
    q_best = np.full(rows, 1.0 - p)
    if p == 0.0:
        return np.ones(rows)
    s1, s2 = c.sum(axis=1), (c ** 2).sum(axis=1)
    phi, constant = _phi(p), math.log(2.0 / (1.0 - gamma))
    best = np.full(rows, np.inf)
    stopped = np.zeros(rows, bool)
    for step in range(int(math.ceil((1.0 - p) * 1000 - 1e-6)), 999):
        q = step * 0.001
        res = np.abs(eta * (1.0 - (1.0 - p) / q) * s1 + eta ** 2 * phi * s2 / (4.0 * q ** 2) + constant)
        improved, worse = res <= best, res >= best
        best = np.where(improved, res, best)
        q_best = np.where(improved, q, q_best)
        stopped |= worse
        if stopped.mean() >= stop_fraction:
            break
    return q_best


def _rows_of(kernel_delta, input_mean, bias_delta):
    """The [out, taps] matrix c = |d xbar| of one layer (Dense [in, out] or Conv [..., in, out]), the bias delta
    as one more column (as the official ``optimal_q_calculation``); None when the input does not fit the kernel."""
    d = np.asarray(kernel_delta, np.float64)
    if d.ndim < 2 or d.shape[-2] != input_mean.shape[0]:
        return None
    weighted = np.abs(d * input_mean.reshape((1,) * (d.ndim - 2) + (-1, 1)))
    c = np.moveaxis(weighted, -1, 0).reshape(d.shape[-1], -1)
    if bias_delta is not None and np.shape(bias_delta) == (d.shape[-1],):
        c = np.concatenate([c, np.abs(np.asarray(bias_delta, np.float64))[:, None]], axis=1)
    return c


def analytic_q(d, input_means: dict, p: float, *, eta: float = 0.45, gamma: float = 0.95, dense=()):
    """DAREx-q per layer (official ``optimal_q_calculation`` + ``rescale_q``): a pytree of scalars like ``d``.

    A layer's kernel and bias take the mean over its output units of ``analytic_q_rows``; every other prunable leaf
    (normalisations, a layer whose input was not captured) takes the mean of the layers' q.
    ``input_means``: ``layer_input_means`` of the finetuned model (keys are paths under the variables, so a
    ``{"params": ...}`` delta's layer ("params", *layer) is looked up as ``layer``)."""
    p = check_rate(p)
    flat = dict(_flat(d))
    per_layer = {}
    for names, leaf in flat.items():
        if names[-1] != "kernel" or not _prunable(names, leaf, dense):
            continue
        layer = names[:-1]
        mean = input_means.get(layer[1:] if layer[:1] == ("params",) else layer)
        if mean is None:
            continue
        c = _rows_of(leaf, mean, flat.get(layer + ("bias",)))
        if c is not None:
            per_layer[layer] = float(np.mean(analytic_q_rows(c, p, eta=eta, gamma=gamma)))
    fallback = float(np.mean(list(per_layer.values()))) if per_layer else 1.0 - p
    qs = [per_layer.get(names[:-1], fallback) if names[-1] in ("kernel", "bias") else fallback
          for names, _ in _flat(d)]
    return jax.tree.unflatten(jax.tree.structure(d), qs)


def find_eta(apply_fn: Callable, base, d, p: float, key, x, t, input_means: dict, *, etas=None, dense=()):
    """The official analytic mode tunes eta (``find_optimal_param``); with ``--outputchange`` on the output change
    of one batch. Here: the eta of ``etas`` (default a log grid 0.05..50) whose ``analytic_q`` tree minimises
    ``output_change`` for the mask of ``key``. Returns (eta, q tree, etas, changes)."""
    p = check_rate(p)
    etas = np.geomspace(0.05, 50.0, 13) if etas is None else np.asarray(etas, np.float64)
    trees = [analytic_q(d, input_means, p, eta=float(e), dense=dense) for e in etas]
    qs = jax.tree.map(lambda *v: jnp.asarray(v, jnp.float32), *trees)
    mask = keep_mask(d, p, key, dense=dense)
    dropped = jax.tree.map(lambda x_, m: jnp.where(m, x_, jnp.zeros((), x_.dtype)) if _is_float(x_) else x_, d, mask)
    changes = np.asarray(jax.jit(_changes, static_argnums=0)(apply_fn, base, dropped, _add(base, d), qs, x, t))
    best = int(np.argmin(changes))
    return float(etas[best]), trees[best], etas, changes


# ------------------------------------------------------------------------------------------------ sparse storage

class SparseLeaf(NamedTuple):
    """One leaf of a pruned delta: its ``shape`` and ``dtype`` and either the kept entries (``indices`` into the
    flattened leaf, int64 [k], and ``values`` [k]) or, for a leaf kept whole, ``values`` of its full shape and
    ``indices`` None."""

    shape: tuple
    dtype: str
    indices: np.ndarray | None
    values: np.ndarray


class SparseDelta(NamedTuple):
    """A pruned delta: {path (tuple of names): SparseLeaf} and ``info`` (JSON: variant, p, q, seed, sources)."""

    leaves: dict
    info: dict


def sparsify(pruned, *, dense=(), info=None) -> SparseDelta:
    """The non-zero entries of a pruned delta's prunable leaves (others whole)."""
    leaves = {}
    for names, leaf in _flat(jax.device_get(pruned)):
        array = np.asarray(leaf)
        if _prunable(names, array, dense):
            flat = array.reshape(-1)
            indices = np.flatnonzero(flat)
            leaves[names] = SparseLeaf(tuple(array.shape), array.dtype.name, indices.astype(np.int64), flat[indices])
        else:
            leaves[names] = SparseLeaf(tuple(array.shape), array.dtype.name, None, array)
    return SparseDelta(leaves, dict(info or {}))


def densify(sparse: SparseDelta) -> dict:
    """The pruned delta as a nested dict of numpy arrays."""
    tree: dict = {}
    for names, leaf in sparse.leaves.items():
        if leaf.indices is None:
            array = np.asarray(leaf.values)
        else:
            array = np.zeros(int(np.prod(leaf.shape)), leaf.dtype)
            array[leaf.indices] = leaf.values
            array = array.reshape(leaf.shape)
        node = tree
        for name in names[:-1]:
            node = node.setdefault(name, {})
        node[names[-1]] = array
    return tree


def apply(base, sparse: SparseDelta):
    """theta = theta_pre + d' (numpy on the host; the result has ``base``'s structure). ValueError when the delta's
    leaves do not match ``base``'s paths and shapes (a delta of another architecture)."""
    flat_base = _flat(jax.device_get(base))
    paths = {names for names, _ in flat_base}
    if paths != set(sparse.leaves):
        extra = sorted(set(sparse.leaves) - paths) or sorted(paths - set(sparse.leaves))
        raise ValueError(f"the delta does not fit these params: {'/'.join(extra[0])} is in only one of them")
    out = []
    for names, leaf in flat_base:
        entry = sparse.leaves[names]
        array = np.array(leaf)
        if tuple(array.shape) != tuple(entry.shape):
            raise ValueError(f"the delta does not fit these params at {'/'.join(names)}: delta {entry.shape}, "
                             f"params {tuple(array.shape)}")
        if entry.indices is None:
            array = array + np.asarray(entry.values, array.dtype) if _is_float(array) else array
        else:
            flat = array.reshape(-1)
            flat[entry.indices] += np.asarray(entry.values, array.dtype)
            array = flat.reshape(array.shape)
        out.append(array)
    return jax.tree.unflatten(jax.tree.structure(base), out)


def dense_nbytes(sparse: SparseDelta) -> int:
    """Bytes of the delta stored densely (every leaf whole): what ``save`` is compared with."""
    return int(sum(int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize for leaf in sparse.leaves.values()))


def _index_dtype(size: int):
    for dtype in (np.uint8, np.uint16, np.uint32):
        if size <= np.iinfo(dtype).max + 1:
            return dtype
    return np.uint64


class _Pool:
    """Arrays of one kind concatenated (``values_float32``, ``indices_uint16``, ``masks``, ...): a file holds a
    handful of arrays whatever the number of leaves (each array of an .npz costs ~250 bytes of zip and npy
    headers, which for a small model's 100 leaves outweighed the kept values at p = 0.99)."""

    def __init__(self):
        self.parts: dict = {}

    def add(self, name: str, array) -> list:
        parts = self.parts.setdefault(name, [])
        offset = sum(int(a.size) for a in parts)
        parts.append(np.ascontiguousarray(array).reshape(-1))
        return [name, offset, int(np.size(array))]

    def arrays(self) -> dict:
        return {name: np.concatenate(parts) for name, parts in self.parts.items()}


def _take(arrays, ref):
    name, offset, count = ref
    if name not in arrays or offset + count > arrays[name].size:
        raise ValueError(f"entry {ref} lies outside the stored arrays")
    return arrays[name][offset:offset + count]


def _encode(pool: _Pool, leaf: SparseLeaf) -> dict:
    """The header entry of one leaf, its arrays added to ``pool``: indices or a bit mask, whichever is smaller,
    plus the values (ascending position)."""
    values = np.asarray(leaf.values)
    if leaf.indices is None:
        return {"encoding": "dense", "values": pool.add(f"dense_{values.dtype.name}", values)}
    size = int(np.prod(leaf.shape))
    index_dtype = _index_dtype(size)
    order = np.argsort(leaf.indices, kind="stable")
    indices, values = np.asarray(leaf.indices)[order], values[order]
    entry = {"values": pool.add(f"values_{values.dtype.name}", values)}
    if len(indices) * np.dtype(index_dtype).itemsize <= (size + 7) // 8:
        return {"encoding": "indices", **entry,
                "indices": pool.add(f"indices_{np.dtype(index_dtype).name}", indices.astype(index_dtype))}
    mask = np.zeros(size, bool)
    mask[indices] = True
    return {"encoding": "mask", **entry, "mask": pool.add("masks", np.packbits(mask))}


def save(path: str, sparse: SparseDelta) -> int:
    """Write ``sparse`` to ``path`` (.npz) atomically (temporary file in the same folder, then ``os.replace``);
    returns the file's size in bytes. Refuses (FloatingPointError) a delta holding NaN or inf."""
    from dpmjax.train.checkpoint import fingerprint

    pool, entries = _Pool(), []
    for names, leaf in sorted(sparse.leaves.items()):
        values = np.asarray(leaf.values)
        if np.issubdtype(values.dtype, np.floating) and not np.all(np.isfinite(values)):
            raise FloatingPointError(f"refusing to save a delta holding NaN or inf in {'/'.join(names)}")
        entries.append({"path": list(names), "shape": list(leaf.shape), "dtype": leaf.dtype, **_encode(pool, leaf)})
    arrays = pool.arrays()
    header = {"format": SPARSE_FORMAT, "leaves": entries, "info": sparse.info, "checksums": fingerprint(arrays)}
    arrays[_META_KEY] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return os.path.getsize(path)


def load(path: str) -> SparseDelta:
    """Read a file ``save`` wrote; ValueError when it is not one, is damaged (a stored array differs from its
    fingerprint) or holds NaN/inf. Never unpickles (``allow_pickle=False``)."""
    from dpmjax.train.checkpoint import fingerprint

    if not os.path.isfile(path):
        raise FileNotFoundError(f"sparse delta {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: np.asarray(data[name]) for name in data.files}
        header = json.loads(bytes(arrays.pop(_META_KEY)).decode())
    except (OSError, ValueError, KeyError, EOFError) as err:
        raise ValueError(f"{path} is not a readable sparse delta: {type(err).__name__}: {err}") from None
    except Exception as err:  # noqa: BLE001 - zipfile.BadZipFile (CRC errors) and friends: a damaged file
        raise ValueError(f"{path} is damaged: {type(err).__name__}: {err}") from None
    if header.get("format") != SPARSE_FORMAT:
        raise ValueError(f"{path} has format {header.get('format')!r}, expected {SPARSE_FORMAT!r}")
    saved, actual = header.get("checksums", {}), fingerprint(arrays)
    differ = sorted(name for name in set(saved) | set(actual) if saved.get(name) != actual.get(name))
    if differ:
        raise ValueError(f"{path} is corrupt: {len(differ)} stored array(s) differ from their checksums "
                         f"({', '.join(differ[:4])})")
    leaves = {}
    for entry in header["leaves"]:
        names, shape, dtype = tuple(entry["path"]), tuple(entry["shape"]), entry["dtype"]
        size = int(np.prod(shape))
        values = _take(arrays, entry["values"])
        if entry["encoding"] == "dense":
            leaf = SparseLeaf(shape, dtype, None, values.reshape(shape))
        elif entry["encoding"] == "indices":
            leaf = SparseLeaf(shape, dtype, _take(arrays, entry["indices"]).astype(np.int64), values)
        else:
            mask = np.unpackbits(_take(arrays, entry["mask"]), count=size).astype(bool)
            leaf = SparseLeaf(shape, dtype, np.flatnonzero(mask).astype(np.int64), values)
        if len(leaf.values) != (size if leaf.indices is None else len(leaf.indices)):
            raise ValueError(f"{path}: {'/'.join(names)} has {len(leaf.values)} values for its positions")
        if np.issubdtype(leaf.values.dtype, np.floating) and not np.all(np.isfinite(leaf.values)):
            raise ValueError(f"{path} holds NaN or inf in {'/'.join(names)}")
        leaves[names] = leaf
    return SparseDelta(leaves, header.get("info", {}))


# ------------------------------------------------------------------------------------------------ two workdirs

def abstract_params_of(config):
    """The ``jax.ShapeDtypeStruct`` variables of a workdir's model (its ``config.json``), nothing loaded."""
    from dpmjax.nn import build_model, init_params

    model = build_model(config.model)
    return jax.eval_shape(lambda: init_params(model, tuple(config.data.image_shape), int(config.get("seed", 0))))


def calibration_batch(config, key, size: int = 64):
    """(x_t, t, clean images) of one unlabelled batch: the first ``size`` images of the finetuned workdir's data
    (its target shots), noised at random t (``dpmjax.methods.adaptation.noised``'s draw)."""
    from dpmjax.schedules import schedule_from_config
    from dpmjax.train import losses
    from dpmjax.train.loop import build_data

    source = build_data(config)
    images = jnp.asarray(source.get_batch(np.arange(min(size, len(source))))["image"], jnp.float32)
    schedule = schedule_from_config(config.schedule)
    k_t, k_noise = jax.random.split(key)
    t = losses.sample_times(k_t, images.shape[0], schedule, jnp.float32)
    noise = jax.random.normal(k_noise, images.shape, jnp.float32)
    return losses.diffuse(images, t, noise, schedule), t


def prune_workdirs(base_params, finetuned_params, *, variant: str, p: float, seed: int = 0, q=None,
                   eta: float | None = None, model=None, schedule=None, calibration=None, dense=()):
    """(pruned delta, info) of ``finetuned - base`` by ``variant`` (``VARIANTS``): the computation behind
    ``dpmjax delta prune``, on loaded params. ``calibration`` = (x_t, t) of one unlabelled batch, needed by
    ``dare_q`` without ``q`` and by ``dare_q_analytic`` (with ``model`` and ``schedule``); ``eta`` None tunes it by
    the output change (``find_eta``)."""
    from dpmjax.nn import make_apply_fn, network_time

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
    p = check_rate(p)
    d = delta(finetuned_params, base_params)
    key = jax.random.key(seed)
    info = {"variant": variant, "p": p, "seed": int(seed)}
    if variant == "dare":
        return dare(d, p, key, dense=dense), {**info, "q": 1.0 - p}
    if variant == "magnitude":
        return magnitude_prune(d, p, dense=dense), info
    apply_fn = make_apply_fn(model, schedule) if model is not None else None
    if variant == "dare_q":
        if q is None:
            x, t = calibration
            q, grid, changes = find_q(apply_fn, base_params, d, p, key, x, t, dense=dense)
            info["q_grid"], info["output_changes"] = [float(v) for v in grid], [float(v) for v in changes]
        _check_q(float(q), p)
        return dare_q(d, p, key, float(q), dense=dense), {**info, "q": float(q)}
    x, t = calibration
    means = layer_input_means(model, finetuned_params, x, network_time(schedule, t))
    if eta is None:
        eta, qs, etas, changes = find_eta(apply_fn, base_params, d, p, key, x, t, means, dense=dense)
        info["eta_grid"], info["output_changes"] = [float(v) for v in etas], [float(v) for v in changes]
    else:
        qs = analytic_q(d, means, p, eta=eta, dense=dense)
    q_values = [float(v) for v in jax.tree.leaves(qs)]
    info.update(eta=float(eta), q_mean=float(np.mean(q_values)), q_min=min(q_values), q_max=max(q_values))
    return dare_q(d, p, key, qs, dense=dense), info


def write_pruned_workdir(out: str, *, finetuned_config, merged, sparse: SparseDelta, sources: dict) -> tuple[int, str]:
    """Write the output of ``dpmjax delta prune``: ``OUT/delta.npz`` (the sparse delta, ``save``) and a sampleable
    workdir -- ``config.json`` (the finetuned workdir's model, schedule, data, target and sample settings, with
    ``pretrained.format`` = ``PRUNED_FORMAT`` so ``dpmjax.workdir.load_params`` restores ``checkpoints/0`` as plain
    ``{"params": ...}``, as for a converted checkpoint; ``delta`` records variant, p, q, seed and the two source
    workdirs) and ``checkpoints/0`` = base + pruned delta (orbax, fingerprinted). Everything goes to a temporary
    sibling folder renamed into place at the end. Returns (size of delta.npz in bytes, out)."""
    import shutil

    import ml_collections

    from dpmjax.train import checkpoint

    out = os.path.abspath(out)
    if os.path.exists(out):
        raise ValueError(f"{out} already exists: write the pruned model to a new folder")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    source = json.loads(finetuned_config.to_json())
    config = {name: source[name] for name in ("seed", "model", "schedule", "data", "sample") if name in source}
    config["train"] = {"target": str(source.get("train", {}).get("target", "eps"))}
    config["pretrained"] = {"format": PRUNED_FORMAT, **sources, "delta_file": DELTA_FILE}
    config["delta"] = dict(sparse.info)
    ml_collections.ConfigDict(config)  # a ConfigDict-readable config.json, as every workdir's
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    try:
        size = save(os.path.join(tmp, DELTA_FILE), sparse)
        mngr = checkpoint.manager(tmp, max_to_keep=1)
        try:
            checkpoint.save(mngr, 0, {"params": merged["params"]}, {"format": PRUNED_FORMAT, **sources})
        finally:
            mngr.close()
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return size, out
