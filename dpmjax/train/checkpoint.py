"""Checkpoints with orbax: periodic, keep-N, atomic (written to a temporary directory, then renamed).

A crash mid-save leaves the previous checkpoints intact; a corrupt or incompatible checkpoint raises an
error naming its directory instead of silently restarting from scratch. Loading never executes code
(orbax stores arrays and JSON, no pickles).
"""
from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    pass


def manager(workdir: str, max_to_keep: int = 3) -> ocp.CheckpointManager:
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))


def save(mngr: ocp.CheckpointManager, step: int, state, meta: dict) -> None:
    # Copy to host first: orbax's background threads otherwise slice device arrays, compiling XLA programs
    # concurrently with the training thread (seen to segfault on CPU with 8 simulated devices). The state is
    # replicated, so every process holds all of it.
    host_state = jax.device_get(state)
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(host_state),
                                            meta=ocp.args.JsonSave(meta)))
    mngr.wait_until_finished()


def latest_step(mngr: ocp.CheckpointManager):
    return mngr.latest_step()


def restore(mngr: ocp.CheckpointManager, target_state, step: int | None = None):
    """Restore (state, meta) at ``step`` (default latest) into the structure and shardings of ``target_state``."""
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"no checkpoint in {mngr.directory}")
    path = os.path.join(str(mngr.directory), str(step))
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
    try:
        restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                              meta=ocp.args.JsonRestore()))
    except Exception as err:  # noqa: BLE001 - orbax raises many types; name the file for the user
        raise CheckpointError(f"checkpoint {path} is corrupt or incompatible with this model/config: "
                              f"{type(err).__name__}: {err}") from err
    return restored["state"], restored["meta"]


def restore_meta(workdir: str, step: int | None = None) -> tuple[int, dict]:
    """Read only the JSON metadata (config, data state) of a checkpoint."""
    mngr = manager(workdir)
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"no checkpoint in {mngr.directory}")
    restored = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return step, restored["meta"]
