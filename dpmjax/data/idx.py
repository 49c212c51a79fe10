"""MNIST-format idx files, e.g. Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package.

The idx format (LeCun's MNIST page): a 4-byte big-endian magic ``0x00 0x00 <type> <ndim>``, then ``ndim``
big-endian uint32 sizes, then the values in C order, big-endian. Type codes: 0x08 uint8, 0x09 int8,
0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64.

Files are parsed directly, gzipped or not (detected by the gzip magic, not by the name). Debian re-gzipped the
Fashion-MNIST files (no FNAME header, new mtime), so their checksums differ from the ones TFDS registers and
they cannot go through TFDS's own ``fashion_mnist`` builder; the content is the same.
"""
from __future__ import annotations

import gzip
import os
import struct
import zlib

import numpy as np

from dpmjax.data.pipeline import ArraySource, uint8_to_unit_range

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_INSTALL = "apt-get install dataset-fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
# MNIST naming: split -> file stem.
SPLIT_PREFIX = {"train": "train", "test": "t10k"}

_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_GZIP_MAGIC = b"\x1f\x8b"


def parse_idx(data: bytes, path: str = "<bytes>") -> np.ndarray:
    """Decode the bytes of one idx file (already decompressed) into an array of its native-endian dtype."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise ValueError(f"{path}: not an idx file (magic bytes {data[:4].hex() or 'missing'}; expected "
                         f"00 00 <type in {sorted(_IDX_TYPES)}> <ndim>)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated idx header ({len(data)} bytes, {ndim} dimensions need {header})")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_TYPES[data[2]])
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{path}: idx size mismatch: header says shape {shape} of {dtype.name} "
                         f"({expected} bytes) but the file has {len(data)} bytes (truncated or corrupt)")
    return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def read_idx(path: str) -> np.ndarray:
    """Read one idx file, gzipped or plain."""
    with open(path, "rb") as handle:
        data = handle.read()
    if data[:2] == _GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as error:
            raise ValueError(f"{path}: corrupt gzip stream ({error})") from error
    return parse_idx(data, path)


def find_idx_file(data_dir: str, stem: str, install_hint: str | None = None) -> str:
    """Path of ``stem.gz`` or ``stem`` under ``data_dir``; FileNotFoundError naming the path otherwise."""
    for candidate in (os.path.join(data_dir, stem + ".gz"), os.path.join(data_dir, stem)):
        if os.path.isfile(candidate):
            return candidate
    wanted = os.path.join(data_dir, stem + ".gz")
    hint = (f" Install it with `{install_hint}`, or pass data_dir= a folder holding the MNIST-format idx files."
            if install_hint else " Pass data_dir= a folder holding the MNIST-format idx files.")
    raise FileNotFoundError(f"idx file not found: {wanted} (nor {os.path.join(data_dir, stem)}).{hint}")


def load_idx_dataset(data_dir: str, split: str = "train", *, name: str = "idx", num_classes: int | None = None,
                     class_names: tuple[str, ...] | None = None, install_hint: str | None = None) -> ArraySource:
    """An MNIST-layout folder (``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``) as an ArraySource.

    Images [N, H, W] uint8 become [N, H, W, 1] float32 in [-1, 1] (x / 127.5 - 1); labels become int32.

    Args:
      data_dir: the folder.
      split: ``"train"`` or ``"test"`` (the ``t10k`` files).
      name: prefix for messages.
      num_classes: number of classes; ``None`` reads it as ``max(label) + 1``.
      class_names: optional names, index = label.
      install_hint: a command that installs the files, quoted in the missing-file error.
    """
    if split not in SPLIT_PREFIX:
        raise ValueError(f"{name} split must be one of {tuple(SPLIT_PREFIX)}, got {split!r}")
    prefix = SPLIT_PREFIX[split]
    image_path = find_idx_file(data_dir, f"{prefix}-images-idx3-ubyte", install_hint)
    label_path = find_idx_file(data_dir, f"{prefix}-labels-idx1-ubyte", install_hint)
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{image_path}: expected [N, H, W] uint8 images, got {images.shape} {images.dtype}")
    if labels.shape != images.shape[:1]:
        raise ValueError(f"{label_path}: {labels.shape[0] if labels.ndim else 'no'} labels for "
                         f"{images.shape[0]} images in {image_path}")
    labels = labels.astype(np.int32)
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if len(labels) else 0
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{label_path}: labels outside 0..{num_classes - 1}")
    return ArraySource(uint8_to_unit_range(images)[..., None], labels, num_classes, f"{name}/{split}", class_names)


def load_fashion_mnist(split: str = "train", *, data_dir: str = FASHION_MNIST_DIR) -> ArraySource:
    """Fashion-MNIST (60000 train / 10000 test, 28x28 gray, 10 classes of 6000 / 1000) from idx files.

    The default ``data_dir`` is where Debian's ``dataset-fashion-mnist`` package puts them.
    """
    return load_idx_dataset(data_dir, split, name="fashion_mnist", num_classes=10,
                            class_names=FASHION_MNIST_CLASSES, install_hint=FASHION_MNIST_INSTALL)
