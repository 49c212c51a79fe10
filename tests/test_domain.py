"""The domain metric behind the README's quality table (``dpmjax.metrics.domain``): Frechet distance in a
classifier's feature space and the confident-label share.

* A hand-computed case: a fixed one-feature "classifier" (feature = image mean, two logits +-10 f), constant
  images, and the 1-d Frechet distance (mu_a - mu_b)^2 + (sd_a - sd_b)^2 worked out by hand.
* The real digits classifier (trained deterministically and cached, ~25 s the first time): held-out accuracy,
  real vs real small, real vs the same images with their pixels shuffled large, and ``evaluate`` against an
  independent recomputation (features by ``module.apply`` in one batch, ``np.cov``, pytorch-fid's sqrtm formula).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from dpmjax.data import get_dataset
from dpmjax.metrics import domain


class MeanFeature(nn.Module):
    """feature f = mean pixel value; logits (10 f, -10 f): p_max = sigmoid(20 |f|) > 0.9 iff |f| > ln(9) / 20."""

    @nn.compact
    def __call__(self, x, return_features=False):
        f = jnp.mean(x, axis=(1, 2, 3))[:, None]
        logits = jnp.concatenate([10.0 * f, -10.0 * f], axis=-1)
        return (logits, f) if return_features else logits


def _constant_images(values):
    return np.broadcast_to(np.asarray(values, np.float32)[:, None, None, None], (len(values), 8, 8, 1)).copy()


def test_hand_computed_frechet_and_confident_share():
    metric = domain.DomainMetric("digits", MeanFeature(), params={}, test_accuracy=0.0)
    a = _constant_images([0.1, 0.2, 0.3, 0.4])  # mean 0.25, variance (ddof 1) 0.05 / 3
    b = _constant_images([-0.5, 0.5])           # mean 0, variance 0.5
    expected = (0.25 - 0.0) ** 2 + (np.sqrt(0.05 / 3) - np.sqrt(0.5)) ** 2
    report = metric.evaluate(a, b)
    # float32 features of exactly representable constants, float64 statistics: ~1e-7 relative.
    np.testing.assert_allclose(report["frechet"], expected, rtol=1e-6)
    np.testing.assert_allclose(metric.frechet(a, b), expected, rtol=1e-6)
    # |f| > ln 9 / 20 = 0.1099: 0.1 is not confident, 0.2 / 0.3 / 0.4 are; both of b are.
    assert report["confident_share"] == 0.75 and report["confident_share_real"] == 1.0
    assert metric.confident_share(a) == 0.75 and metric.confident_share(a, threshold=0.999) == 0.25
    assert report["label_histogram"] == [4, 0]


def test_batches_are_padded_and_sliced_exactly():
    """More images than one batch (512), and a set smaller than it: the same features as image by image."""
    metric = domain.DomainMetric("digits", MeanFeature(), params={}, test_accuracy=0.0)
    values = np.random.default_rng(0).uniform(-1, 1, 1100).astype(np.float32)
    feats = metric.features(_constant_images(values))
    assert feats.shape == (1100, 1)
    np.testing.assert_allclose(feats[:, 0], values, rtol=1e-6)
    np.testing.assert_allclose(metric.features(_constant_images(values[:7]))[:, 0], values[:7], rtol=1e-6)


def test_bad_images_are_refused():
    metric = domain.DomainMetric("digits", MeanFeature(), params={}, test_accuracy=0.0)
    with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
        metric.features(np.zeros((4, 8, 8), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        metric.features(_constant_images([0.0, np.nan]))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        metric.features(_constant_images([0.0, 255.0]))
    with pytest.raises(ValueError, match="dataset must be one of"):
        domain.domain_metric("cifar10")


@pytest.fixture(scope="module")
def digits():
    """(metric, train images, held-out images); the classifier is trained under the suite's strict promotion."""
    metric = domain.domain_metric("digits")
    train, _ = domain.all_images(get_dataset("digits", "train"))
    test, _ = domain.all_images(get_dataset("digits", "test"))
    return metric, train, test


def _shuffled_pixels(images, seed=0):
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(im.reshape(-1)).reshape(im.shape) for im in images])


def test_real_digits_small_shuffled_pixels_large(digits):
    metric, train, test = digits
    assert metric.test_accuracy > 0.95  # 98.6% measured
    real = metric.evaluate(train[:1000], test)
    noise = metric.evaluate(_shuffled_pixels(test), test)  # same pixel values, no digit structure
    # measured: real 3.6 (1000 vs 355; small-sample bias included), shuffled ~250; real confident 0.99, shuffled 0.6
    assert real["frechet"] < 8.0 and noise["frechet"] > 20 * real["frechet"]
    assert real["confident_share"] > 0.95 and real["confident_share_real"] > 0.95
    assert noise["confident_share"] < 0.8
    assert sum(real["label_histogram"]) == 1000 and min(real["label_histogram"]) > 60  # every class present


def test_evaluate_matches_an_independent_recomputation(digits):
    metric, train, test = digits
    samples = train[:400]
    logits_s, feats_s = jax.jit(lambda x: metric.module.apply(metric.params, x, return_features=True))(samples)
    logits_r, feats_r = jax.jit(lambda x: metric.module.apply(metric.params, x, return_features=True))(test)
    f_s, f_r = np.asarray(feats_s, np.float64), np.asarray(feats_r, np.float64)
    mu_s, mu_r, s_s, s_r = f_s.mean(0), f_r.mean(0), np.cov(f_s, rowvar=False), np.cov(f_r, rowvar=False)
    covmean = scipy.linalg.sqrtm(s_s @ s_r).real  # pytorch-fid's formula
    expected = np.sum((mu_s - mu_r) ** 2) + np.trace(s_s) + np.trace(s_r) - 2 * np.trace(covmean)
    probs = jax.nn.softmax(np.asarray(logits_s, np.float64), axis=-1)
    report = metric.evaluate(samples, test)
    # The same float32 features (batched 512 vs whole set: a few ulps), float64 statistics and sqrtm of 128-d
    # covariances with condition ~1e4: 1e-5 relative.
    np.testing.assert_allclose(report["frechet"], expected, rtol=1e-5)
    assert report["confident_share"] == pytest.approx(float(np.mean(np.max(probs, -1) > 0.9)), abs=1 / 400)
    assert report["label_histogram"] == np.bincount(np.argmax(logits_s, -1), minlength=10).tolist()
    assert logits_r.shape == (len(test), 10)


def test_cached_classifier_is_reused_bit_for_bit(digits):
    metric, _, _ = digits
    again = domain.domain_metric("digits")  # loads the cache written (or found) by the fixture
    jax.tree.map(np.testing.assert_array_equal, again.params, metric.params)
    assert again.test_accuracy == metric.test_accuracy
