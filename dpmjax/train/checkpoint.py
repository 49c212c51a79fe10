"""Checkpoints with orbax: periodic, keep-N, atomic, verified on restore, never non-finite.

    mngr = manager(workdir, max_to_keep=3)
    save(mngr, step, state, {"data_state": ...})          # refuses a state holding NaN / inf
    state, meta = restore(mngr, abstract_state)            # raises CheckpointError if corrupt or non-finite

Guarantees and why:

* **Atomic.** orbax writes each checkpoint to a temporary directory and renames it when complete: a crash
  mid-save leaves the previous checkpoints intact.
* **Never non-finite.** ``save`` checks every floating leaf and refuses (``FloatingPointError`` naming the
  leaves) to write NaN or inf, so keep-N rotation can never delete a finite checkpoint in favour of a diverged
  one. ``restore`` checks again (a checkpoint written by an older version, or damaged) and raises.
* **Verified.** ``save`` stores a 64-bit fingerprint of every array's bits in the checkpoint's JSON metadata
  (written in the same atomic step as the arrays); ``restore`` recomputes it on the restored arrays and raises
  ``CheckpointError`` naming the directory and the arrays that differ. The check is end to end: it covers
  whatever orbax's storage format does (zarr / OCDBT files, compression). The fingerprint is computed where
  the arrays live (on device, sharded, one small all-reduce; on the host copy on CPU) rather than as a SHA-256
  of files, because on a pod no single host holds every shard's bytes. It detects corruption (any change of
  one element changes both 32-bit lanes; random multi-element damage collides with probability ~2^-64); it is
  not a cryptographic signature, and need not be: loading never executes code (orbax stores arrays and JSON,
  no pickles).
* **Asynchronous on accelerators.** ``save`` returns once orbax has copied the arrays to host memory; the files
  are written in background threads while training continues (the next ``save`` or ``mngr.close()`` waits).
  On CPU the state is copied to the host with ``jax.device_get`` first and the save is waited for: orbax's
  background threads otherwise slice device arrays, running XLA:CPU programs concurrently with the training
  thread, which was seen to segfault with 8 simulated CPU devices. A multi-process CPU run (arrays that span
  other processes cannot be fetched to one host) saves the device arrays and waits, so nothing runs
  concurrently either.

Checkpoints written before fingerprints existed load with a warning (their values cannot be verified).
"""
from __future__ import annotations

import functools
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

__all__ = ["CheckpointError", "manager", "save", "restore", "restore_meta", "latest_step", "fingerprint",
           "CHECKSUM_KEY", "CHECKSUM_ALGORITHM"]

CHECKSUM_KEY = "checksums"
CHECKSUM_ALGORITHM = "dpmjax-mix64/1"
# Odd multipliers / offsets of the two fingerprint lanes (golden ratio and murmur3 constants).
_LANES = ((0x9E3779B1, 0x7F4A7C15), (0x85EBCA77, 0xC2B2AE3D))


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, non-finite or does not match the model/config; names its directory."""


def manager(workdir: str, max_to_keep: int = 3) -> ocp.CheckpointManager:
    """The orbax manager of ``workdir/checkpoints`` keeping the ``max_to_keep`` newest checkpoints."""
    if isinstance(max_to_keep, bool) or not isinstance(max_to_keep, (int, np.integer)) or max_to_keep < 1:
        raise ValueError(f"max_to_keep (train.keep_checkpoints) must be an integer >= 1, got {max_to_keep!r}")
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(max_to_keep=int(max_to_keep),
                                                                               create=True))


def latest_step(mngr: ocp.CheckpointManager):
    return mngr.latest_step()


# ------------------------------------------------------------------------------------------------ fingerprints

def _words(x, xp):
    """The bits of array ``x`` as uint32 words (one per element; two per element for 64-bit dtypes)."""
    dtype = np.dtype(x.dtype)
    if dtype == np.bool_:
        return x.astype(xp.uint32)
    if dtype.kind not in "biuf" and dtype.name != "bfloat16":
        raise TypeError(f"cannot fingerprint arrays of dtype {dtype}")
    unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint32}[dtype.itemsize]
    if xp is np:
        bits = np.ascontiguousarray(x).view(unsigned)
        if dtype.itemsize == 8:  # [..., n] -> [..., n, 2], the layout of lax.bitcast_convert_type
            bits = bits.reshape(x.shape + (2,))
    else:
        bits = jax.lax.bitcast_convert_type(x, unsigned)
    return bits.astype(xp.uint32)


def _fmix32(h, xp):
    """murmur3's 32-bit finaliser: a bijection of uint32 that mixes every input bit into every output bit.

    The products wrap modulo 2^32 by design; numpy warns about that for 0-d arrays, so the warning is silenced."""
    with np.errstate(over="ignore"):
        h = h ^ xp.right_shift(h, xp.uint32(16))
        h = h * xp.uint32(0x85EBCA6B)
        h = h ^ xp.right_shift(h, xp.uint32(13))
        h = h * xp.uint32(0xC2B2AE35)
        return h ^ xp.right_shift(h, xp.uint32(16))


def _leaf_summary(x, xp):
    """(uint32[2] fingerprint, bool all-finite) of one array, with numpy (host) or jax.numpy (device)."""
    words = _words(x, xp)
    index = xp.arange(words.size, dtype=xp.uint32).reshape(words.shape)
    lanes = [xp.sum(_fmix32(words + index * xp.uint32(mul) + xp.uint32(add), xp), dtype=xp.uint32)
             for mul, add in _LANES]
    finite = xp.all(xp.isfinite(x)) if np.issubdtype(np.dtype(x.dtype), np.inexact) or \
        np.dtype(x.dtype).name == "bfloat16" else xp.asarray(True)
    return xp.stack(lanes), finite


def _summarise_arrays(arrays):
    pairs = [_leaf_summary(a, jnp) for a in arrays]
    return jnp.stack([p[0] for p in pairs]), jnp.stack([p[1] for p in pairs])


@functools.lru_cache(maxsize=8)
def _jitted_summaries(mesh):
    """One jitted summary program per mesh (its outputs replicated there, so every process can fetch them)."""
    return jax.jit(_summarise_arrays, out_shardings=None if mesh is None else NamedSharding(mesh, P()))


def _summaries_on_device(leaves):
    """All leaves' (fingerprints [n, 2], finite [n]) computed where they live, fetched as numpy."""
    mesh = next((leaf.sharding.mesh for leaf in leaves if isinstance(getattr(leaf, "sharding", None),
                                                                       NamedSharding)), None)
    prints, finite = _jitted_summaries(mesh)(leaves)
    return np.asarray(jax.device_get(prints)), np.asarray(jax.device_get(finite))


def _summaries(tree):
    """({leaf path: 16-hex-digit fingerprint}, [paths of leaves holding NaN or inf]) of a pytree of arrays."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    if not flat:
        return {}, []
    names = [jax.tree_util.keystr(path) for path, _ in flat]
    leaves = [leaf for _, leaf in flat]
    on_host = [not isinstance(leaf, jax.Array) for leaf in leaves]
    prints = np.zeros((len(leaves), 2), np.uint32)
    finite = np.ones((len(leaves),), bool)
    for i, leaf in enumerate(leaves):
        if on_host[i]:
            lanes, ok = _leaf_summary(np.asarray(leaf), np)
            prints[i], finite[i] = lanes, bool(ok)
    device = [i for i, host in enumerate(on_host) if not host]
    if device:
        device_prints, device_finite = _summaries_on_device([leaves[i] for i in device])
        prints[device], finite[device] = device_prints, device_finite
    return ({name: f"{int(a):08x}{int(b):08x}" for name, (a, b) in zip(names, prints)},
            [name for name, ok in zip(names, finite) if not ok])


def fingerprint(tree) -> dict[str, str]:
    """{leaf path: 64-bit fingerprint (hex)} of a pytree of arrays (numpy or jax, sharded or not).

    Lane k of a leaf with uint32 words w_i (its bits) is sum_i fmix32(w_i + i * a_k + b_k) mod 2^32: any change
    of one element changes both lanes (fmix32 is a bijection); the position term makes swapped elements count.
    Integer arithmetic, so the value is independent of sharding and reduction order.
    """
    return _summaries(tree)[0]


def _is_host_copy_safe(tree) -> bool:
    """True when every jax array of ``tree`` is on CPU and fully addressable (the host-copy workaround applies)."""
    arrays = [leaf for leaf in jax.tree.leaves(tree) if isinstance(leaf, jax.Array)]
    return all(a.is_fully_addressable and all(d.platform == "cpu" for d in a.sharding.device_set) for a in arrays)


def _on_cpu(tree) -> bool:
    arrays = [leaf for leaf in jax.tree.leaves(tree) if isinstance(leaf, jax.Array)]
    return not arrays or all(d.platform == "cpu" for a in arrays for d in a.sharding.device_set)


def _describe(names, limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# ------------------------------------------------------------------------------------------------ save / restore

def save(mngr: ocp.CheckpointManager, step: int, state, meta: dict) -> None:
    """Save ``state`` (with the JSON-serialisable ``meta``) as checkpoint ``step``, atomically.

    Raises ``FloatingPointError`` naming the leaves if ``state`` holds NaN or inf: a non-finite state is never
    written, so it can never rotate a finite checkpoint out of keep-N. The fingerprints of every array go into
    the metadata under ``"checksums"`` (see the module docstring). Asynchronous on accelerators; on CPU the
    host-copy workaround (module docstring) makes it synchronous.
    """
    if not isinstance(meta, dict) or CHECKSUM_KEY in meta:
        raise ValueError(f"meta must be a dict without the reserved key {CHECKSUM_KEY!r}")
    on_cpu = _on_cpu(state)
    if on_cpu and _is_host_copy_safe(state):
        state = jax.device_get(state)  # CPU workaround (module docstring): orbax's threads then touch no device
    prints, nonfinite = _summaries(state)
    if nonfinite:
        raise FloatingPointError(f"refusing to save step {step} to {mngr.directory}: the state holds NaN or inf in "
                                 f"{_describe(nonfinite)}")
    meta = {**meta, CHECKSUM_KEY: {"algorithm": CHECKSUM_ALGORITHM, "arrays": prints}}
    # A checkpoint is an explicit device -> host transfer: allowed even where the caller guards against
    # implicit ones (the CLI's --transfer-guard; orbax copies shards with np.asarray).
    with jax.transfer_guard("allow"):
        mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
        if on_cpu:
            mngr.wait_until_finished()


def _step_dir(mngr, step) -> str:
    return os.path.join(str(mngr.directory), str(step))


def _others(mngr, step) -> str:
    steps = sorted(s for s in mngr.all_steps() if s != step)
    return (f"; the other checkpoints are steps {steps} (delete {_step_dir(mngr, step)} to use step {steps[-1]})"
            if steps else "")


def _restore_target(leaf):
    """The ShapeDtypeStruct orbax restores ``leaf`` as; without a sharding, onto this process's first device.

    orbax would otherwise use the sharding saved in the checkpoint, which fails ("topology mismatch") for a
    checkpoint written on another device layout, e.g. by a multi-host run and read by one process.
    """
    spec = ocp.utils.to_shape_dtype_struct(leaf)
    if getattr(spec, "sharding", None) is None:
        spec = jax.ShapeDtypeStruct(spec.shape, spec.dtype, sharding=SingleDeviceSharding(jax.local_devices()[0]))
    return spec


def restore(mngr: ocp.CheckpointManager, target_state, step: int | None = None):
    """Restore (state, meta) at ``step`` (default latest) into the structure and shardings of ``target_state``.

    ``target_state`` is a pytree of arrays or ``jax.ShapeDtypeStruct``s (with ``sharding`` to restore sharded,
    e.g. into a sharding rule's layout; without, onto this process's first device, whatever layout wrote the
    checkpoint). Raises ``CheckpointError`` naming the directory when there is no
    checkpoint, when orbax cannot read it (missing / truncated files, another model), when the restored values
    differ from the fingerprints saved with them (damaged files), or when they hold NaN or inf.
    """
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"no checkpoint in {mngr.directory}")
    path = _step_dir(mngr, step)
    abstract = jax.tree.map(_restore_target, target_state)
    try:
        with jax.transfer_guard("allow"):  # an explicit transfer (see ``save``)
            restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                  meta=ocp.args.JsonRestore()))
    except Exception as err:  # noqa: BLE001 - orbax raises many types; name the directory for the user
        raise CheckpointError(f"checkpoint {path} is corrupt or incompatible with this model/config: "
                              f"{type(err).__name__}: {err}") from err
    state, meta = restored["state"], dict(restored["meta"] or {})
    saved = meta.pop(CHECKSUM_KEY, None)
    host_view = jax.device_get(state) if _is_host_copy_safe(state) else state
    prints, nonfinite = _summaries(host_view)
    if saved is None:
        warnings.warn(f"checkpoint {path} has no checksums (written by an older dpmjax): its values cannot be "
                      "verified", stacklevel=2)
    else:
        if saved.get("algorithm") != CHECKSUM_ALGORITHM:
            raise CheckpointError(f"checkpoint {path} uses checksum algorithm {saved.get('algorithm')!r}, this "
                                  f"version knows {CHECKSUM_ALGORITHM!r}")
        expected = saved.get("arrays", {})
        differ = sorted(name for name in set(prints) | set(expected) if prints.get(name) != expected.get(name))
        if differ:
            raise CheckpointError(f"checkpoint {path} is corrupt: the restored values of {len(differ)} of "
                                  f"{len(prints)} arrays differ from the checksums saved with them "
                                  f"({_describe(differ)}); its files were damaged after writing"
                                  f"{_others(mngr, step)}")
    if nonfinite:
        raise CheckpointError(f"checkpoint {path} holds NaN or inf in {_describe(nonfinite)}: it cannot be "
                              f"resumed or sampled{_others(mngr, step)}")
    return state, meta


def restore_meta(workdir: str, step: int | None = None) -> tuple[int, dict]:
    """(step, JSON metadata) of a checkpoint (default latest) without reading its arrays."""
    mngr = manager(workdir)
    try:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {mngr.directory}")
        try:
            restored = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        except Exception as err:  # noqa: BLE001
            raise CheckpointError(f"checkpoint {_step_dir(mngr, step)} has unreadable metadata: "
                                  f"{type(err).__name__}: {err}") from err
    finally:
        mngr.close()
    meta = dict(restored["meta"] or {})
    meta.pop(CHECKSUM_KEY, None)
    return step, meta
