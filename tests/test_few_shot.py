"""The shared few-shot adaptation setting (dpmjax/data/few_shot.py, dpmjax/metrics/few_shot.py): style domains,
shots, the data.shots contract and the adaptation scores on cases with known answers."""
import numpy as np
import pytest

from dpmjax.data import get_dataset
from dpmjax.data.few_shot import few_shot_target, round_robin_order, style_transform, take_shots, write_image_folder
from dpmjax.metrics import SingularCovarianceWarning
from dpmjax.metrics.few_shot import adaptation_scores, intra_cluster_diversity


def test_style_transforms_match_their_definitions():
    from scipy.ndimage import grey_dilation

    images = np.random.default_rng(0).uniform(-1, 1, (3, 8, 8, 1)).astype(np.float32)
    np.testing.assert_array_equal(style_transform(images, "invert"), -images)
    np.testing.assert_array_equal(style_transform(images, "mirror"), images[:, :, ::-1])
    oracle = grey_dilation(images, size=(1, 3, 3, 1), mode="constant", cval=-1.0)
    np.testing.assert_array_equal(style_transform(images, "dilate"), oracle)
    with pytest.raises(ValueError, match="unknown style transform"):
        style_transform(images, "sepia")


def test_the_first_shots_of_a_style_dataset_hold_every_class_and_the_rest_is_held_out():
    labels = np.array([2, 0, 0, 1, 2, 1, 0])
    assert list(labels[round_robin_order(labels)]) == [0, 1, 2, 0, 1, 2, 0]
    target = few_shot_target("digits", "invert", shots=10)
    assert sorted(target.shot_labels) == list(range(10))
    digits = get_dataset("digits", "all")
    assert len(target.shots) + len(target.heldout) == len(digits)
    source = get_dataset("style:digits:invert")
    np.testing.assert_array_equal(take_shots(source, 10).images, target.shots)
    np.testing.assert_array_equal(target.heldout[:len(source) - 10], source.images[10:])
    with pytest.raises(ValueError, match="style:DATASET:TRANSFORM"):
        get_dataset("style:digits")


def test_a_target_folder_round_trips_and_fewer_images_than_shots_is_refused(tmp_path):
    target = few_shot_target("digits", "mirror", shots=10)
    write_image_folder(target.shots[:3], str(tmp_path / "three"))
    source = get_dataset(f"folder:{tmp_path / 'three'}", channels=1)
    np.testing.assert_allclose(take_shots(source, 3).images, target.shots[:3], atol=1 / 127.5)
    with pytest.raises(ValueError, match="has 3 images, fewer than config.data.shots=10"):
        take_shots(source, 10)


def test_adaptation_scores_tell_copies_from_the_domain():
    target = few_shot_target("digits", "invert", shots=10)
    features = lambda x: np.asarray(x).reshape(len(x), -1)  # noqa: E731 - pixel space: a known answer
    rng = np.random.default_rng(0)
    copies = target.shots[rng.integers(0, 10, 300)]
    fresh = target.heldout[rng.choice(len(target.heldout), 300, replace=False)]
    with pytest.warns(SingularCovarianceWarning):  # 10 distinct images in 64 dimensions: expected, and said so
        copied = adaptation_scores(copies, target.shots, target.heldout, features=features)
    domain = adaptation_scores(fresh, target.shots, target.heldout, features=features)
    assert copied["nn_shot"] == 0.0 and copied["copy_rate"] == 1.0 and copied["intra_diversity"] == 0.0
    assert domain["copy_rate"] < 0.05 and domain["nn_shot"] == pytest.approx(domain["nn_shot_heldout"], rel=0.1)
    assert domain["intra_diversity"] > 1.0 and domain["fd"] < copied["fd"]


def test_intra_cluster_diversity_is_the_mean_pairwise_distance_within_each_shots_cluster():
    shots = np.array([[0.0, 0.0], [10.0, 0.0]])
    samples = np.array([[0.0, 1.0], [0.0, -1.0], [10.0, 3.0], [10.0, 0.0], [10.0, -3.0], [100.0, 100.0]])
    # cluster 0: {(0,1), (0,-1)}: distance 2; cluster 1: (10,3), (10,0), (10,-3), and (100,100) is nearer shot 1
    far = np.hypot(90.0, [97.0, 100.0, 103.0])
    cluster1 = np.mean([3.0, 6.0, 3.0, *far])
    value, clusters = intra_cluster_diversity(samples, shots)
    assert clusters == 2 and value == pytest.approx((2.0 + cluster1) / 2)
