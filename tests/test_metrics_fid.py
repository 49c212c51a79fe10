"""FID / KID math, statistics files, streaming statistics, and the batched/sharded feature pipeline.

The Frechet distance is checked against closed forms; KID against a brute-force double loop; the feature
pipeline with random Inception weights (real ones are tested in test_inception.py) at 75x75, the
network's minimum size, so a CPU run stays short.
"""
import warnings

import numpy as np
import pytest

from dpmjax.metrics import fid, inception


def _spd(rng, d):
    a = rng.normal(size=(d, 2 * d))
    return a @ a.T / (2 * d) + 0.1 * np.eye(d)


# ----------------------------------------------------------------------------------------- Frechet distance

@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_identical_statistics_give_zero(rng, method):
    mu, sigma = rng.normal(size=16), _spd(rng, 16)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma, method=method)) < 1e-9


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_equal_covariances_give_squared_mean_distance(rng, method):
    mu1, mu2, sigma = rng.normal(size=16), rng.normal(size=16), _spd(rng, 16)
    value = fid.frechet_distance(mu1, sigma, mu2, sigma, method=method)
    np.testing.assert_allclose(value, np.sum((mu1 - mu2) ** 2), rtol=1e-9)


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_diagonal_covariances(rng, method):
    mu1, mu2 = rng.normal(size=10), rng.normal(size=10)
    a, b = rng.uniform(0.1, 3, 10), rng.uniform(0.1, 3, 10)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    value = fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b), method=method)
    np.testing.assert_allclose(value, expected, rtol=1e-10)


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_general_covariances_match_eigenvalue_form(rng, method):
    """tr sqrtm(S1 S2) = sum sqrt(eig(S1 S2)) (S1 S2 is similar to an SPD matrix)."""
    mu1, mu2, s1, s2 = rng.normal(size=12), rng.normal(size=12), _spd(rng, 12), _spd(rng, 12)
    tr_sqrt = np.sum(np.sqrt(np.linalg.eigvals(s1 @ s2).real))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    np.testing.assert_allclose(fid.frechet_distance(mu1, s1, mu2, s2, method=method), expected, rtol=1e-9)


def test_frechet_bad_inputs(rng):
    mu, sigma = rng.normal(size=4), _spd(rng, 4)
    with pytest.raises(ValueError, match="shapes"):
        fid.frechet_distance(mu, sigma, mu[:3], sigma[:3, :3])
    with pytest.raises(ValueError, match=r"\[4, 4\]"):
        fid.frechet_distance(mu, sigma, mu, sigma[:3, :3])
    bad = sigma.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fid.frechet_distance(mu, bad, mu, sigma)
    with pytest.raises(ValueError, match="imaginary"):  # not a covariance: sqrtm(diag(1, -1)) is complex
        fid.frechet_distance(mu[:2], np.diag([1.0, -1.0]), mu[:2], np.eye(2))
    with pytest.raises(ValueError, match="positive semi-definite"):
        fid.frechet_distance(mu[:2], np.eye(2), mu[:2], np.diag([1.0, -1.0]), method="eigh")
    with pytest.raises(ValueError, match="method"):
        fid.frechet_distance(mu, sigma, mu, sigma, method="svd")


def test_eigh_agrees_with_sqrtm_on_singular_covariances(rng):
    """Fewer samples than dimensions (the n < d case): both methods give the same finite value."""
    x, y = rng.normal(size=(6, 10)), rng.normal(size=(7, 10)) + 0.2
    with pytest.warns(fid.SingularCovarianceWarning):
        (m1, s1), (m2, s2) = fid.statistics_from_features(x), fid.statistics_from_features(y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fid.SingularCovarianceWarning)
        np.testing.assert_allclose(fid.frechet_distance(m1, s1, m2, s2, method="eigh"),
                                   fid.frechet_distance(m1, s1, m2, s2), rtol=1e-6)


def test_singular_covariances_warn_with_explanation(rng):
    mu1, mu2 = rng.normal(size=3), rng.normal(size=3)
    with pytest.warns(fid.SingularCovarianceWarning, match="fewer samples than feature dimensions"):
        value = fid.frechet_distance(mu1, np.zeros((3, 3)), mu2, np.zeros((3, 3)))
    np.testing.assert_allclose(value, np.sum((mu1 - mu2) ** 2), rtol=1e-12)


# ------------------------------------------------------------------------------------------ statistics

def test_running_stats_match_numpy_in_uneven_batches(rng):
    x = rng.normal(size=(53, 8)) * rng.uniform(0.1, 2, 8) + 1e4  # large offset: no cancellation
    stats = fid.RunningStats(8)
    for lo, hi in ((0, 1), (1, 20), (20, 20), (20, 53)):
        stats.update(x[lo:hi])
    mu, sigma = stats.statistics()
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-14)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-12)
    assert mu.dtype == sigma.dtype == np.float64


def test_statistics_errors_and_few_sample_warning(rng):
    with pytest.raises(ValueError, match="at least 2 samples"):
        fid.statistics_from_features(np.zeros((0, 8)))
    with pytest.raises(ValueError, match="at least 2 samples"):
        fid.statistics_from_features(np.zeros((1, 8)))
    with pytest.warns(fid.SingularCovarianceWarning, match="rank at most 4 < 8"):
        fid.statistics_from_features(rng.normal(size=(5, 8)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fid.statistics_from_features(rng.normal(size=(9, 8)))  # n > d: no warning
    with pytest.raises(ValueError, match="NaN"):
        fid.RunningStats(2).update(np.array([[0.0, np.nan]]))
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        fid.RunningStats(2).update(np.zeros((3, 4)))


def test_statistics_file_roundtrip_in_pytorch_fid_format(tmp_path, rng):
    mu, sigma = rng.normal(size=6), _spd(rng, 6)
    path = tmp_path / "stats.npz"
    fid.save_statistics(path, mu, sigma)
    with np.load(path) as f:  # how pytorch-fid reads a statistics file
        assert sorted(f.files) == ["mu", "sigma"]
        np.testing.assert_array_equal(f["mu"][:], mu)
        np.testing.assert_array_equal(f["sigma"][:], sigma)
    mu2, sigma2 = fid.load_statistics(str(path))
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
    np.savez(tmp_path / "other.npz", m=mu)
    with pytest.raises(ValueError, match="'mu' and 'sigma'"):
        fid.load_statistics(tmp_path / "other.npz")
    with pytest.raises(ValueError, match=r"\[d, d\]"):
        fid.save_statistics(path, mu, sigma[:3])


# ------------------------------------------------------------------------------------------------- KID

def _mmd2_brute_force(x, y):
    d = x.shape[1]
    k = lambda a, b: (float(a @ b) / d + 1.0) ** 3  # noqa: E731
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_matches_brute_force(rng):
    x, y = rng.normal(size=(9, 5)), rng.normal(size=(9, 5)) + 0.3
    mean, std = fid.kernel_inception_distance(x, y, num_subsets=3, subset_size=100)  # subsets = whole sets
    np.testing.assert_allclose(mean, _mmd2_brute_force(x, y), rtol=1e-12)
    assert std < 1e-12
    # Proper subsets: replay the same draws.
    x, y = rng.normal(size=(12, 5)), rng.normal(size=(10, 5))
    mean, std = fid.kernel_inception_distance(x, y, num_subsets=4, subset_size=6, seed=3)
    draw = np.random.default_rng(3)
    values = [_mmd2_brute_force(x[draw.choice(12, 6, replace=False)], y[draw.choice(10, 6, replace=False)])
              for _ in range(4)]
    np.testing.assert_allclose([mean, std], [np.mean(values), np.std(values)], rtol=1e-10)


def test_kid_bad_inputs(rng):
    with pytest.raises(ValueError, match="at least 2"):
        fid.kernel_inception_distance(rng.normal(size=(1, 4)), rng.normal(size=(5, 4)))
    with pytest.raises(ValueError, match=r"\[N1, d\]"):
        fid.kernel_inception_distance(rng.normal(size=(3, 4)), rng.normal(size=(3, 5)))


# ------------------------------------------------------------------------------ feature-extraction pipeline

FAST = dict(resize="none", batch_size=2, mesh=None, progress=False)  # 75x75 = the network's minimum


@pytest.fixture(scope="module")
def params():
    return inception.random_params(seed=1)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(5).uniform(0, 1, (3, 75, 75, 3)).astype(np.float32)


def test_features_sharded_batched_and_streamed_agree(params, images):
    single = fid.inception_features(params, images, **FAST)
    assert single.shape == (3, 2048) and single.dtype == np.float32 and np.isfinite(single).all()
    assert single.std() > 0
    sharded = fid.inception_features(params, images, resize="none", mesh="auto", progress=False)  # 8 devices
    np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-5)
    streamed = fid.inception_features(params, iter([images[:1], images[1:]]), **FAST)  # uneven batches
    np.testing.assert_allclose(streamed, single, rtol=1e-6, atol=1e-6)


def test_fid_from_samples_end_to_end(params, images, tmp_path, monkeypatch):
    """The plumbing: samples and each kind of reference reach frechet_distance as the right statistics.

    (A 2048-d sqrtm takes minutes on a loaded 2-core CPU; the distance itself is tested above in small d.)
    """
    calls = []
    monkeypatch.setattr(fid, "frechet_distance", lambda *stats, method: calls.append((stats, method)) or 1.5)
    reference = images[::-1] * 0.5
    with pytest.warns(fid.SingularCovarianceWarning, match="rank at most 2 < 2048"):
        mu, sigma = fid.statistics_from_features(fid.inception_features(params, images, **FAST))
        mu_ref, sigma_ref = fid.statistics_from_features(fid.inception_features(params, reference, **FAST))
        fid.save_statistics(tmp_path / "ref.npz", mu_ref, sigma_ref)
        assert fid.fid_from_samples(images, tmp_path / "ref.npz", params=params, **FAST) == 1.5
        fid.fid_from_samples(images, str(tmp_path / "ref.npz"), params=params, method="eigh", **FAST)
        fid.fid_from_samples(images, reference, params=params, **FAST)
        fid.fid_from_samples(images, (mu_ref, sigma_ref), params=params, **FAST)
    assert [method for _, method in calls] == ["sqrtm", "eigh", "sqrtm", "sqrtm"]
    for (got_mu, got_sigma, got_mu_ref, got_sigma_ref), _ in calls:
        np.testing.assert_allclose(got_mu, mu, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(got_sigma, sigma, rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(got_mu_ref, mu_ref, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(got_sigma_ref, sigma_ref, rtol=1e-5, atol=1e-9)
    assert np.abs(mu - mu_ref).max() > 1e-3  # the two sets really differ


def test_feature_extraction_bad_inputs(params, images):
    with pytest.raises(TypeError, match="uint8"):
        fid.inception_features(params, (images * 255).astype(np.int64), **FAST)
    with pytest.raises(TypeError, match="uint8"):
        fid.inception_features(params, images > 0.5, **FAST)
    nan_images = images.copy()
    nan_images[2, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or inf .* image 2"):
        fid.inception_features(params, nan_images, **FAST)
    with pytest.raises(ValueError, match=r"\(x \+ 1\) / 2"):
        fid.inception_features(params, images[:2] * 2 - 1, **FAST)
    with pytest.raises(ValueError, match="uint8 or divide by 255"):
        fid.inception_features(params, images[:2] * 255, **FAST)
    with pytest.raises(ValueError, match="empty"):
        fid.inception_features(params, images[:0], **FAST)
    with pytest.raises(ValueError, match="empty"):
        fid.inception_features(params, iter([]), **FAST)
    with pytest.raises(ValueError, match="resize"):
        fid.inception_features(params, images, **{**FAST, "resize": "nearest"})
    with pytest.raises(ValueError, match="mesh"):
        fid.inception_features(params, images, **{**FAST, "mesh": "all"})
