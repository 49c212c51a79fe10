"""Durable state of the co-serving server: finetuning jobs, their checkpoints and finished adapters.

    STATE_DIR/jobs/<job id>/job.json        spec + state (queued | running | done | failed), step, loss, error
    STATE_DIR/jobs/<job id>/data.npz        the job's training images (and labels)
    STATE_DIR/jobs/<job id>/checkpoint.npz  the adapter and Adam's moments at the last checkpointed step
    STATE_DIR/adapters/<name>.npz           a finished adapter (rank-padded A, B per kernel) and its scale

Every file is written to a temporary name in the same folder, flushed and fsync'ed, then renamed over the old
one (``os.replace`` is atomic on POSIX): a crash leaves the previous version whole. Arrays are stored as ``.npz``
with "/"-joined pytree paths as names and read with ``allow_pickle=False``; nothing is ever unpickled (the same
rule as the orbax checkpoints of ``dpmjax.train.checkpoint``). Like those checkpoints, a checkpoint that holds
NaN/inf is refused (``FloatingPointError``), so a diverged job can never overwrite its last finite state.
The checkpoint stores its step inside the npz, and job.json is written after it: on restart the step comes from
the checkpoint itself, so the two cannot disagree.
"""
from __future__ import annotations

import io
import json
import os
import re
import tempfile

import numpy as np
from flax import traverse_util

__all__ = ["atomic_write_bytes", "write_json", "read_json", "save_arrays", "load_arrays", "flatten_tree",
           "unflatten_tree", "job_dir", "adapter_path", "list_jobs", "check_name", "NAME_PATTERN"]

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_name(name) -> str:
    """An adapter name usable as a file name: letters, digits, '_', '.', '-' (64 at most)."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ValueError(f"name must match {NAME_PATTERN.pattern} (letters, digits, '_', '.', '-'), got {name!r}")
    return name


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and an atomic rename."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str, value: dict) -> None:
    atomic_write_bytes(path, json.dumps(value, indent=1, sort_keys=True).encode())


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def flatten_tree(tree, prefix: str) -> dict:
    """{"prefix/a/b": array} of a nested dict of arrays."""
    return {f"{prefix}/" + "/".join(map(str, key)): np.asarray(leaf)
            for key, leaf in traverse_util.flatten_dict(tree).items()}


def unflatten_tree(arrays: dict, prefix: str) -> dict:
    """The nested dict ``flatten_tree`` wrote under ``prefix``."""
    start = prefix + "/"
    flat = {tuple(name[len(start):].split("/")): value for name, value in arrays.items() if name.startswith(start)}
    return traverse_util.unflatten_dict(flat)


def save_arrays(path: str, arrays: dict, *, require_finite: bool = True) -> None:
    """An npz of ``arrays`` written atomically; refuses non-finite floating arrays (naming them)."""
    if require_finite:
        bad = [name for name, value in arrays.items()
               if np.issubdtype(np.asarray(value).dtype, np.inexact) and not np.all(np.isfinite(value))]
        if bad:
            raise FloatingPointError(f"refusing to write {os.path.basename(path)}: non-finite values in {bad[:4]}")
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def load_arrays(path: str) -> dict:
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def job_dir(state_dir: str, job_id: str) -> str:
    return os.path.join(state_dir, "jobs", job_id)


def adapter_path(state_dir: str, name: str) -> str:
    return os.path.join(state_dir, "adapters", check_name(name) + ".npz")


def list_jobs(state_dir: str) -> list[dict]:
    """Every job.json under ``STATE_DIR/jobs``, oldest first (by the ``created`` time it records)."""
    folder = os.path.join(state_dir, "jobs")
    jobs = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        path = os.path.join(folder, name, "job.json")
        if os.path.isfile(path):
            jobs.append(read_json(path))
    return sorted(jobs, key=lambda job: (job.get("created", 0.0), job["id"]))
