"""Device mesh and shardings: one "data" axis, the same code on 1 CPU, 8 simulated CPUs or a pod.

Multi-host: call ``jax.distributed.initialize()`` before ``make_mesh`` (``dpmjax train --multihost``);
``jax.devices()`` then lists every host's devices, and ``dpmjax.data.BatchIterator(..., mesh=mesh)``
assembles global batches from each host's rows.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def make_mesh(num_devices: int | None = None) -> Mesh:
    devices = jax.devices()
    if num_devices is not None:
        if not 1 <= num_devices <= len(devices):
            raise ValueError(f"num_devices must be in [1, {len(devices)}], got {num_devices}")
        devices = devices[:num_devices]
    # Mesh(...) gives classic "Auto" axes (jax.make_mesh defaults to explicit-sharding mode in jax 0.10).
    return Mesh(np.asarray(devices), ("data",))


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over "data"."""
    return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
