"""Frozen feature networks for losses and metrics in a learned feature space (MMD finetuning, FD/KID).

    net = feature_network("classifier:digits:1", image_shape=(8, 8, 1))   # a digits classifier, seed 1
    feats = net.apply(net.params, images)                                   # [B, dim] float32, differentiable

Specs:
  ``classifier:DATASET[:SEED]``  the penultimate features of ``dpmjax.metrics.domain``'s classifier for DATASET
                                 ("digits", "fashion_mnist"), trained with SEED (default 0: the classifier the
                                 quickstart / eval metric uses; another seed is another feature space);
  ``inception``                  the 2048-d pool3 features of the FID Inception-v3 port with the real weights
                                 (bilinear resize to 299, as pytorch-fid), for CIFAR-sized RGB or gray images.

Every network takes dpmjax images, in [-1, 1] (``input_range``); a method checks that its data's range is the
network's before anything compiles. The params are plain arrays: pass them to jitted functions as arguments.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax.numpy as jnp

__all__ = ["FeatureNetwork", "feature_network", "FEATURE_KINDS", "DATA_RANGE", "check_input_range"]

FEATURE_KINDS = ("classifier", "inception")
DATA_RANGE = (-1.0, 1.0)  # every dpmjax dataset's pixel range


@dataclasses.dataclass(frozen=True)
class FeatureNetwork:
    """``apply(params, images [B, H, W, C]) -> [B, dim]`` float32, pure and differentiable in the images."""

    spec: str
    apply: Callable
    params: Any
    dim: int
    input_range: tuple = DATA_RANGE
    image_shape: tuple | None = None  # the only shape it accepts (None: any, it resizes)


def check_input_range(net: FeatureNetwork, data_range=DATA_RANGE) -> None:
    """ValueError when the network expects another pixel range than the data's (a network fed [-1, 1] images
    while trained on [0, 1] ones computes meaningless features, silently)."""
    if tuple(float(v) for v in net.input_range) != tuple(float(v) for v in data_range):
        raise ValueError(f"feature network {net.spec!r} expects images in {tuple(net.input_range)}, but the data are "
                         f"in {tuple(data_range)}: rescale its inputs or pick a network trained on this range")


def _classifier(dataset: str, seed: int, image_shape) -> FeatureNetwork:
    from dpmjax.metrics.domain import CONFIGS, domain_metric

    if dataset not in CONFIGS:
        raise ValueError(f"feature network classifier:{dataset}: no classifier for {dataset!r}; known: {tuple(CONFIGS)}")
    metric = domain_metric(dataset, seed)
    module = metric.module

    def apply(params, images):
        return module.apply(params, images, return_features=True)[1]

    shape = _classifier_shape(dataset)
    if image_shape is not None and tuple(image_shape) != shape:
        raise ValueError(f"feature network classifier:{dataset} takes {shape} images, the model makes "
                         f"{tuple(image_shape)}")
    return FeatureNetwork(f"classifier:{dataset}:{seed}", apply, metric.params, int(module.feature_dim),
                          image_shape=shape)


def _classifier_shape(dataset: str) -> tuple:
    return {"digits": (8, 8, 1), "fashion_mnist": (28, 28, 1)}[dataset]


def _inception(image_shape) -> FeatureNetwork:
    from dpmjax.metrics.inception import FEATURE_DIM, FIDInceptionV3, preprocess
    from dpmjax.metrics.weights import load_inception_params

    if image_shape is not None and tuple(image_shape)[-1] not in (1, 3):
        raise ValueError(f"feature network inception takes gray or RGB images, the model makes {tuple(image_shape)}")
    module = FIDInceptionV3()

    def apply(params, images):
        x = preprocess((jnp.asarray(images, jnp.float32) + 1.0) / 2.0, "bilinear")  # [-1, 1] -> [0, 1] -> 299
        return module.apply(params, x).reshape(x.shape[0], -1)

    return FeatureNetwork("inception", apply, load_inception_params(), int(FEATURE_DIM))


def parse_spec(spec: str) -> tuple:
    """``"classifier:digits:1"`` -> ("classifier", "digits", 1); ``"inception"`` -> ("inception", None, None).
    ValueError naming the accepted forms."""
    parts = str(spec).split(":")
    if parts[0] == "inception" and len(parts) == 1:
        return "inception", None, None
    if parts[0] == "classifier" and len(parts) in (2, 3) and parts[1]:
        try:
            seed = int(parts[2]) if len(parts) == 3 else 0
        except ValueError:
            seed = None
        if seed is not None and seed >= 0:
            return "classifier", parts[1], seed
    raise ValueError(f"feature network {spec!r}: expected 'classifier:DATASET[:SEED]' or 'inception'")


def feature_network(spec: str, image_shape=None) -> FeatureNetwork:
    """The feature network of ``spec`` (module docstring) for images of ``image_shape`` [H, W, C] (checked)."""
    kind, dataset, seed = parse_spec(spec)
    if kind == "inception":
        return _inception(image_shape)
    return _classifier(dataset, seed, image_shape)
