"""Any TFDS image dataset by name, without TensorFlow where possible.

Two backends (tensorflow_datasets 4.9):

* ``"data_source"``: ``tfds.data_source(name, split=...)``, random access to data prepared in the
  ``array_record`` format, wrapped in ``grain.MapDataset`` for decoding. Needs no TensorFlow. Examples are
  read lazily when a batch asks for them.
* ``"load"``: ``tfds.load(...)`` through TensorFlow (the ``tf`` extra), for data prepared as tfrecord. The
  split is read into memory once (fine for MNIST / CIFAR-size sets).

``"auto"`` tries ``data_source`` and falls back to ``load`` when TensorFlow is importable. Everything is
imported lazily: importing dpmjax never imports tensorflow_datasets or tensorflow.

Tests use ``tfds.testing.mock_data``, which serves random examples of the right shapes to ``data_source``.
Note: TFDS may download and prepare the data when it is missing (``download=True``, TFDS's default), which
needs network; pass a prepared ``data_dir`` to stay offline.
"""
from __future__ import annotations

import importlib.util

import numpy as np

from dpmjax.data.folder import center_crop_resize
from dpmjax.data.pipeline import ArraySource, uint8_to_unit_range

BACKENDS = ("auto", "data_source", "load")


def tensorflow_available() -> bool:
    """Whether TensorFlow can be imported (without importing it)."""
    return importlib.util.find_spec("tensorflow") is not None


def _image_to_unit_range(image: np.ndarray, image_size: int | None) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.dtype != np.uint8:
        raise ValueError(f"expected uint8 images from TFDS, got {image.dtype}")
    if image_size is not None:
        image = center_crop_resize(image, image_size)
    return uint8_to_unit_range(image)


def _features_summary(features, image_key, label_key, image_size, name):
    """(image_shape, num_classes, class_names) from a TFDS FeaturesDict."""
    if image_key not in features:
        raise ValueError(f"tfds:{name} has no feature {image_key!r}; features: {sorted(features.keys())} "
                         "(pass image_key=)")
    height, width, channels = (tuple(features[image_key].shape) + (1,))[:3]
    if image_size is not None:
        height = width = image_size
    elif height is None or width is None:
        raise ValueError(f"tfds:{name} images have variable size {features[image_key].shape}; pass image_size=")
    num_classes = class_names = None
    if label_key is not None:
        if label_key not in features:
            raise ValueError(f"tfds:{name} has no feature {label_key!r}; features: {sorted(features.keys())} "
                             "(pass label_key=, or label_key=None for unlabelled data)")
        num_classes = getattr(features[label_key], "num_classes", None)
        names = getattr(features[label_key], "names", None)
        class_names = tuple(names) if names else None
    return (int(height), int(width), int(channels)), num_classes, class_names


class TFDSDataSource:
    """Lazy source over ``tfds.data_source`` + ``grain.MapDataset`` (NHWC float32 in [-1, 1], int32 labels)."""

    def __init__(self, name: str, split: str = "train", *, data_dir: str | None = None, download: bool = True,
                 image_key: str = "image", label_key: str | None = "label", image_size: int | None = None):
        import grain  # pylint: disable=import-outside-toplevel
        import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

        self.name, self.split = f"tfds:{name}/{split}", split
        self._records = tfds.data_source(name, split=split, data_dir=data_dir, download=download)
        self.image_shape, self.num_classes, self.class_names = _features_summary(
            self._records.dataset_info.features, image_key, label_key, image_size, name)

        def decode(example):
            label = 0 if label_key is None else example[label_key]
            return _image_to_unit_range(example[image_key], image_size), np.int32(label)

        self._dataset = grain.MapDataset.source(self._records).map(decode)

    def __len__(self) -> int:
        return len(self._dataset)

    def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        # One index at a time: the mock data source's batched __getitems__ is broken in tfds 4.9.10.
        examples = [self._dataset[int(i)] for i in np.asarray(indices)]
        if not examples:
            return {"image": np.zeros((0, *self.image_shape), np.float32), "label": np.zeros((0,), np.int32)}
        return {"image": np.stack([e[0] for e in examples]),
                "label": np.asarray([e[1] for e in examples], np.int32)}


def load_with_tensorflow(name: str, split: str = "train", *, data_dir: str | None = None, download: bool = True,
                         image_key: str = "image", label_key: str | None = "label",
                         image_size: int | None = None) -> ArraySource:
    """Read a TFDS split into memory through ``tfds.load`` (needs TensorFlow)."""
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    dataset, info = tfds.load(name, split=split, data_dir=data_dir, download=download, with_info=True)
    image_shape, num_classes, class_names = _features_summary(info.features, image_key, label_key, image_size,
                                                              name)
    images, labels = [], []
    for example in tfds.as_numpy(dataset):
        images.append(_image_to_unit_range(example[image_key], image_size))
        labels.append(0 if label_key is None else example[label_key])
    stacked = np.stack(images) if images else np.zeros((0, *image_shape), np.float32)
    return ArraySource(stacked, np.asarray(labels, np.int32), num_classes, f"tfds:{name}/{split}", class_names)


def load_tfds(name: str, split: str = "train", *, backend: str = "auto", **kwargs):
    """A TFDS dataset as a dpmjax source.

    Args:
      name: TFDS name, optionally with version/config (``"cifar10"``, ``"mnist:3.0.1"``).
      split: TFDS split string (``"train"``, ``"test[:10%]"``, ...).
      backend: ``"auto"``, ``"data_source"`` (TF-free, array_record) or ``"load"`` (TensorFlow).
      **kwargs: data_dir, download, image_key, label_key, image_size.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "data_source":
        return TFDSDataSource(name, split, **kwargs)
    if backend == "load":
        if not tensorflow_available():
            raise ModuleNotFoundError("backend='load' reads TFDS through TensorFlow: `pip install dpmjax[tf]`")
        return load_with_tensorflow(name, split, **kwargs)
    try:
        return TFDSDataSource(name, split, **kwargs)
    except Exception as error:  # pylint: disable=broad-except  (TFDS raises KeyError, FileNotFoundError, ...)
        if tensorflow_available():
            return load_with_tensorflow(name, split, **kwargs)
        raise RuntimeError(
            f"tfds:{name} split {split!r} (data_dir={kwargs.get('data_dir')}) is not readable without TensorFlow: "
            f"{type(error).__name__}: {error}. Prepare it in the array_record format (e.g. `tfds build {name} "
            "--file_format=array_record`, which needs network) or install the tf extra (`pip install dpmjax[tf]`) "
            "to read tfrecord data with tfds.load.") from error
