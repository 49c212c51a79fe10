"""In-memory sources and the seeded, resumable batch pipeline.

A *source* is anything with ``len(source)``, ``source.get_batch(indices) -> {"image", "label"}``,
``source.image_shape`` ``(H, W, C)`` and ``source.num_classes`` (``None`` for unlabelled data). Images are NHWC
float32 in [-1, 1], labels int32. :class:`ArraySource` holds arrays in memory; lazy sources (TFDS, image folders)
read on demand.

The pipeline's position is a small dict ``{"seed", "epoch", "position", "num_examples"}`` of Python ints
(JSON-serialisable, so a checkpoint can hold it). Everything a batch contains -- which examples, which ones
are flipped -- is a pure function of that dict (:func:`plan_batch`), so restoring it continues bit-identically:

    order_e = permutation(num_examples; seed, e)        # np.random.default_rng([seed, e]), new per epoch
    batch   = order_e[position : position + batch_size]
    flips   = uniform(seed, e, position) < 1/2          # only with random_flip

Global batches are placed on a ``jax.sharding.Mesh``'s data axis with ``NamedSharding(mesh, P(data_axis))``
through ``jax.make_array_from_process_local_data``: each process reads only the rows its devices hold, so the
same code serves 1 device, 8 simulated CPU devices and a multi-host pod.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Protocol, Sequence

import numpy as np

STATE_KEYS = ("seed", "epoch", "position", "num_examples")


class DataSource(Protocol):
    """Random-access dataset of NHWC float32 images in [-1, 1] and int32 labels."""

    image_shape: tuple[int, int, int]
    num_classes: int | None

    def __len__(self) -> int: ...

    def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]: ...


def uint8_to_unit_range(images: np.ndarray) -> np.ndarray:
    """Map uint8 gray levels 0..255 to float32 in [-1, 1] (x / 127.5 - 1, the DDPM convention)."""
    return (np.asarray(images, np.float32) / np.float32(127.5) - np.float32(1.0)).astype(np.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class ArraySource:
    """A dataset held in memory.

    Attributes:
      images: [N, H, W, C] float32 in [-1, 1].
      labels: [N] int32 (zeros for unlabelled data).
      num_classes: number of classes, ``None`` when unlabelled.
      name: a label for messages and logs.
      class_names: optional names of the classes, index = label.
    """

    images: np.ndarray
    labels: np.ndarray
    num_classes: int | None
    name: str = "arrays"
    class_names: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.images.ndim != 4 or self.images.dtype != np.float32:
            raise ValueError(f"{self.name}: images must be [N, H, W, C] float32, got {self.images.shape} "
                             f"{self.images.dtype}")
        if self.labels.shape != self.images.shape[:1] or self.labels.dtype != np.int32:
            raise ValueError(f"{self.name}: labels must be [N] int32 with N = {self.images.shape[0]}, got "
                             f"{self.labels.shape} {self.labels.dtype}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.images.shape[1:])

    def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        indices = np.asarray(indices, np.int64)
        return {"image": self.images[indices], "label": self.labels[indices]}


def materialize(source: DataSource, *, chunk_size: int = 1024, name: str | None = None) -> ArraySource:
    """Read a whole (lazy) source into an :class:`ArraySource`, in index order."""
    if isinstance(source, ArraySource):
        return source
    count = len(source)
    images = np.empty((count, *source.image_shape), np.float32)
    labels = np.empty((count,), np.int32)
    for start in range(0, count, chunk_size):
        rows = np.arange(start, min(start + chunk_size, count))
        batch = source.get_batch(rows)
        images[rows], labels[rows] = batch["image"], batch["label"]
    return ArraySource(images, labels, source.num_classes, name or getattr(source, "name", "materialized"),
                       getattr(source, "class_names", None))


def initial_state(seed: int, num_examples: int) -> dict[str, int]:
    """The state of a pipeline that has produced nothing yet."""
    return {"seed": int(seed), "epoch": 0, "position": 0, "num_examples": int(num_examples)}


def epoch_order(seed: int, epoch: int, num_examples: int, shuffle: bool = True) -> np.ndarray:
    """Example indices of one epoch: a permutation seeded by (seed, epoch), or 0..N-1 without shuffling."""
    if not shuffle:
        return np.arange(num_examples, dtype=np.int64)
    return np.random.default_rng([int(seed), int(epoch)]).permutation(num_examples).astype(np.int64)


def plan_batch(state: dict[str, int], *, batch_size: int, shuffle: bool = True, drop_remainder: bool = True,
               order: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Which examples the next global batch holds, and the state after it (a pure function).

    Args:
      state: the pipeline state (see module docstring).
      batch_size: global batch size.
      shuffle: permute the examples anew each epoch.
      drop_remainder: skip the last incomplete batch of each epoch (otherwise it is returned, shorter).
      order: this epoch's ``epoch_order(...)`` when the caller cached it (saves recomputing the permutation).

    Returns:
      (indices [b], flip_draws [b] uniform in [0, 1), next_state). ``b == batch_size`` except for the last
      batch of an epoch when ``drop_remainder=False``.
    """
    seed, epoch, position, count = (int(state[k]) for k in STATE_KEYS)
    if order is None:
        order = epoch_order(seed, epoch, count, shuffle)
    stop = min(position + batch_size, count)
    indices = order[position:stop]
    # The flip draws have their own stream (tag 1) keyed by the batch's place, not by the example.
    flip_draws = np.random.default_rng([seed, epoch, position, 1]).random(len(indices))
    remaining = count - stop
    if remaining == 0 or (drop_remainder and remaining < batch_size):
        next_state = {"seed": seed, "epoch": epoch + 1, "position": 0, "num_examples": count}
    else:
        next_state = {"seed": seed, "epoch": epoch, "position": stop, "num_examples": count}
    return indices, flip_draws, next_state


def _axis_size(mesh, data_axis: str | Sequence[str]) -> int:
    axes = (data_axis,) if isinstance(data_axis, str) else tuple(data_axis)
    missing = [a for a in axes if a not in mesh.shape]
    if missing:
        raise ValueError(f"data_axis {missing} not in the mesh's axes {tuple(mesh.shape)}")
    return int(np.prod([mesh.shape[a] for a in axes]))


def local_rows(sharding, global_batch: int, row_shape: tuple[int, ...]) -> np.ndarray:
    """Rows of a global batch that this process's devices hold, in the order make_array_from_process_local_data
    expects them (ascending distinct row blocks)."""
    index_map = sharding.addressable_devices_indices_map((global_batch, *row_shape))
    blocks = sorted({(s[0].start or 0, global_batch if s[0].stop is None else s[0].stop)
                     for s in index_map.values()})
    return np.concatenate([np.arange(a, b) for a, b in blocks]) if blocks else np.zeros((0,), np.int64)


class BatchIterator(Iterator[dict[str, Any]]):
    """Seeded, resumable iterator of global batches ``{"image": [B, H, W, C], "label": [B]}``.

    Without a mesh it yields numpy arrays. With ``mesh`` it yields ``jax.Array``s sharded over ``data_axis``
    (``NamedSharding(mesh, P(data_axis))``), each process reading only its own rows.

    ``get_state()`` returns the dict to checkpoint; ``BatchIterator(..., state=saved)`` or ``set_state(saved)``
    continues exactly where it was. The state pins the seed and the dataset size; restoring a state saved on
    a dataset of another size raises ValueError rather than silently reading a different order.
    """

    def __init__(self, source: DataSource, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 drop_remainder: bool = True, num_epochs: int | None = None, random_flip: bool = False,
                 mesh=None, data_axis: str | Sequence[str] = "data", state: dict[str, int] | None = None):
        count = len(source)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if drop_remainder and batch_size > count:
            raise ValueError(f"batch_size={batch_size} exceeds the {count} examples of the dataset with "
                             "drop_remainder=True (no batch would ever be produced)")
        if num_epochs is not None and num_epochs < 1:
            raise ValueError(f"num_epochs must be None (forever) or >= 1, got {num_epochs}")
        self.source, self.batch_size, self.shuffle = source, int(batch_size), bool(shuffle)
        self.drop_remainder, self.num_epochs, self.random_flip = bool(drop_remainder), num_epochs, bool(random_flip)
        self.mesh, self.data_axis = mesh, data_axis
        self._sharding = None
        if mesh is not None:
            import jax

            devices = _axis_size(mesh, data_axis)
            sizes = {self.batch_size} | ({count % self.batch_size} - {0} if not drop_remainder else set())
            bad = sorted(s for s in sizes if s % devices)
            if bad:
                raise ValueError(f"batch sizes {bad} are not divisible by the {devices} devices of mesh axis "
                                 f"{data_axis!r} (the last batch is count % batch_size when drop_remainder=False)")
            self._sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(data_axis))
        self._order_key, self._order = None, None
        self._state = initial_state(seed, count)
        if state is not None:
            self.set_state(state)

    def get_state(self) -> dict[str, int]:
        """The position to checkpoint: a dict of Python ints."""
        return dict(self._state)

    def set_state(self, state: dict[str, int]) -> None:
        """Continue from a state returned by ``get_state`` (possibly by another process or run)."""
        missing = [k for k in STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"pipeline state lacks {missing}; expected keys {STATE_KEYS}, got {sorted(state)}")
        restored = {k: int(state[k]) for k in STATE_KEYS}
        if restored["num_examples"] != len(self.source):
            raise ValueError(f"pipeline state was saved for {restored['num_examples']} examples but the dataset "
                             f"now has {len(self.source)}: the data changed, the saved order does not apply")
        if not 0 <= restored["position"] < max(restored["num_examples"], 1) or restored["epoch"] < 0:
            raise ValueError(f"pipeline state out of range: {restored}")
        self._state = restored

    @property
    def steps_per_epoch(self) -> int:
        count = len(self.source)
        return count // self.batch_size if self.drop_remainder else -(-count // self.batch_size)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        state = self._state
        if self.num_epochs is not None and state["epoch"] >= self.num_epochs:
            raise StopIteration
        key = (state["seed"], state["epoch"])
        if key != self._order_key:
            self._order_key = key
            self._order = epoch_order(state["seed"], state["epoch"], state["num_examples"], self.shuffle)
        indices, flip_draws, self._state = plan_batch(state, batch_size=self.batch_size, shuffle=self.shuffle,
                                                      drop_remainder=self.drop_remainder, order=self._order)
        rows = slice(None) if self._sharding is None else local_rows(self._sharding, len(indices),
                                                                     self.source.image_shape)
        batch = self.source.get_batch(indices[rows])
        if self.random_flip:
            flip = flip_draws[rows] < 0.5
            batch["image"] = np.where(flip[:, None, None, None], batch["image"][:, :, ::-1], batch["image"])
        if self._sharding is None:
            return batch
        import jax

        return {name: jax.make_array_from_process_local_data(self._sharding, np.ascontiguousarray(value),
                                                             (len(indices), *value.shape[1:]))
                for name, value in batch.items()}


def batch_iterator(source: DataSource, batch_size: int, **kwargs) -> BatchIterator:
    """Shorthand for :class:`BatchIterator` (same arguments)."""
    return BatchIterator(source, batch_size, **kwargs)
