"""Dataset-specific quality metrics for CPU-scale experiments: a small classifier per dataset, trained
deterministically by dpmjax and cached; Frechet distance in its feature space (the FID recipe of Heusel et
al. 2017 with a domain network, standard practice for MNIST-like data) and its confident-label share.

    metric = domain_metric("digits")               # trains once (seconds), then loads from the cache
    report = metric.evaluate(samples, real_images)  # {"frechet": ..., "confident_share": ..., ...}

Frechet distance of two image sets: with (mu, S) the float64 mean and covariance (ddof = 1) of the classifier's
penultimate features f(x) [N, feature_dim],

    d^2 = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^{1/2})     (``fid.frechet_distance``, pytorch-fid's sqrtm);

confident share: the fraction of images whose softmax max_k p_k(x) exceeds ``CONFIDENCE`` = 0.9 (a sample the
classifier cannot name is not a recognisable digit / garment).

The cache (``$DPMJAX_CACHE`` or ``~/.cache/dpmjax``) stores flax msgpack bytes (arrays only, no code),
written atomically; its name carries the dataset, the classifier config and the seed.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from dpmjax.metrics.fid import frechet_distance, statistics_from_features
from dpmjax.nn.classifier import Classifier

CONFIGS = {
    "digits": dict(channels=(32, 64), feature_dim=128, epochs=30, batch_size=64, learning_rate=2e-3),
    "fashion_mnist": dict(channels=(32, 64, 128), feature_dim=128, epochs=3, batch_size=128, learning_rate=1e-3),
}
CONFIDENCE = 0.9


def cache_dir() -> str:
    return os.environ.get("DPMJAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "dpmjax"))


@dataclasses.dataclass
class DomainMetric:
    """A trained classifier and the feature statistics of the dataset's held-out split."""

    dataset: str
    module: Classifier
    params: dict
    test_accuracy: float

    def _apply(self, images, batch_size: int = 512):
        """(logits [N, classes], features [N, feature_dim]) in float32, batches padded to ``batch_size``.

        The params are an argument of one jitted program per module (``_jitted_apply``): evaluating several sets,
        or another classifier of the same architecture, does not recompile; a partial batch is padded.
        """
        fn = _jitted_apply(self.module)
        logits, feats = [], []
        for start in range(0, len(images), batch_size):
            chunk = np.asarray(images[start:start + batch_size], np.float32)
            size = chunk.shape[0]
            if size < batch_size:  # one batch shape: one compilation for every set size
                chunk = np.pad(chunk, [(0, batch_size - size)] + [(0, 0)] * (chunk.ndim - 1))
            lo, fe = fn(self.params, chunk)
            logits.append(np.asarray(lo)[:size])
            feats.append(np.asarray(fe)[:size])
        return np.concatenate(logits), np.concatenate(feats)

    def features(self, images) -> np.ndarray:
        return self._apply(_check_images(images))[1]

    def confident_share(self, images, threshold: float = CONFIDENCE) -> float:
        """Share of images the classifier labels with softmax confidence above ``threshold``."""
        logits, _ = self._apply(_check_images(images))
        return _confident_share(logits, threshold)

    def frechet(self, images_a, images_b) -> float:
        """Frechet distance between two image sets in the classifier's feature space."""
        fa, fb = self.features(images_a), self.features(images_b)
        return frechet_distance(*statistics_from_features(fa), *statistics_from_features(fb))

    def evaluate(self, samples, reference) -> dict:
        """Frechet distance of ``samples`` to ``reference`` (real held-out images), confident-label shares.

        Returns {"frechet", "confident_share" (of the samples), "confident_share_real" (of the reference),
        "label_histogram" (argmax labels of the samples, one count per class)}.
        """
        logits_s, feats_s = self._apply(_check_images(samples))
        logits_r, feats_r = self._apply(_check_images(reference))
        return {"frechet": frechet_distance(*statistics_from_features(feats_s), *statistics_from_features(feats_r)),
                "confident_share": _confident_share(logits_s), "confident_share_real": _confident_share(logits_r),
                "label_histogram": np.bincount(logits_s.argmax(-1), minlength=logits_s.shape[-1]).tolist()}


@functools.lru_cache(maxsize=8)
def _jitted_apply(module):
    return jax.jit(lambda params, x: module.apply(params, x, return_features=True))


def _confident_share(logits, threshold: float = CONFIDENCE) -> float:
    """Fraction of rows whose softmax max probability exceeds ``threshold`` (softmax in float64 on the host)."""
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    probs = np.exp(shifted) / np.exp(shifted).sum(axis=-1, keepdims=True)
    return float(np.mean(probs.max(axis=-1) > threshold))


def _check_images(images):
    images = np.asarray(images, np.float32)
    if images.ndim != 4:
        raise ValueError(f"images must have shape [N, H, W, C], got {images.shape}")
    if not np.all(np.isfinite(images)):
        raise ValueError("images contain NaN or inf")
    if images.size and (images.min() < -1.5 or images.max() > 1.5):
        raise ValueError(f"images must lie in [-1, 1] (dpmjax's data range), got [{images.min():.3g}, "
                         f"{images.max():.3g}]")
    return images


def _train(dataset: str, seed: int, config: dict):
    from dpmjax.data import get_dataset

    train = get_dataset(dataset, "train")
    images, labels = all_images(train)
    module = Classifier(channels=config["channels"], feature_dim=config["feature_dim"])
    params = module.init(jax.random.key(seed), jnp.zeros((1,) + images.shape[1:]))
    tx = optax.adam(config["learning_rate"])
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(p):
            logits = module.apply(p, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        with jax.numpy_dtype_promotion("standard"):  # optax's bias correction: float ** int32 step count
            updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    batch = config["batch_size"]
    for _ in range(config["epochs"]):
        order = rng.permutation(len(images))
        for start in range(0, len(order) - batch + 1, batch):
            idx = order[start:start + batch]
            params, opt_state, _ = step(params, opt_state, jnp.asarray(images[idx]), jnp.asarray(labels[idx]))
    return module, params


def all_images(source):
    """(images [N, H, W, C] float32, labels [N] int32): a whole ``dpmjax.data`` source."""
    batch = source.get_batch(np.arange(len(source)))
    return np.asarray(batch["image"], np.float32), np.asarray(batch["label"], np.int32)


def domain_metric(dataset: str = "digits", seed: int = 0, *, retrain: bool = False) -> DomainMetric:
    """The cached classifier metric for ``dataset`` ("digits" or "fashion_mnist"); trains it on first use."""
    if dataset not in CONFIGS:
        raise ValueError(f"dataset must be one of {tuple(CONFIGS)}, got {dataset!r}")
    config = CONFIGS[dataset]
    tag = hashlib.sha256(json.dumps([dataset, seed, config], sort_keys=True).encode()).hexdigest()[:12]
    path = os.path.join(cache_dir(), "classifiers", f"{dataset}-{tag}.msgpack")
    module = Classifier(channels=config["channels"], feature_dim=config["feature_dim"])
    from dpmjax.data import get_dataset
    test_images, test_labels = all_images(get_dataset(dataset, "test"))
    params = None
    if os.path.exists(path) and not retrain:
        template = module.init(jax.random.key(0), jnp.zeros((1,) + test_images.shape[1:]))
        try:
            with open(path, "rb") as f:
                params = serialization.from_bytes(template, f.read())
        except Exception:  # noqa: BLE001 - a broken cache entry is retrained, never trusted
            params = None
    if params is None:
        module, params = _train(dataset, seed, config)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=os.path.dirname(path), delete=False) as f:
            f.write(serialization.to_bytes(params))
        os.replace(f.name, path)
    metric = DomainMetric(dataset, module, params, test_accuracy=0.0)
    logits, _ = metric._apply(test_images)
    metric.test_accuracy = float(np.mean(logits.argmax(-1) == test_labels))
    return metric
