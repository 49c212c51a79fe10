"""scikit-learn's bundled handwritten digits: the embedded default dataset (no download).

1797 grayscale 8x8 images with integer gray levels 0..16 (the UCI "Optical Recognition of Handwritten Digits"
test set, shipped inside every scikit-learn wheel as ``sklearn/datasets/data/digits.csv.gz``), classes 0..9
with 174..183 images each. Pixels map to [-1, 1] by ``x / 8 - 1`` (0 -> -1, 16 -> 1).

Split (deterministic, stratified, no random numbers): within each class, in file order, every 5th image
(the 5th, 10th, ...) is held out as ``"test"``; the rest is ``"train"``. That gives 1442 train and 355 test
images (34..36 per class), every class's share within one image of a fifth.
"""
from __future__ import annotations

import gzip
import importlib.util
import os

import numpy as np

from dpmjax.data.pipeline import ArraySource

SPLITS = ("train", "test", "all")
HELDOUT_EVERY = 5
MAX_GRAY_LEVEL = 16


def _read_raw() -> tuple[np.ndarray, np.ndarray]:
    """([1797, 8, 8] gray levels 0..16 as float64, [1797] int labels), read from the wheel's CSV.

    Reading the CSV directly avoids importing sklearn (seconds on a small CPU); ``load_digits`` is the fallback
    where the file is not where scikit-learn 1.x keeps it.
    """
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the digits dataset ships with scikit-learn: `pip install scikit-learn`")
    path = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data", "digits.csv.gz")
    if os.path.exists(path):
        with gzip.open(path, "rt") as handle:
            table = np.loadtxt(handle, delimiter=",", dtype=np.float64)
        return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel

    bunch = load_digits()
    return np.asarray(bunch.images, np.float64), np.asarray(bunch.target, np.int64)


def heldout_mask(labels: np.ndarray, every: int = HELDOUT_EVERY) -> np.ndarray:
    """True for every ``every``-th image of each class in file order (1-based: the every-th, 2*every-th, ...)."""
    rank_in_class = np.zeros(len(labels), np.int64)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        rank_in_class[members] = np.arange(len(members))
    return rank_in_class % every == every - 1


def load_digits(split: str = "train") -> ArraySource:
    """The digits as an :class:`ArraySource`: images [N, 8, 8, 1] float32 in [-1, 1], labels int32 0..9.

    Args:
      split: ``"train"`` (1442), ``"test"`` (the 355 held out, see module docstring) or ``"all"`` (1797).
    """
    if split not in SPLITS:
        raise ValueError(f"digits split must be one of {SPLITS}, got {split!r}")
    gray, labels = _read_raw()
    if gray.min() < 0 or gray.max() > MAX_GRAY_LEVEL:
        raise ValueError(f"digits gray levels outside 0..{MAX_GRAY_LEVEL}: [{gray.min()}, {gray.max()}]")
    images = (gray / (MAX_GRAY_LEVEL / 2) - 1.0).astype(np.float32)[..., None]
    if split != "all":
        keep = heldout_mask(labels) == (split == "test")
        images, labels = images[keep], labels[keep]
    return ArraySource(np.ascontiguousarray(images), labels.astype(np.int32), 10, f"digits/{split}",
                       tuple(str(d) for d in range(10)))
