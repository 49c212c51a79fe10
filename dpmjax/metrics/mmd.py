"""Maximum mean discrepancy: the unbiased MMD^2 estimator and its kernels (KID's cubic polynomial, RBF).

    loss = mmd2_unbiased(real_features, fake_features)              # jnp: differentiable, jittable
    value = mmd2_unbiased(np.asarray(a, np.float64), b)             # numpy float64 (KID)

With m rows x_i and n rows y_j (Gretton et al. 2012, eq. 3; MMD-DDM eq. 5):

    MMD_u^2 = sum_{i != i'} k(x_i, x_i') / (m (m-1)) + sum_{j != j'} k(y_j, y_j') / (n (n-1))
              - 2 sum_{i, j} k(x_i, y_j) / (m n),

an unbiased estimate of E k(x, x') + E k(y, y') - 2 E k(x, y) (it may be negative). KID (Binkowski et al. 2018)
uses the polynomial kernel k(a, b) = (a.b / d + 1)^3; MMD-DDM minimises the same estimator with that kernel in a
frozen feature space. The functions use only array methods and ``@``, so the same code serves numpy
(``dpmjax.metrics.fid.kernel_inception_distance``, float64) and jax (training losses).
"""
from __future__ import annotations

KERNELS = ("polynomial", "rbf")


def polynomial_kernel(a, b, *, degree: int = 3, gamma: float | None = None, coef0: float = 1.0):
    """k(a, b) = (gamma a.b + coef0)^degree for rows of a [m, d] and b [n, d] -> [m, n]; gamma defaults to 1/d
    (KID's kernel with degree 3, coef0 1)."""
    gamma = 1.0 / a.shape[-1] if gamma is None else gamma
    return (gamma * (a @ b.T) + coef0) ** degree


def rbf_kernel(a, b, *, bandwidth: float = 1.0):
    """k(a, b) = exp(-|a - b|^2 / (2 bandwidth^2 d)) -> [m, n] (the squared distance scaled by the dimension d,
    so one bandwidth suits feature spaces of any width)."""
    sq = (a * a).sum(-1)[:, None] + (b * b).sum(-1)[None, :] - 2.0 * (a @ b.T)
    return _exp(-sq.clip(0) / (2.0 * bandwidth ** 2 * a.shape[-1]))


def _exp(x):
    """exp in x's own array library (numpy for numpy arrays, jax otherwise)."""
    import numpy as np

    if isinstance(x, np.ndarray):
        return np.exp(x)
    import jax.numpy as jnp

    return jnp.exp(x)


def kernel_fn(name: str, **options):
    """The kernel ``name`` ("polynomial" or "rbf") with ``options``, as ``k(a, b) -> [m, n]``."""
    if name == "polynomial":
        return lambda a, b: polynomial_kernel(a, b, **options)
    if name == "rbf":
        return lambda a, b: rbf_kernel(a, b, **options)
    raise ValueError(f"kernel must be one of {KERNELS}, got {name!r}")


def mmd2_unbiased(x, y, kernel=polynomial_kernel):
    """The unbiased MMD^2 (module docstring) of rows x [m, d] and y [n, d], m, n >= 2, under ``kernel``."""
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"features must be [m, d] and [n, d], got {x.shape} and {y.shape}")
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2:
        raise ValueError(f"the unbiased MMD^2 needs at least 2 rows in each set, got {m} and {n}")
    k_xx, k_yy, k_xy = kernel(x, x), kernel(y, y), kernel(x, y)
    within_x = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    within_y = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return within_x + within_y - 2.0 * k_xy.sum() / (m * n)
