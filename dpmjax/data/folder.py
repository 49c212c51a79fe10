"""A folder of PNG / JPEG images as a lazy source (read with Pillow, which matplotlib already requires).

Layout, like torchvision's ``ImageFolder``: ``root/<class>/**/*.png`` gives one class per sub-folder that holds
images (sorted names -> labels 0, 1, ...; images directly in ``root`` are then ignored); images directly in
``root`` with no such sub-folders form one unlabelled set (label 0, ``num_classes=None``). Files are read when
a batch asks for them, or all at once with ``in_memory=True``.

Every image must have the same size unless ``image_size`` is given; then each is centre-cropped to a square
and resized to ``image_size`` x ``image_size`` with Pillow's bicubic filter (which antialiases downsampling).
"""
from __future__ import annotations

import os

import numpy as np

from dpmjax.data.pipeline import uint8_to_unit_range

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop a [H, W, C] uint8 image to a square, then resize it to [size, size, C] (bicubic)."""
    from PIL import Image  # pylint: disable=import-outside-toplevel

    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = image[top:top + side, left:left + side]
    if side == size:
        return np.ascontiguousarray(square)
    channels = square.shape[2]
    pil = Image.fromarray(square[..., 0] if channels == 1 else square)
    resized = np.asarray(pil.resize((size, size), Image.Resampling.BICUBIC))
    return resized.reshape(size, size, channels)


def read_image(path: str, channels: int) -> np.ndarray:
    """[H, W, channels] uint8 (channels 1: grayscale "L", 3: "RGB"; alpha is dropped)."""
    from PIL import Image  # pylint: disable=import-outside-toplevel

    try:
        with Image.open(path) as pil:
            array = np.asarray(pil.convert("L" if channels == 1 else "RGB"))
    except OSError as error:  # PIL.UnidentifiedImageError is an OSError
        raise ValueError(f"cannot read image {path}: {error}") from error
    return array.reshape(*array.shape[:2], channels)


def list_image_folder(root: str) -> tuple[list[str], np.ndarray, tuple[str, ...] | None]:
    """(file paths sorted, labels [N] int32, class names or None) of a folder laid out as described above."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root}")

    def images_in(folder):
        return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                      if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, f)))

    def images_below(folder):
        return sorted(os.path.join(dirpath, f) for dirpath, _, files in os.walk(folder)
                      for f in files if f.lower().endswith(IMAGE_EXTENSIONS))

    found_per_class = {d: images_below(os.path.join(root, d)) for d in sorted(os.listdir(root))
                       if os.path.isdir(os.path.join(root, d))}
    class_dirs = [d for d, found in found_per_class.items() if found]
    if class_dirs:
        paths, labels = [], []
        for label, class_dir in enumerate(class_dirs):
            found = found_per_class[class_dir]
            paths += found
            labels += [label] * len(found)
        class_names = tuple(class_dirs)
    else:
        paths = images_in(root)
        labels, class_names = [0] * len(paths), None
    if not paths:
        raise FileNotFoundError(f"no {'/'.join(IMAGE_EXTENSIONS)} images under {root}")
    return paths, np.asarray(labels, np.int32), class_names


class ImageFolderSource:
    """Lazy source over an image folder: NHWC float32 in [-1, 1], labels int32 (see module docstring)."""

    def __init__(self, root: str, *, image_size: int | None = None, channels: int = 3, in_memory: bool = False):
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if image_size is not None and image_size < 1:
            raise ValueError(f"image_size must be None or >= 1, got {image_size}")
        self.root, self.image_size, self.channels = root, image_size, channels
        self.paths, self.labels, self.class_names = list_image_folder(root)
        self.num_classes = None if self.class_names is None else len(self.class_names)
        self.name = f"folder:{root}"
        first = self._load(0, check=False)
        self.image_shape = tuple(int(d) for d in first.shape)
        self._cache = None
        if in_memory:
            self._cache = np.stack([self._load(i) for i in range(len(self.paths))])

    def __len__(self) -> int:
        return len(self.paths)

    def _load(self, index: int, check: bool = True) -> np.ndarray:
        path = self.paths[index]
        image = read_image(path, self.channels)
        if self.image_size is not None:
            image = center_crop_resize(image, self.image_size)
        elif check and image.shape != self.image_shape:
            raise ValueError(f"{path}: size {image.shape[:2]} differs from {self.image_shape[:2]} of "
                             f"{self.paths[0]}; pass image_size= to resize every image")
        return uint8_to_unit_range(image)

    def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        indices = np.asarray(indices, np.int64)
        if self._cache is not None:
            images = self._cache[indices]
        else:
            images = np.stack([self._load(int(i)) for i in indices]) if len(indices) else \
                np.zeros((0, *self.image_shape), np.float32)
        return {"image": images, "label": self.labels[indices]}
