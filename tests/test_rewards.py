"""Rewards for reward finetuning (dpmjax/metrics/rewards.py): host rewards through pure_callback, JPEG sizes,
a classifier's log-probability, sums, and the probe-batch validation."""
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dpmjax.metrics import rewards
from dpmjax.metrics.domain import DomainMetric
from dpmjax.nn.classifier import Classifier


def images(seed=0, n=4, shape=(16, 16, 1)):
    rng = np.random.default_rng(seed)
    flat = np.zeros((1,) + shape, np.float32)
    return np.concatenate([flat, rng.uniform(-1, 1, (n - 1,) + shape).astype(np.float32)])


def test_jpeg_rewards_are_pil_file_sizes_inside_jit():
    x = images()
    sizes = []
    for image in rewards.to_uint8(x):
        buffer = io.BytesIO()
        Image.fromarray(image[..., 0]).save(buffer, format="JPEG", quality=95)
        sizes.append(buffer.tell() / 1000.0)
    compress, incompress = rewards.jpeg_compressibility(), rewards.jpeg_incompressibility()
    labels = jnp.zeros((4,), jnp.int32)
    jitted = jax.jit(compress.fn)(None, jnp.asarray(x), labels)
    np.testing.assert_allclose(np.asarray(jitted), -np.asarray(sizes), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(incompress(jnp.asarray(x), labels)), sizes, rtol=1e-6)
    assert float(jitted[0]) > float(jnp.max(jitted[1:]))  # a flat image compresses better than noise
    assert not compress.differentiable


def tiny_metric(seed=0):
    module = Classifier(channels=(8,), feature_dim=16, num_classes=10)
    params = module.init(jax.random.key(seed), jnp.zeros((1, 8, 8, 1)))
    return DomainMetric("digits", module, params, test_accuracy=0.0)


def test_classifier_reward_is_the_log_softmax_of_the_target_or_own_label():
    metric = tiny_metric()
    x = jnp.asarray(images(1, 4, (8, 8, 1)))
    labels = jnp.asarray([3, 1, 4, 1])
    log_p = np.asarray(jax.nn.log_softmax(metric.module.apply(metric.params, x)))
    own, seven = rewards.classifier_reward(metric), rewards.classifier_reward(metric, 7, kind="prob")
    np.testing.assert_allclose(np.asarray(jax.jit(own.fn)(own.params, x, labels)), log_p[np.arange(4), labels],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(seven(x, labels)), np.exp(log_p[:, 7]), rtol=1e-5)
    grad = jax.grad(lambda im: jnp.sum(own.fn(own.params, im, labels)))(x)
    assert own.differentiable and np.all(np.isfinite(grad)) and float(jnp.abs(grad).sum()) > 0
    with pytest.raises(ValueError, match="target"):
        rewards.classifier_reward(metric, 10)


def test_the_next_class_reward_scores_each_sample_against_the_class_after_its_own():
    """shift=1 ("classifier:DATASET:next"): p((y + 1) mod 10 | x), 9 wrapping to 0; refused for an unconditional
    model, whose samples have no class."""
    metric = tiny_metric()
    x = jnp.asarray(images(3, 4, (8, 8, 1)))
    labels = jnp.asarray([3, 9, 0, 9])
    p = np.asarray(jax.nn.softmax(metric.module.apply(metric.params, x)))
    following = rewards.classifier_reward(metric, kind="prob", shift=1)
    assert following.name == "classifier_prob:digits:next"
    np.testing.assert_allclose(np.asarray(following(x, labels)), p[np.arange(4), [4, 0, 1, 0]], rtol=1e-5)
    rewards.check_conditioning(following, "classifier:digits:next:prob", 10)
    for reward in (following, rewards.classifier_reward(metric)):
        with pytest.raises(ValueError, match="unconditional"):
            rewards.check_conditioning(reward, "spec", None)
    rewards.check_conditioning(rewards.classifier_reward(metric, 3), "classifier:digits:3", None)
    with pytest.raises(ValueError, match="shift"):
        rewards.classifier_reward(metric, 3, shift=1)


def test_brightness_is_the_mean_intensity_and_parses_from_a_spec():
    """(x + 1) / 2 averaged per image: 0 for black, 1 for white; a gradient of 1 / (2 pixels) everywhere; "brightness"
    in a spec, alone or in a weighted sum."""
    x = jnp.stack([jnp.full((8, 8, 1), -1.0), jnp.full((8, 8, 1), 1.0), jnp.asarray(images(4, 2, (8, 8, 1)))[1]])
    reward = rewards.reward_from_spec("brightness")
    values = np.asarray(jax.jit(reward.fn)(reward.params, x, jnp.zeros((3,), jnp.int32)))
    np.testing.assert_allclose(values, [0.0, 1.0, float(np.mean((np.asarray(x[2]) + 1) / 2))], rtol=1e-6, atol=1e-7)
    grad = jax.grad(lambda im: jnp.sum(reward(im, None)))(x)
    assert reward.differentiable and np.allclose(np.asarray(grad), 1 / 128)  # d/dx of mean((x + 1) / 2)
    total = rewards.reward_from_spec("0.5*brightness + 2*brightness")
    np.testing.assert_allclose(np.asarray(total(x, jnp.zeros((3,), jnp.int32))), 2.5 * values, rtol=1e-6)
    rewards.validate_reward(reward, (8, 8, 1))


def test_sum_of_rewards_weights_each_term():
    metric = tiny_metric()
    x = jnp.asarray(images(2, 3, (8, 8, 1)))
    labels = jnp.asarray([0, 5, 9])
    a, b = rewards.classifier_reward(metric), rewards.jpeg_incompressibility()
    total = rewards.sum_rewards([(a, 2.0), (b, -0.5)])
    expected = 2.0 * np.asarray(a(x, labels)) - 0.5 * np.asarray(b(x, labels))
    np.testing.assert_allclose(np.asarray(jax.jit(total.fn)(total.params, x, labels)), expected, rtol=1e-5)
    assert not total.differentiable and rewards.sum_rewards([(a, 1.0)]).differentiable
    with pytest.raises(ValueError, match="pairs"):
        rewards.sum_rewards([(a, float("nan"))])


@pytest.mark.parametrize("fn, message", [
    (lambda x, y: np.zeros((len(x), 2)), r"one number per sample, shape \(3,\)"),
    (lambda x, y: np.zeros(()), "one number per sample"),
    (lambda x, y: np.where(np.arange(len(x)) == 1, np.nan, 0.0), r"NaN or inf for samples \[1\]"),
    (lambda x, y: np.array(["a"] * len(x)), "real numbers"),
    (lambda x, y: 1 / 0, "ZeroDivisionError"),
])
def test_a_bad_reward_is_named_on_the_probe_batch(fn, message):
    with pytest.raises(rewards.RewardError, match=message) as info:
        rewards.validate_reward(rewards.host_reward("mine", fn), (8, 8, 1), 10)
    assert "mine" in str(info.value)


def test_a_good_reward_passes_validation():
    rewards.validate_reward(rewards.jpeg_compressibility(), (8, 8, 1), 10)
    rewards.validate_reward(rewards.classifier_reward(tiny_metric()), (8, 8, 1), 10)
    with pytest.raises(rewards.RewardError, match="Reward"):
        rewards.validate_reward(lambda x, y: x, (8, 8, 1))
