"""What a run on an existing workdir checks and records: the config it resumes with, its history, its logs.

    previous = check_resume_config(workdir, config, has_checkpoint=True)   # ConfigMismatchError (a ValueError)
    record_config(workdir, config, previous, step)                         # config.json + config_history.jsonl
    truncate_metrics(workdir, step)                                        # drop rows logged after `step`

The rule: a resumed run must continue the checkpoint it restores and stay described by its workdir's config.
So a resume is refused when the config differs in anything that changes what the checkpoint means or how
training continues from it; only bookkeeping may change:

  allowed (``RESUMABLE_KEYS``): ``train.num_steps`` (train longer or stop earlier), ``train.log_every``,
  ``train.checkpoint_every``, ``train.keep_checkpoints``, ``train.sharding`` (a device layout: the same values
  are restored into the new rule's shardings) and ``sample.*`` (sampling defaults, read after training);

  refused: everything else, notably ``model.*`` (another network: the parameters do not fit or mean something
  else), ``schedule.*`` and ``train.target`` (the same network read as another prediction: e.g. an eps-trained
  network sampled as v-prediction gives wrong samples with exit 0), ``data.*`` (another dataset, image shape,
  batch or augmentation: the saved pipeline position and the learned distribution belong to the old one),
  ``seed`` (the noise and data order of the remaining steps), ``optim.*``, ``train.ema_decay`` and
  ``train.min_snr_gamma`` (the optimizer state and the remaining updates), and any key this list does not
  know (new keys are refused until someone decides they are harmless).

Note: with ``optim.decay = "cosine"`` the learning-rate schedule spans ``train.num_steps``, so changing it
stretches the remaining schedule; the change is recorded in the history like any other.

Allowed changes are appended to ``config_history.jsonl`` (one JSON row per run that changed something:
the step it took effect at and ``{key: [old, new]}``) and ``config.json`` becomes the new config; the first
row holds the full config the workdir started with.
"""
from __future__ import annotations

import json
import os
import time

__all__ = ["read_workdir_config", "RESUMABLE_KEYS", "ConfigMismatchError", "flatten_config", "config_diff", "check_resume_config",
           "record_config", "truncate_metrics", "CONFIG_FILE", "HISTORY_FILE", "METRICS_FILE"]

CONFIG_FILE = "config.json"
HISTORY_FILE = "config_history.jsonl"
METRICS_FILE = "metrics.jsonl"
RESUMABLE_KEYS = ("train.num_steps", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
                  "train.sharding", "sample")
_ABSENT = "<absent>"


class ConfigMismatchError(ValueError):
    """The config differs from the workdir's in keys that change what its checkpoints mean."""


def _as_dict(config) -> dict:
    if isinstance(config, dict):
        return json.loads(json.dumps(config))
    return json.loads(config.to_json())  # tuples become lists, as in config.json


def flatten_config(config, prefix: str = "") -> dict:
    """{"a.b.c": leaf value} of a ConfigDict or nested dict (lists and tuples are leaves)."""
    tree = _as_dict(config) if not prefix else config
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten_config(value, name + "."))
        else:
            flat[name] = value
    return flat


def _resumable(key: str) -> bool:
    return any(key == allowed or key.startswith(allowed + ".") for allowed in RESUMABLE_KEYS)


def config_diff(old, new) -> list[tuple[str, object, object]]:
    """[(dotted key, old value, new value)] of the leaves that differ (``"<absent>"`` for a missing key)."""
    a, b = flatten_config(old), flatten_config(new)
    return [(key, a.get(key, _ABSENT), b.get(key, _ABSENT)) for key in sorted(set(a) | set(b))
            if a.get(key, _ABSENT) != b.get(key, _ABSENT)]


def _short(value, limit: int = 60) -> str:
    text = repr(value) if value != _ABSENT else value
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigMismatchError(f"cannot read {path}: {err}") from err


def check_resume_config(workdir: str, config, *, has_checkpoint: bool, checkpoint_config: dict | None = None):
    """The workdir's previous config (a dict; None for a new workdir), after checking ``config`` may resume it.

    Raises ``ConfigMismatchError`` with a short diff when the workdir has a checkpoint and ``config`` differs
    in a key outside ``RESUMABLE_KEYS``. The previous config is ``config.json``, or ``checkpoint_config`` (the
    config saved in the checkpoint's metadata) when the file is missing. Without a checkpoint nothing is
    protected and the previous config is returned only for the history.
    """
    path = os.path.join(workdir, CONFIG_FILE)
    previous = _read_json(path) if os.path.exists(path) else checkpoint_config
    if not has_checkpoint:
        return previous
    if previous is None:
        raise ConfigMismatchError(f"{workdir} holds checkpoints but no {CONFIG_FILE} (and its checkpoint stores no "
                                  "config): cannot check that this config may resume it; use another --workdir")
    refused = [d for d in config_diff(previous, config) if not _resumable(d[0])]
    if refused:
        lines = "\n".join(f"  {key}: {_short(old)} -> {_short(new)}" for key, old, new in refused[:12])
        more = f"\n  ... and {len(refused) - 12} more" if len(refused) > 12 else ""
        raise ConfigMismatchError(
            f"refusing to resume {workdir}: its checkpoints were trained with another config, and these keys "
            f"change what they mean or how training continues:\n{lines}{more}\n"
            f"Use a new --workdir, or the workdir's values (see {path}). Only {', '.join(RESUMABLE_KEYS)} may "
            "change on resume.")
    return previous


def _write_atomically(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def record_config(workdir: str, config, previous, step: int) -> list[tuple[str, object, object]]:
    """Write ``config.json`` and append what changed (from ``previous``, at ``step``) to the history.

    Returns the differences recorded (empty when nothing changed; the first run records the full config).
    """
    new = _as_dict(config)
    history = os.path.join(workdir, HISTORY_FILE)
    changes = [] if previous is None else config_diff(previous, new)
    first = not os.path.exists(history)
    if first or changes:
        row = {"step": int(step), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if first:
            row["config"] = new
        if changes:
            row["changes"] = {key: [old, value] for key, old, value in changes}
        with open(history, "a") as f:
            f.write(json.dumps(row) + "\n")
    _write_atomically(os.path.join(workdir, CONFIG_FILE), json.dumps(new, indent=2))
    return changes


def truncate_metrics(workdir: str, step: int) -> int:
    """Drop the rows of ``metrics.jsonl`` logged after ``step`` (a resume repeats those steps). Returns how many."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return 0
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row_step = json.loads(line).get("step")
            except json.JSONDecodeError:  # a line cut by a crash mid-write
                dropped += 1
                continue
            if isinstance(row_step, int) and row_step > step:
                dropped += 1
            else:
                kept.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        _write_atomically(path, "".join(kept))
    return dropped


def read_workdir_config(workdir: str):
    """The ``config.json`` a workdir was trained (or converted, or finetuned) with, as a ConfigDict; a clear
    FileNotFoundError when the folder or its config is missing."""
    import ml_collections

    workdir = os.path.abspath(workdir)
    path = os.path.join(workdir, CONFIG_FILE)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise FileNotFoundError(f"workdir {workdir} is a file, not a workdir folder")
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"workdir {workdir} does not exist (train one with `dpmjax train --config ... "
                                "--workdir ...` or convert one with `dpmjax convert`)")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: {workdir} is not a dpmjax training workdir "
                                "(run `dpmjax train --config ... --workdir ...` first)")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))
