"""Datasets and the seeded, resumable, sharded batch pipeline.

    source = get_dataset("digits", "train")                  # or "fashion_mnist", "tfds:cifar10", "folder:DIR"
    batches = BatchIterator(source, 128, seed=0, mesh=mesh)  # global batches sharded over mesh axis "data"
    batch = next(batches)                                    # {"image": [128, 8, 8, 1] float32, "label": [128]}
    saved = batches.get_state()                              # {"seed", "epoch", "position", "num_examples"}
    BatchIterator(source, 128, mesh=mesh, state=saved)       # continues bit-identically

Images are NHWC float32 in [-1, 1]; labels int32.
"""
from __future__ import annotations

import os

from dpmjax.data.digits import load_digits
from dpmjax.data.folder import ImageFolderSource
from dpmjax.data.idx import FASHION_MNIST_DIR, load_fashion_mnist, load_idx_dataset, read_idx
from dpmjax.data.pipeline import (ArraySource, BatchIterator, DataSource, batch_iterator, epoch_order,
                                  initial_state, materialize, plan_batch)
from dpmjax.data.tfds_source import load_tfds

DATASET_NAMES = ("digits", "fashion_mnist", "tfds:<name>", "folder:<path>", "idx:<dir>", "style:<dataset>:<transform>")


def _folder(root: str, split: str, **kwargs) -> ImageFolderSource:
    """``root/<split>`` when it exists; ``root`` itself only for the train split (never reuse it as test)."""
    if os.path.isdir(os.path.join(root, split)):
        return ImageFolderSource(os.path.join(root, split), **kwargs)
    if split == "train":
        return ImageFolderSource(root, **kwargs)
    raise FileNotFoundError(f"image folder {root} has no sub-folder {split!r} for split {split!r} (only the "
                            "train split may use the folder itself)")


def get_dataset(name: str, split: str = "train", **kwargs) -> DataSource:
    """A dataset by name.

    Args:
      name: ``"digits"`` (scikit-learn's bundled 8x8 digits), ``"fashion_mnist"`` (idx files, default
        ``/usr/share/datasets/fashion-mnist``; kwargs ``data_dir``), ``"tfds:<name>"`` (kwargs ``backend``,
        ``data_dir``, ``download``, ``image_key``, ``label_key``, ``image_size``), ``"folder:<path>"`` (kwargs
        ``image_size``, ``channels``, ``in_memory``), ``"idx:<dir>"`` (any MNIST-layout idx folder) or
        ``"style:<dataset>:<transform>"`` (a dataset in a style-transformed domain, ``dpmjax.data.few_shot``).
      split: ``"train"`` or ``"test"`` (``"all"`` for digits; any TFDS split string for tfds).
    """
    if name == "digits":
        return load_digits(split, **kwargs)
    if name in ("fashion_mnist", "fashion-mnist"):
        return load_fashion_mnist(split, **kwargs)
    if name.startswith("tfds:") and len(name) > 5:
        return load_tfds(name[5:], split, **kwargs)
    if name.startswith("folder:") and len(name) > 7:
        return _folder(name[7:], split, **kwargs)
    if name.startswith("style:"):
        from dpmjax.data.few_shot import load_style
        return load_style(name, split, **kwargs)
    if name.startswith("idx:") and len(name) > 4:
        return load_idx_dataset(name[4:], split, name=name, **kwargs)
    raise ValueError(f"unknown dataset {name!r}; known: {DATASET_NAMES}")


__all__ = ["ArraySource", "BatchIterator", "DataSource", "DATASET_NAMES", "FASHION_MNIST_DIR",
           "ImageFolderSource", "batch_iterator", "epoch_order", "get_dataset", "initial_state", "load_digits",
           "load_fashion_mnist", "load_idx_dataset", "load_tfds", "materialize", "plan_batch", "read_idx"]
