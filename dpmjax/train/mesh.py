"""Device mesh and shardings: one "data" axis, the same code on 1 CPU, 8 simulated CPUs or a pod.

Multi-host: call ``jax.distributed.initialize()`` before ``make_mesh`` (``dpmjax train --multihost``);
``jax.devices()`` then lists every host's devices and batches are assembled from per-host shards.
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


def shard_batch(batch, mesh: Mesh):
    """Place a host-global batch (dict of numpy arrays) on the mesh, split along the batch axis."""
    size = mesh.devices.size
    for name, value in batch.items():
        if value.shape[0] % size:
            raise ValueError(f"batch[{name!r}] has {value.shape[0]} rows, not divisible by the {size} devices of "
                             "the mesh's data axis: choose a batch size that is a multiple of it")
    if jax.process_count() > 1:
        return {k: jax.make_array_from_process_local_data(data_sharding(mesh), v) for k, v in batch.items()}
    return jax.device_put(batch, data_sharding(mesh))
