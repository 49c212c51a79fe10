"""Few-shot target domains: a style transform of a source dataset, K training shots and a held-out target set.

    source = get_dataset("style:digits:invert")                 # the digits in the "invert" domain, round-robin order
    target = few_shot_target("digits", "invert", shots=10)      # its first 10 (one per class), the rest held out
    write_image_folder(target.shots, "runs/targets/invert10")   # or any folder of images: "folder:DIR"

The adaptation methods (DomainStudio, LoRA, QST, DARE's finetunes) share this setting: a model trained on the
source domain adapts to ``config.data.shots`` images of the target domain (the first ``shots`` of
``config.data.name``) and is scored against the held-out target images (``dpmjax.metrics.few_shot``).
DomainStudio's settings (FFHQ -> babies / sunglasses / sketches, 10 shots) are style shifts of the source
domain, not new classes; the transforms here are such shifts at digit scale:

  invert: x -> -x (white digits on black become black on white: every pixel changes, like a sketch domain);
  mirror: left-right flip (a geometric shift: the same strokes, a new layout);
  dilate: 3x3 grey-level dilation (bold strokes: a texture / thickness shift).

``style:DATASET:TRANSFORM`` lists a split in round-robin class order (the first image of each class in file
order, then the second of each, ...), so its first K images are the K shots with every class present (10 shots
of digits = one of each digit) and no random numbers are involved.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from dpmjax.data.pipeline import ArraySource

__all__ = ["TRANSFORMS", "FewShotTarget", "style_transform", "round_robin_order", "load_style", "few_shot_target",
           "take_shots", "write_image_folder"]

TRANSFORMS = ("none", "invert", "mirror", "dilate")


def style_transform(images: np.ndarray, name: str) -> np.ndarray:
    """The target-domain version of ``images`` ([N, H, W, C] float32 in [-1, 1]); same shape and range."""
    if name not in TRANSFORMS:
        raise ValueError(f"unknown style transform {name!r}; choose one of {TRANSFORMS}")
    images = np.asarray(images, np.float32)
    if name == "invert":
        return -images
    if name == "mirror":
        return np.ascontiguousarray(images[:, :, ::-1])
    if name == "dilate":
        padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-1.0)
        height, width = images.shape[1:3]
        windows = [padded[:, i:i + height, j:j + width] for i in range(3) for j in range(3)]
        return np.max(np.stack(windows), axis=0).astype(np.float32)
    return images.copy()


def round_robin_order(labels: np.ndarray) -> np.ndarray:
    """A permutation of the examples: the first of each class (in label order), then the second of each, ..."""
    labels = np.asarray(labels)
    rank = np.zeros(len(labels), np.int64)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        rank[members] = np.arange(len(members))
    return np.lexsort((labels, rank))


def load_style(spec: str, split: str = "train", **kwargs) -> ArraySource:
    """The ``style:DATASET:TRANSFORM`` source: DATASET's ``split`` (``kwargs`` for its loader) transformed, in
    round-robin class order."""
    from dpmjax.data import get_dataset
    from dpmjax.metrics.domain import all_images

    dataset, _, transform = spec[len("style:"):].rpartition(":") if spec.startswith("style:") else ("", "", "")
    if not dataset:
        raise ValueError(f"expected style:DATASET:TRANSFORM (TRANSFORM one of {TRANSFORMS}), got {spec!r}")
    if transform not in TRANSFORMS:
        raise ValueError(f"{spec}: unknown style transform {transform!r}; choose one of {TRANSFORMS}")
    source = get_dataset(dataset, split, **kwargs)
    images, labels = all_images(source)
    order = round_robin_order(labels)
    return ArraySource(style_transform(images[order], transform), labels[order],
                       num_classes=getattr(source, "num_classes", None), name=spec,
                       class_names=getattr(source, "class_names", None))


@dataclasses.dataclass(frozen=True)
class FewShotTarget:
    """A target domain: ``shots`` [K, H, W, C] to adapt on, ``heldout`` [M, H, W, C] to score against (both in
    [-1, 1]), the source labels of each (``shot_labels``, ``heldout_labels``) and how it was made."""

    shots: np.ndarray
    shot_labels: np.ndarray
    heldout: np.ndarray
    heldout_labels: np.ndarray
    dataset: str
    transform: str


def few_shot_target(dataset: str = "digits", transform: str = "invert", shots: int = 10) -> FewShotTarget:
    """The first ``shots`` images of ``style:DATASET:TRANSFORM``'s train split (the images ``config.data.shots``
    trains on) and every other image of the dataset, train and test splits, as the held-out target set."""
    train = load_style(f"style:{dataset}:{transform}", "train")
    test = load_style(f"style:{dataset}:{transform}", "test")
    if not 1 <= shots < len(train):
        raise ValueError(f"shots must be in [1, {len(train) - 1}], got {shots}")
    return FewShotTarget(shots=train.images[:shots], shot_labels=train.labels[:shots],
                         heldout=np.concatenate([train.images[shots:], test.images]),
                         heldout_labels=np.concatenate([train.labels[shots:], test.labels]),
                         dataset=dataset, transform=transform)


def take_shots(source, shots: int):
    """The first ``shots`` examples of a ``dpmjax.data`` source (a folder's sorted files), in memory; ValueError
    naming the count when the source has fewer (``config.data.shots``: checked before anything compiles)."""
    if isinstance(shots, bool) or not isinstance(shots, (int, np.integer)) or shots < 1:
        raise ValueError(f"config.data.shots must be a positive integer, got {shots!r}")
    if len(source) < shots:
        raise ValueError(f"the target data {getattr(source, 'name', source)!r} has {len(source)} images, fewer than "
                         f"config.data.shots={shots}")
    batch = source.get_batch(np.arange(shots))
    return ArraySource(np.asarray(batch["image"], np.float32), np.asarray(batch["label"], np.int32),
                       num_classes=getattr(source, "num_classes", None),
                       name=f"{getattr(source, 'name', 'data')}[:{shots}]")


def write_image_folder(images: np.ndarray, root: str) -> list[str]:
    """Write [N, H, W, C] images in [-1, 1] as 8-bit PNGs ``root/000.png, ...`` (a ``folder:`` dataset); returns the
    paths. C = 1 gives grayscale, C = 3 RGB."""
    from PIL import Image  # pylint: disable=import-outside-toplevel

    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be [N, H, W, 1 or 3], got {images.shape}")
    os.makedirs(root, exist_ok=True)
    paths = []
    pixels = np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)
    for i, image in enumerate(pixels):
        path = os.path.join(root, f"{i:03d}.png")
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)
        paths.append(path)
    return paths
