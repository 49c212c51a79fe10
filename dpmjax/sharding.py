"""The one device mesh and the sharding rules every layer uses: training, EMS, FID and sampling.

    mesh = make_mesh()                                    # all devices (every host's) on a "data" axis
    x = jax.device_put(batch, data_sharding(mesh))        # leading (batch) axis split over "data"
    shardings = sharding_rule("fsdp", mesh, abstract)     # params / optimizer state: replicate or fsdp

The same code runs on 1 CPU, 8 simulated CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8``)
and a multi-host pod (call ``jax.distributed.initialize()`` before ``make_mesh``; ``jax.devices()`` then lists
every host's devices).

Rules (big_vision's ``fsdp`` / ``replicate`` sharding rules, simplified to one "data" axis):
  ``replicate``: every leaf whole on every device (classic data parallelism);
  ``fsdp``: each leaf of at least ``min_size`` elements is split over "data" along its largest axis that the
  axis size divides (ZeRO-3 / fully sharded data parallelism: params, EMA and optimizer state each take about
  1/n of the bytes per device; XLA inserts the all-gathers); smaller leaves are replicated. A large leaf with
  no divisible axis is an error naming the parameter, raised before anything compiles.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = ["DATA_AXIS", "SHARDING_RULES", "make_mesh", "data_sharding", "replicated", "sharding_rule",
           "fsdp_spec", "data_axis_size", "pad_to_multiple", "bytes_per_device"]

DATA_AXIS = "data"
SHARDING_RULES = ("replicate", "fsdp")
FSDP_MIN_SIZE = 2 ** 12  # leaves with fewer elements stay replicated (biases, norms: all-gathers cost more)


def make_mesh(num_devices: int | None = None, *, devices=None) -> Mesh:
    """A 1-d mesh with axis "data" over ``devices`` (default ``jax.devices()``, the first ``num_devices``).

    ``Mesh(...)`` gives classic "Auto" axes (GSPMD); ``jax.make_mesh`` defaults to explicit-sharding mode in
    jax >= 0.10, which the library does not use.
    """
    devices = list(jax.devices() if devices is None else devices)
    if num_devices is not None:
        if isinstance(num_devices, bool) or not isinstance(num_devices, (int, np.integer)) \
                or not 1 <= num_devices <= len(devices):
            raise ValueError(f"num_devices must be an integer in [1, {len(devices)}], got {num_devices!r}")
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def data_axis_size(mesh: Mesh) -> int:
    if DATA_AXIS not in mesh.axis_names:
        raise ValueError(f"the mesh needs a {DATA_AXIS!r} axis to shard the batch over, got axes {mesh.axis_names}")
    return int(mesh.shape[DATA_AXIS])


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over "data", the other axes whole."""
    data_axis_size(mesh)
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_spec(shape, num_shards: int, *, min_size: int = FSDP_MIN_SIZE, name: str = "leaf") -> P:
    """The fsdp PartitionSpec of one leaf: its largest axis that ``num_shards`` divides, over "data"."""
    shape = tuple(int(n) for n in shape)
    if num_shards == 1 or math.prod(shape) < min_size:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % num_shards == 0:
            spec = [None] * len(shape)
            spec[axis] = DATA_AXIS
            return P(*spec)
    raise ValueError(f"sharding rule 'fsdp': parameter {name} of shape {shape} has no axis divisible by the "
                     f"{num_shards} devices of the data axis; use sharding='replicate', another device count, or "
                     "change the layer width")


def sharding_rule(rule: str, mesh: Mesh, tree, *, min_size: int = FSDP_MIN_SIZE) -> Any:
    """A pytree of ``NamedSharding`` shaped like ``tree`` (arrays or ``jax.ShapeDtypeStruct``s) for ``rule``."""
    if rule not in SHARDING_RULES:
        raise ValueError(f"sharding rule must be one of {SHARDING_RULES}, got {rule!r}")
    if rule == "replicate":
        return jax.tree.map(lambda _: replicated(mesh), tree)
    num_shards = data_axis_size(mesh)

    def leaf_sharding(path, leaf):
        spec = fsdp_spec(np.shape(leaf), num_shards, min_size=min_size, name=jax.tree_util.keystr(path))
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(leaf_sharding, tree)


def pad_to_multiple(x, multiple: int, axis: int = 0):
    """(x padded with zeros along ``axis`` to a multiple of ``multiple``, original length)."""
    n = x.shape[axis]
    extra = (-n) % multiple
    if extra == 0:
        return x, n
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return np.pad(np.asarray(x), widths) if isinstance(x, np.ndarray) else jax.numpy.pad(x, widths), n


def bytes_per_device(tree) -> dict:
    """{device: bytes of ``tree``'s shards held there} for a pytree of (sharded) jax arrays."""
    held: dict = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    return held
