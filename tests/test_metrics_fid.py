"""FID / KID math, statistics files, streaming statistics, and the batched/sharded feature pipeline.

The Frechet distance is checked against independent oracles: hand-derived closed forms (equal, diagonal and
commuting covariances, a non-commuting 2x2 case), pytorch-fid's own formula on random PSD matrices, and, end to
end on real 2048-d features, the low-rank identity tr (S1 S2)^{1/2} = ||A1 A2^T||_* / sqrt((n1 - 1)(n2 - 1)).
KID against a brute-force double loop; the feature pipeline with random Inception weights (real ones are tested
in test_inception.py) at 75x75, the network's minimum size, so a CPU run stays short.
"""
import warnings

import jax
import numpy as np
import pytest
import scipy.linalg

from dpmjax import sharding
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


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_commuting_covariances_closed_form(rng, method):
    """S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T commute, so (S1 S2)^{1/2} = Q diag(sqrt(a b)) Q^T and
    d^2 = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2, by hand; Q is a random rotation, so neither matrix is
    diagonal (the diagonal test alone cannot tell tr (S1 S2)^{1/2} from tr S1^{1/2} S2^{1/2} or sum sqrt(diag))."""
    q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    a, b = rng.uniform(0.05, 4.0, 12), rng.uniform(0.05, 4.0, 12)
    mu1, mu2 = rng.normal(size=12), rng.normal(size=12)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    value = fid.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T, method=method)
    # float64 with condition numbers <= 80: errors ~1e-14 relative; 1e-10 leaves room for LAPACK differences.
    np.testing.assert_allclose(value, expected, rtol=1e-10)


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_non_commuting_2x2_closed_form(method):
    """A 2x2 matrix M with positive eigenvalues l1, l2 has
    tr M^{1/2} = sqrt(l1) + sqrt(l2) = sqrt(tr M + 2 sqrt(det M)).
    S1 = [[2, 1], [1, 1]], S2 = diag(1, 4): S1 S2 = [[2, 4], [1, 4]] (not symmetric: they do not commute),
    tr = 6, det = det S1 det S2 = 4, so tr (S1 S2)^{1/2} = sqrt(10) and d^2 = |dmu|^2 + 3 + 5 - 2 sqrt(10)."""
    s1, s2 = np.array([[2.0, 1.0], [1.0, 1.0]]), np.diag([1.0, 4.0])
    mu1, mu2 = np.array([1.0, -2.0]), np.array([0.5, 0.0])
    expected = 0.25 + 4.0 + 3.0 + 5.0 - 2.0 * np.sqrt(10.0)
    np.testing.assert_allclose(fid.frechet_distance(mu1, s1, mu2, s2, method=method), expected, rtol=1e-12)
    # the classic mistake tr(S1^{1/2} S2^{1/2}) gives a different number here (so this case can catch it)
    wrong = 0.25 + 8.0 - 2.0 * np.trace(scipy.linalg.sqrtm(s1) @ scipy.linalg.sqrtm(s2)).real
    assert abs(wrong - expected) > 1e-2


def _pytorch_fid_frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """pytorch-fid 0.3.0's ``calculate_frechet_distance`` (src/pytorch_fid/fid_score.py), as published, minus
    scipy's deprecated ``disp`` argument: the reference formula FID users compare with."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError("Imaginary component")
        covmean = covmean.real
    return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
@pytest.mark.parametrize("rank", [64, 20])
def test_matches_pytorch_fid_formula_on_random_psd(rng, method, rank):
    """Random PSD covariances (full rank, and rank 20 < d = 64 as with few samples) from features."""
    d = 64
    x = rng.gamma(0.5, 0.3, size=(rank + 1, d)) @ rng.normal(size=(d, d))
    y = rng.gamma(0.5, 0.3, size=(rank + 1, d)) @ rng.normal(size=(d, d)) + 0.3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fid.SingularCovarianceWarning)
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        mu1, s1 = np.mean(x, 0), np.cov(x, rowvar=False)
        mu2, s2 = np.mean(y, 0), np.cov(y, rowvar=False)
        expected = _pytorch_fid_frechet_distance(mu1, s1, mu2, s2)
        value = fid.frechet_distance(mu1, s1, mu2, s2, method=method)
    # Full rank: float64 round-off only (1e-9). Rank-deficient: the round-off eigenvalues (~1e-16 of the largest)
    # of the singular products enter as square roots (~1e-8 each), in either method: 1e-6 relative.
    np.testing.assert_allclose(value, expected, rtol=1e-9 if rank >= d else 1e-6)


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


def _low_rank_frechet(features1, features2):
    """d^2 from the features themselves: with centred A_i [n_i, d], S_i = A_i^T A_i / (n_i - 1), the non-zero
    eigenvalues of S1 S2 are the squared singular values of A1 A2^T / sqrt((n1 - 1)(n2 - 1)), so
    tr (S1 S2)^{1/2} = ||A1 A2^T||_* / sqrt((n1 - 1)(n2 - 1)): an [n1, n2] SVD instead of a d x d matrix root."""
    f1, f2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    a1, a2 = f1 - f1.mean(0), f2 - f2.mean(0)
    n1, n2 = len(f1), len(f2)
    tr_sqrt = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum() / np.sqrt((n1 - 1) * (n2 - 1))
    diff = f1.mean(0) - f2.mean(0)
    return diff @ diff + np.sum(a1 ** 2) / (n1 - 1) + np.sum(a2 ** 2) / (n2 - 1) - 2 * tr_sqrt


def test_fid_from_samples_end_to_end(params, images, tmp_path):
    """Real features (random Inception weights, 75x75) and the real 2048-d distance, for each kind of reference
    (statistics file, (mu, sigma) pair, images), against the low-rank oracle computed from the features.

    ``method="eigh"``: a 2048-d sqrtm takes ~30 s on this loaded CPU (its agreement with eigh is tested above);
    one BLAS thread because OpenBLAS's second thread spins on a shared 2-core machine (5-15x slower, measured).
    """
    from threadpoolctl import threadpool_limits

    reference = np.ascontiguousarray(images[::-1] * 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fid.SingularCovarianceWarning)
        feats = fid.inception_features(params, images, **FAST)
        feats_ref = fid.inception_features(params, reference, **FAST)
        expected = _low_rank_frechet(feats, feats_ref)
        mu_ref, sigma_ref = fid.statistics_from_features(feats_ref)
        fid.save_statistics(tmp_path / "ref.npz", mu_ref, sigma_ref)
        with threadpool_limits(1):
            values = [fid.fid_from_samples(images, ref, params=params, method="eigh", **FAST)
                      for ref in (tmp_path / "ref.npz", str(tmp_path / "ref.npz"), (mu_ref, sigma_ref), reference)]
    assert expected > 1.0  # the two sets really differ
    # Rank-2 covariances in 2048-d: eigh's round-off eigenvalues (~1e-16 of the largest) enter as square roots:
    # measured 3e-8 relative; 1e-6 leaves room. A wrong statistic (ddof, mean, a swapped set) is off by > 1e-2.
    np.testing.assert_allclose(values, expected, rtol=1e-6)
    with pytest.raises(ValueError, match="2048-d"):  # a reference of another network is refused before features
        fid.fid_from_samples(images, (mu_ref[:64], sigma_ref[:64, :64]), params=params, **FAST)


def test_check_and_load_statistics_refuse_bad_files(tmp_path):
    mu, sigma = np.zeros(6), np.eye(6)
    for name, arrays in (("nan", dict(mu=np.r_[np.nan, mu[1:]], sigma=sigma)),
                         ("inf", dict(mu=mu, sigma=np.where(np.eye(6) > 0, np.inf, 0.0))),
                         ("asym", dict(mu=mu, sigma=np.triu(np.ones((6, 6))))),
                         ("negvar", dict(mu=mu, sigma=-np.eye(6))),
                         ("keys", dict(m=mu, s=sigma)),
                         ("shape", dict(mu=mu, sigma=sigma[:5]))):
        np.savez(tmp_path / f"{name}.npz", **arrays)
    (tmp_path / "text.npz").write_text("not an npz")
    np.save(tmp_path / "array.npy", mu)
    for name, message in (("nan", "mu contains 1 NaN"), ("inf", "sigma contains 6 NaN or inf"),
                          ("asym", "not symmetric"), ("negvar", "negative variance"), ("keys", "expected 'mu'"),
                          ("shape", r"not \[d\] / \[d, d\]"), ("text", "cannot read it as an npz")):
        with pytest.raises(ValueError, match=message):
            fid.load_statistics(tmp_path / f"{name}.npz")
    with pytest.raises(ValueError, match="a single array"):
        fid.load_statistics(tmp_path / "array.npy")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fid.load_statistics(tmp_path / "missing.npz")
    fid.save_statistics(tmp_path / "good.npz", mu, sigma)
    with pytest.raises(ValueError, match="6-d statistics, expected 2048-d"):
        fid.load_statistics(tmp_path / "good.npz", dim=2048)
    got_mu, got_sigma = fid.load_statistics(tmp_path / "good.npz", dim=6)
    assert got_mu.dtype == got_sigma.dtype == np.float64


def test_feature_program_uses_the_library_mesh_and_cpu_options(params, images):
    """The sharded program splits the batch over dpmjax.sharding's "data" axis, and on CPU it is compiled with
    ``inception.compiler_options`` (no YNNPACK fusion left in the optimised HLO: the slow VALID convolutions)."""
    mesh = sharding.make_mesh()
    fn, replicated, batch = fid._feature_fn("none", fid._resolve_mesh("auto"))
    assert batch == sharding.data_sharding(mesh) and replicated == sharding.replicated(mesh)
    if inception.compiler_options("cpu") is not None:
        x = np.zeros((8, 75, 75, 3), np.float32)
        hlo = fn.lower(params, x).compile().as_text()
        assert "ynn_fusion" not in hlo and "convolution(" in hlo
    with pytest.raises(ValueError, match="'data' axis"):
        fid.inception_features(params, images, **{**FAST, "mesh": jax.sharding.Mesh(np.array(jax.devices()), ("x",))})


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
