"""FID and KID with the FID Inception-v3 in JAX: batched, jitted, sharded feature extraction; float64 statistics.

FID (Heusel et al. 2017, "GANs trained by a two time-scale update rule...", eq. 6):

    d^2 = |mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2}),

computed as pytorch-fid does (``calculate_frechet_distance``): float64, ``scipy.linalg.sqrtm`` of S_1 S_2; if
that is not finite, eps * I is added to both covariances; the imaginary part is dropped when the diagonal's
is below 1e-3, else it is an error. (scipy's deprecated ``disp`` argument is not used.)

KID (Binkowski et al. 2018, "Demystifying MMD GANs", sec. 3 / appendix): the unbiased MMD^2 estimate with
the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets (torch-fidelity /
clean-fid defaults: 100 subsets of 1000).

Statistics are accumulated batch by batch (Chan et al.'s pairwise update of mean and scatter, float64), so
50k samples are never held at once; statistics files use pytorch-fid's npz format (``mu``, ``sigma``) so
published reference statistics can be used -- provided they were made with the same preprocessing (see
``inception.preprocess``: pytorch-fid's bilinear resize by default).
"""
from __future__ import annotations

import functools
import os
import tempfile
import warnings
import zipfile
import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from tqdm import tqdm

from dpmjax import sharding
from dpmjax.metrics.inception import FEATURE_DIM, FIDInceptionV3, RESIZE_MODES, compiler_options, preprocess
from dpmjax.metrics.mmd import mmd2_unbiased, polynomial_kernel

__all__ = ["SingularCovarianceWarning", "RunningStats", "statistics_from_features", "frechet_distance",
           "save_statistics", "load_statistics", "check_statistics", "kernel_inception_distance",
           "inception_features", "iter_inception_features", "compute_statistics", "fid_from_samples"]

_RANGE_TOL = 1e-5  # float images may overshoot [0, 1] by rounding this much; they are clipped


class SingularCovarianceWarning(UserWarning):
    """Too few samples for the feature dimension: the covariance is singular and FID is biased upward."""


def _few_samples_message(count: int, dim: int) -> str:
    return (f"statistics from {count} samples of {dim}-d features: the sample covariance has rank at most "
            f"{count - 1} < {dim}, so it is singular. The matrix square root in FID is then ill-conditioned and "
            "FID is biased upward (strongly so for small sets); papers use 50k samples. Use at least 10k, or "
            "compare only numbers computed with the same sample count.")


class RunningStats:
    """Streaming float64 mean and covariance (ddof = 1, as ``np.cov``) of feature vectors.

    Each batch is merged with Chan, Golub & LeVeque's pairwise update: with n = n_a + n_b and
    delta = mean_b - mean_a, mean = mean_a + delta n_b / n, M2 = M2_a + M2_b + delta delta^T n_a n_b / n.
    Centring per batch avoids the cancellation of the raw sum-of-squares formula.
    """

    def __init__(self, dim: int = FEATURE_DIM):
        self.dim, self.count = dim, 0
        self.mean = np.zeros(dim, np.float64)
        self.scatter = np.zeros((dim, dim), np.float64)  # M2 = sum (x - mean)(x - mean)^T

    def update(self, features) -> "RunningStats":
        x = np.asarray(features, np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"features must be [N, {self.dim}], got shape {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("features contain NaN or inf")
        n_b = x.shape[0]
        if n_b == 0:
            return self
        mean_b = x.mean(axis=0)
        centred = x - mean_b
        scatter_b = centred.T @ centred
        n = self.count + n_b
        delta = mean_b - self.mean
        self.scatter += scatter_b + np.outer(delta, delta) * (self.count * n_b / n)
        self.mean = self.mean + delta * (n_b / n)
        self.count = n
        return self

    def covariance(self) -> np.ndarray:
        if self.count < 2:
            raise ValueError(f"covariance needs at least 2 samples, got {self.count} (empty or single-image set)")
        if self.count <= self.dim:
            warnings.warn(_few_samples_message(self.count, self.dim), SingularCovarianceWarning, stacklevel=3)
        return self.scatter / (self.count - 1)

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu [d], sigma [d, d]) in float64, pytorch-fid's convention."""
        sigma = self.covariance()
        return self.mean.copy(), sigma


def statistics_from_features(features) -> tuple[np.ndarray, np.ndarray]:
    """mu, sigma of [N, d] features (float64; sigma as ``np.cov(features, rowvar=False)``)."""
    features = np.asarray(features)
    if features.ndim != 2:
        raise ValueError(f"features must be [N, d], got shape {features.shape}")
    return RunningStats(features.shape[1]).update(features).statistics()


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6, method: str = "sqrtm") -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) in float64.

    ``method="sqrtm"`` is pytorch-fid's computation (``scipy.linalg.sqrtm(sigma1 @ sigma2)``, eps fallback,
    imaginary-part check). ``method="eigh"`` uses tr (S1 S2)^{1/2} = tr (R S2 R)^{1/2} with R = S1^{1/2}, a
    symmetric PSD matrix, so two symmetric eigendecompositions replace the complex Schur-based sqrtm (several
    times faster at d = 2048; it agrees with "sqrtm" to ~1e-10 relative on full-rank covariances and clips the
    round-off negative eigenvalues of singular ones instead of going complex).
    """
    if method not in ("sqrtm", "eigh"):
        raise ValueError(f"method must be 'sqrtm' or 'eigh', got {method!r}")
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ValueError(f"mean vectors have different or non-vector shapes: {mu1.shape} vs {mu2.shape}")
    if sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"covariances must be [{mu1.size}, {mu1.size}], got {sigma1.shape} and {sigma2.shape}")
    for name, arr in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(arr).all():
            raise ValueError(f"{name} contains NaN or inf")
    diff = mu1 - mu2
    if method == "eigh":
        tr_covmean = _trace_sqrt_product_eigh(sigma1, sigma2)
    else:
        tr_covmean = _trace_sqrt_product_sqrtm(sigma1, sigma2, eps)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def _trace_sqrt_product_sqrtm(sigma1, sigma2, eps):
    """pytorch-fid's ``calculate_frechet_distance`` core, without scipy's deprecated ``disp`` argument."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            warnings.warn(f"FID: sqrtm(sigma1 sigma2) is not finite (singular product); adding {eps} to the "
                          "diagonal of both covariances, as pytorch-fid does", SingularCovarianceWarning)
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    for w in caught:  # re-emit with the explanation instead of scipy's bare "Matrix is singular"
        if issubclass(w.category, scipy.linalg.LinAlgWarning):
            warnings.warn(f"FID: {w.message} -- the covariances are (near) singular, usually because there are "
                          "fewer samples than feature dimensions; the result is unreliable.",
                          SingularCovarianceWarning, stacklevel=3)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: sqrtm has a significant imaginary component "
                             f"({np.max(np.abs(covmean.imag)):.3g}); the covariances are not valid")
        covmean = covmean.real
    return np.trace(covmean)


def _trace_sqrt_product_eigh(sigma1, sigma2):
    def check_psd(w, name):
        if w.min() < -1e-6 * max(abs(w.max()), 1e-300):
            raise ValueError(f"FID: {name} is not positive semi-definite (eigenvalue {w.min():.3g})")

    w1, u1 = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    check_psd(w1, "sigma1")
    check_psd(np.linalg.eigvalsh((sigma2 + sigma2.T) / 2), "sigma2")
    root = (u1 * np.sqrt(np.clip(w1, 0, None))) @ u1.T
    inner = root @ sigma2 @ root
    w = np.linalg.eigvalsh((inner + inner.T) / 2)
    return float(np.sum(np.sqrt(np.clip(w, 0, None))))


def save_statistics(path, mu, sigma) -> None:
    """pytorch-fid's format: an npz with ``mu`` [d] and ``sigma`` [d, d] (float64). Written atomically."""
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise ValueError(f"mu must be [d] and sigma [d, d], got {mu.shape} and {sigma.shape}")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, mu=mu, sigma=sigma)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def check_statistics(mu, sigma, *, dim: int | None = None, name: str = "statistics"):
    """Validate FID statistics; returns (mu [d], sigma [d, d]) as float64, or raises ValueError naming ``name``.

    Checks, all cheap (no decomposition of sigma): mu is a vector and sigma a square matrix of its size (``dim``
    when given: 2048 for the FID Inception's pool3), every value finite, sigma symmetric (to 1e-6 of its largest
    entry: a float32 copy of a symmetric matrix stays exactly symmetric) and its diagonal (variances) >= 0.
    """
    mu, sigma = np.asarray(mu), np.asarray(sigma)
    if not (np.issubdtype(mu.dtype, np.number) and np.issubdtype(sigma.dtype, np.number)):
        raise ValueError(f"{name}: mu and sigma must be numeric arrays, got dtypes {mu.dtype} and {sigma.dtype}")
    mu, sigma = mu.astype(np.float64), sigma.astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise ValueError(f"{name}: mu {mu.shape} / sigma {sigma.shape} are not [d] / [d, d]")
    if dim is not None and mu.size != dim:
        raise ValueError(f"{name}: {mu.size}-d statistics, expected {dim}-d (the FID Inception's pool3 features "
                         f"are {FEATURE_DIM}-d; were these made with another network or layer?)")
    for label, arr in (("mu", mu), ("sigma", sigma)):
        if not np.isfinite(arr).all():
            raise ValueError(f"{name}: {label} contains {int(np.sum(~np.isfinite(arr)))} NaN or inf values")
    scale = float(np.abs(sigma).max()) if sigma.size else 0.0
    if sigma.size and float(np.abs(sigma - sigma.T).max()) > 1e-6 * scale:
        raise ValueError(f"{name}: sigma is not symmetric (max |S - S^T| = {np.abs(sigma - sigma.T).max():.3g}), "
                         "so it is not a covariance matrix")
    if sigma.size and float(np.diagonal(sigma).min()) < 0:
        raise ValueError(f"{name}: sigma has a negative variance on its diagonal ({np.diagonal(sigma).min():.3g})")
    return mu, sigma


def load_statistics(path, *, dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read and validate ``mu``, ``sigma`` from a pytorch-fid statistics npz (no pickles are loaded).

    Raises FileNotFoundError for a missing file and ValueError for anything else wrong (not an npz, missing keys,
    wrong shapes or size ``dim``, NaN/inf, an asymmetric sigma): see ``check_statistics``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"FID statistics file {path!r} does not exist")
    try:
        npz = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: not a FID statistics file (cannot read it as an npz: {err})") from None
    if not hasattr(npz, "files"):  # a bare .npy array
        raise ValueError(f"{path}: not a FID statistics file (a single array, expected an npz with 'mu' and 'sigma')")
    with npz:
        if "mu" not in npz.files or "sigma" not in npz.files:
            raise ValueError(f"{path}: not a FID statistics file (keys {npz.files}, expected 'mu' and 'sigma')")
        try:
            mu, sigma = npz["mu"], npz["sigma"]
        except Exception as err:  # noqa: BLE001 - object arrays (pickles, refused), a corrupt member (zlib, zip)
            raise ValueError(f"{path}: unreadable 'mu' / 'sigma' ({type(err).__name__}: {err})") from None
    return check_statistics(mu, sigma, dim=dim, name=path)


def kernel_inception_distance(features1, features2, *, num_subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """KID: mean and std over subsets of the unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3.

    Per subset of m rows drawn without replacement from each set:
    MMD^2 = sum_{i!=j} k(x_i, x_j) / (m(m-1)) + sum_{i!=j} k(y_i, y_j) / (m(m-1)) - 2 sum_{i,j} k(x_i, y_j) / m^2.
    m = min(subset_size, N1, N2), as clean-fid and torch-fidelity do.
    """
    x, y = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"features must be [N1, d] and [N2, d], got {x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("features contain NaN or inf")
    m = min(subset_size, x.shape[0], y.shape[0])
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples in each set, got {x.shape[0]} and {y.shape[0]}")
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be >= 1, got {num_subsets}")
    rng = np.random.default_rng(seed)
    values = np.empty(num_subsets)
    for s in range(num_subsets):
        xs = x[rng.choice(x.shape[0], m, replace=False)]
        ys = y[rng.choice(y.shape[0], m, replace=False)]
        values[s] = mmd2_unbiased(xs, ys, polynomial_kernel)
    return float(values.mean()), float(values.std())


# ------------------------------------------------------------------------------------- feature extraction

def _resolve_mesh(mesh):
    """``"auto"`` -> ``dpmjax.sharding.make_mesh()`` when there are several devices, else None (one device);
    a ``Mesh`` must have the library's "data" axis; None stays None."""
    if isinstance(mesh, str):
        if mesh != "auto":
            raise ValueError(f"mesh must be 'auto', None or a jax.sharding.Mesh, got {mesh!r}")
        return sharding.make_mesh() if jax.device_count() > 1 else None
    if mesh is not None:
        sharding.data_axis_size(mesh)  # raises, naming the axes, when there is no "data" axis
    return mesh


@functools.lru_cache(maxsize=16)
def _feature_fn(resize: str, mesh):
    """One jitted program per (resize, mesh): features plus min / max / all-finite of the raw batch.

    The Inception params are an argument (replicated over the mesh), never closed over: another weight file
    does not recompile. The batch is split over the mesh's "data" axis (``dpmjax.sharding.data_sharding``).
    On CPU the program is compiled with ``inception.compiler_options`` (XLA's Eigen convolutions instead of
    YNNPACK's: ~1.5x faster on this 2-core CPU, see BENCHMARKS.md), an option of this executable only.
    """
    net = FIDInceptionV3()
    platform = (mesh.devices.flat[0] if mesh is not None else jax.devices()[0]).platform
    options = compiler_options(platform)

    def features(params, images):
        raw = images.astype(jnp.float32)
        return (net.apply(params, preprocess(images, resize)), jnp.min(raw), jnp.max(raw),
                jnp.all(jnp.isfinite(raw)))

    if mesh is None:
        return jax.jit(features, compiler_options=options), None, None
    replicated, batch = sharding.replicated(mesh), sharding.data_sharding(mesh)
    fn = jax.jit(features, in_shardings=(replicated, batch),
                 out_shardings=(batch, replicated, replicated, replicated), compiler_options=options)
    return fn, replicated, batch


def _check_dtype(dtype) -> None:
    dtype = np.dtype(dtype)
    if dtype == np.uint8 or np.issubdtype(dtype, np.floating) or dtype.name == "bfloat16":
        return
    raise TypeError(f"images must be uint8 (0..255) or floating point in [0, 1], got dtype {dtype}; "
                    "convert integer images with .astype(np.uint8) or divide by 255 into floats")


def _check_range(lo: float, hi: float, finite: bool, start: int) -> None:
    if not finite:
        raise ValueError(f"images contain NaN or inf (in the batch starting at image {start})")
    if lo < -_RANGE_TOL or hi > 1.0 + _RANGE_TOL:
        hint = (" They look like [-1, 1] model outputs: pass (x + 1) / 2." if lo >= -1.0 - _RANGE_TOL and lo < 0
                else " They look like 0..255 values: pass them as uint8 or divide by 255." if hi <= 255.0 else "")
        raise ValueError(f"float images must lie in [0, 1]; the batch starting at image {start} spans "
                         f"[{lo:.4g}, {hi:.4g}].{hint}")


def _batches(images, batch_size: int):
    """Chunks of exactly batch_size rows (the last may be short) from an array or an iterable of batches."""
    if hasattr(images, "shape") and hasattr(images, "dtype"):
        for start in range(0, images.shape[0], batch_size):
            yield images[start:start + batch_size]
        return
    buffer, held = [], 0
    for chunk in images:
        chunk = chunk if isinstance(chunk, jax.Array) else np.asarray(chunk)
        buffer.append(chunk)
        held += chunk.shape[0]
        while held >= batch_size:
            joined = np.concatenate([np.asarray(b) for b in buffer]) if len(buffer) > 1 else buffer[0]
            yield joined[:batch_size]
            rest = joined[batch_size:]
            buffer, held = ([rest] if rest.shape[0] else []), rest.shape[0]
    if held:
        yield np.concatenate([np.asarray(b) for b in buffer]) if len(buffer) > 1 else buffer[0]


def iter_inception_features(params, images, *, batch_size: int = 32, resize: str = "bilinear", mesh="auto",
                            progress: bool = True):
    """Yield [b, 2048] float32 feature batches of ``images`` (see ``inception_features``)."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    mesh = _resolve_mesh(mesh)
    fn, replicated, batch_sharding = _feature_fn(resize, mesh)
    total = images.shape[0] if hasattr(images, "shape") else (len(images) if hasattr(images, "__len__") else None)
    if total == 0:
        raise ValueError("no images: the image set is empty")
    num_shards = sharding.data_axis_size(mesh) if mesh is not None else 1
    # One fixed padded batch shape -> one compilation; small sets are not padded up to a large batch_size.
    padded = min(batch_size, total) if total is not None else batch_size
    padded = -(-padded // num_shards) * num_shards
    if replicated is not None:
        params = jax.device_put(params, replicated)
    seen = 0
    with tqdm(total=total, unit="img", desc="Inception features", disable=not progress) as bar:
        for chunk in _batches(images, padded):
            _check_dtype(chunk.dtype)
            chunk, n = sharding.pad_to_multiple(chunk, padded)
            if batch_sharding is not None:
                chunk = jax.device_put(chunk, batch_sharding)
            feats, lo, hi, finite = fn(params, chunk)
            if chunk.dtype != np.uint8:
                _check_range(float(lo), float(hi), bool(finite), seen)
            seen += n
            bar.update(n)
            yield np.asarray(feats)[:n]
    if seen == 0:
        raise ValueError("no images: the image set is empty")


def inception_features(params, images, *, batch_size: int = 32, resize: str = "bilinear", mesh="auto",
                       progress: bool = True) -> np.ndarray:
    """Pool3 features [N, 2048] (float32) of images, batched, jitted, sharded over the mesh's data axis.

    Args:
      params: ``load_inception_params()``.
      images: [N, H, W, C] (C = 1 or 3) or [N, H, W]; uint8 in 0..255 or floats in [0, 1]; a numpy/JAX array or
        an iterable of such batches (any sizes; they are re-batched). NaN/inf or out-of-range floats raise.
      batch_size: images per jitted call (rounded up to a multiple of the device count; one compilation).
      resize: ``"bilinear"`` (pytorch-fid), ``"clean"`` or ``"none"`` -- see ``inception.preprocess``.
      mesh: ``"auto"`` (all devices on a ``"data"`` axis when there are several), ``None`` (one device), or a
        ``Mesh`` with a ``"data"`` axis.
      progress: show a tqdm progress bar.
    """
    return np.concatenate(list(iter_inception_features(params, images, batch_size=batch_size, resize=resize,
                                                       mesh=mesh, progress=progress)))


def compute_statistics(params, images, *, return_features: bool = False, **kwargs):
    """Streaming (mu, sigma) of the images' features; with ``return_features`` also the [N, 2048] features."""
    stats, kept = RunningStats(), []
    for feats in iter_inception_features(params, images, **kwargs):
        stats.update(feats)
        if return_features:
            kept.append(feats)
    mu, sigma = stats.statistics()
    return (mu, sigma, np.concatenate(kept)) if return_features else (mu, sigma)


def fid_from_samples(samples, reference, *, params=None, method: str = "sqrtm", **kwargs) -> float:
    """FID of ``samples`` against ``reference``.

    ``reference`` is a pytorch-fid statistics file (path), a ``(mu, sigma)`` pair, or images. ``params``
    defaults to ``load_inception_params()``; ``method`` goes to ``frechet_distance``; ``kwargs`` go to
    ``inception_features`` (batch_size, resize, mesh, progress). Reference statistics must come from the same
    preprocessing (resize mode) as the samples. A reference file or pair is validated (``check_statistics``)
    before any feature is computed.
    """
    if params is None:
        from dpmjax.metrics.weights import load_inception_params
        params = load_inception_params()
    if isinstance(reference, (str, os.PathLike)):
        mu_ref, sigma_ref = load_statistics(reference, dim=FEATURE_DIM)  # validated before any feature work
    elif isinstance(reference, tuple) and len(reference) == 2:
        mu_ref, sigma_ref = check_statistics(*reference, dim=FEATURE_DIM, name="reference statistics")
    else:
        mu_ref, sigma_ref = compute_statistics(params, reference, **kwargs)
    mu, sigma = compute_statistics(params, samples, **kwargs)
    return frechet_distance(mu, sigma, mu_ref, sigma_ref, method=method)
