"""Synthetic blur: motion and Gaussian kernels, blurring with additive noise, and the image metrics of deblurring.

The degradation model of non-blind deblurring benchmarks (Ren et al., ICCV 2023, arXiv 2212.01789, Sec. 3; the
GoPro / HIDE setting simulated):

    y = k * x + n,      k >= 0, sum(k) = 1,      n ~ N(0, sigma_n^2 I)                               (1)

with ``*`` a 2-D convolution per image and channel (``blur_images``). Kernels come from a ``BlurFamily``:

* ``motion_line``: a straight camera shake, a segment of length L (``strength``, pixels) at a uniform random
  angle, rasterised by bilinear splatting of densely spaced points (anti-aliased, so sub-pixel lengths work);
* ``motion_walk``: a shaky trajectory, a random walk whose heading turns by N(0, 0.6^2) rad per step, scaled so its
  largest extent is L, splatted the same way (Boracchi & Foi 2012's trajectories, simplified);
* ``gaussian``: out-of-focus / atmospheric blur, k(d) ~ exp(-d^T R diag(s1^2, s2^2)^-1 R^T d / 2) with major std s1
  (``strength``), minor std s2 = s1 * U[``anisotropy``, 1] and a random rotation R (``anisotropy=1``: isotropic).

A training family and a held-out one (another kind, or strengths outside the training range) measure the
out-of-distribution gap, the point of the paper's multiscale guidance.

Where dm-pix (``dm_pix`` 0.4.x) is used and where not:
* ``psnr`` and ``ssim`` are ``pix.psnr`` / ``pix.ssim`` on images mapped from dpmjax's [-1, 1] to [0, 1]
  (``max_val = 1``); ``ssim`` takes a smaller ``filter_size`` for small images (pix's default window of 11 would
  leave a 6 x 6 map on 16 x 16 images), the Gaussian window std scaled with it.
* ``to_grayscale`` is ``pix.rgb_to_grayscale`` (ITU-R 601 luma) for 3 channels, the identity for 1.
* The blur itself is not pix: ``pix.gaussian_blur`` applies one isotropic Gaussian to a whole batch, and
  pix's depthwise convolution is private in 0.4.x (``dm_pix._src``); eq. (1) needs an arbitrary kernel per image,
  so ``blur_images`` is a sum of k^2 shifted, per-image weighted copies (faster on CPU than a grouped convolution).
  ``tests/test_deblur.py`` checks it against ``pix.gaussian_blur`` for an isotropic kernel.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import dm_pix as pix
import jax
import jax.numpy as jnp

__all__ = ["KERNEL_KINDS", "PADDINGS", "BlurFamily", "check_family", "motion_line_kernels", "motion_walk_kernels",
           "gaussian_kernels", "sample_kernels", "blur_images", "degrade", "to_grayscale", "downsample",
           "guidance_targets", "psnr", "ssim"]

KERNEL_KINDS = ("motion_line", "motion_walk", "gaussian")
PADDINGS = ("edge", "zeros")
SPLAT_POINTS = 64        # points splatted per kernel: > 4 per pixel of the longest kernel this module allows
WALK_TURN_STD = 0.6      # rad per step of the random walk's heading


class BlurFamily(NamedTuple):
    """A distribution of degradations (1): kernel kind, strength range, kernel support and noise range.

    Fields:
      kind: one of ``KERNEL_KINDS``.
      strength: (low, high) uniform range of the motion length L in pixels, or of the Gaussian's major std.
      kernel_size: odd side of the square kernel support (at most the image side).
      noise_std: (low, high) uniform range of sigma_n in [-1, 1] image units.
      anisotropy: Gaussian only: minor / major std ratio drawn from U[anisotropy, 1].
    """

    kind: str = "motion_line"
    strength: tuple = (2.0, 5.0)
    kernel_size: int = 7
    noise_std: tuple = (0.0, 0.02)
    anisotropy: float = 1.0


def check_family(family: BlurFamily, image_shape=None, name: str = "blur") -> None:
    """Raise ``ValueError`` naming the setting (``{name}.kind``, ``{name}.kernel_size``, ...) if ``family``
    cannot be sampled, or if its kernel is larger than images of ``image_shape`` [H, W, C]."""
    if family.kind not in KERNEL_KINDS:
        raise ValueError(f"{name}.kind must be one of {KERNEL_KINDS}, got {family.kind!r}")
    size = family.kernel_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size % 2 == 0:
        raise ValueError(f"{name}.kernel_size must be a positive odd int (a centred support), got {size!r}")
    for field in ("strength", "noise_std"):
        low, high = getattr(family, field)
        if not 0 <= low <= high:
            raise ValueError(f"{name}.{field} must be a range 0 <= low <= high, got {(low, high)}")
    if family.kind == "gaussian" and family.strength[0] <= 0:
        raise ValueError(f"{name}.strength: a Gaussian's std must be > 0, got {family.strength}")
    if family.kind != "gaussian" and family.strength[1] > size - 1:
        raise ValueError(f"{name}.strength: a motion length of {family.strength[1]} px does not fit "
                         f"{name}.kernel_size={size} (at most {size - 1})")
    if not 0 < family.anisotropy <= 1:
        raise ValueError(f"{name}.anisotropy must lie in (0, 1], got {family.anisotropy}")
    if image_shape is not None and size > min(image_shape[0], image_shape[1]):
        raise ValueError(f"{name}.kernel_size={size} is larger than the images ({image_shape[0]} x "
                         f"{image_shape[1]}): the blur would wrap padding into every pixel; use a kernel of at most "
                         f"{min(image_shape[0], image_shape[1])}")


def _kernel_grid(size: int):
    radius = (size - 1) / 2
    coords = jnp.arange(size, dtype=jnp.float32) - radius
    return coords[:, None], coords[None, :]          # rows (y) [k, 1], columns (x) [1, k]


def _splat(points_yx, size: int):
    """Bilinear splat of points [P, 2] (y, x in pixels about the centre) onto a k x k grid, normalised to sum 1.

    k[u, v] = sum_j relu(1 - |u - y_j|) relu(1 - |v - x_j|) / Z: the anti-aliased rasterisation of a curve.
    """
    rows, cols = _kernel_grid(size)
    wy = jax.nn.relu(1.0 - jnp.abs(rows[None] - points_yx[:, 0, None, None]))   # [P, k, 1]
    wx = jax.nn.relu(1.0 - jnp.abs(cols[None] - points_yx[:, 1, None, None]))   # [P, 1, k]
    kernel = jnp.sum(wy * wx, axis=0)
    return kernel / jnp.sum(kernel)


def motion_line_kernels(key, num: int, size: int, length_range) -> jax.Array:
    """``num`` straight-motion kernels [num, k, k]: segments of length L ~ U[length_range], angle ~ U[0, pi)."""
    k_len, k_angle = jax.random.split(key)
    lengths = jax.random.uniform(k_len, (num,), jnp.float32, *length_range)
    angles = jax.random.uniform(k_angle, (num,), jnp.float32, 0.0, math.pi)
    along = jnp.linspace(-0.5, 0.5, SPLAT_POINTS, dtype=jnp.float32)

    def one(length, angle):
        direction = jnp.stack([jnp.sin(angle), jnp.cos(angle)])
        return _splat(along[:, None] * length * direction[None], size)

    return jax.vmap(one)(lengths, angles)


def motion_walk_kernels(key, num: int, size: int, length_range) -> jax.Array:
    """``num`` shaky-motion kernels [num, k, k]: random-walk trajectories of largest extent L ~ U[length_range]."""
    k_len, k_start, k_turns = jax.random.split(key, 3)
    lengths = jax.random.uniform(k_len, (num,), jnp.float32, *length_range)
    start = jax.random.uniform(k_start, (num, 1), jnp.float32, 0.0, 2 * math.pi)
    turns = WALK_TURN_STD * jax.random.normal(k_turns, (num, SPLAT_POINTS - 1), jnp.float32)
    headings = start + jnp.cumsum(turns, axis=1)                                        # [num, P - 1]
    steps = jnp.stack([jnp.sin(headings), jnp.cos(headings)], axis=-1)                   # [num, P - 1, 2]
    path = jnp.concatenate([jnp.zeros((num, 1, 2), jnp.float32), jnp.cumsum(steps, axis=1)], axis=1)
    path = path - 0.5 * (path.max(axis=1, keepdims=True) + path.min(axis=1, keepdims=True))   # box-centred
    extent = jnp.max(path.max(axis=1) - path.min(axis=1), axis=-1)                      # [num]
    path = path * (lengths / jnp.maximum(extent, 1e-6))[:, None, None]
    return jax.vmap(lambda p: _splat(p, size))(path)


def gaussian_kernels(key, num: int, size: int, std_range, anisotropy: float = 1.0) -> jax.Array:
    """``num`` Gaussian kernels [num, k, k]: major std ~ U[std_range], minor = major * U[anisotropy, 1], rotated."""
    k_std, k_ratio, k_angle = jax.random.split(key, 3)
    major = jax.random.uniform(k_std, (num,), jnp.float32, *std_range)
    minor = major * jax.random.uniform(k_ratio, (num,), jnp.float32, anisotropy, 1.0)
    angles = jax.random.uniform(k_angle, (num,), jnp.float32, 0.0, math.pi)
    rows, cols = _kernel_grid(size)

    def one(s1, s2, angle):
        along = rows * jnp.sin(angle) + cols * jnp.cos(angle)
        across = rows * jnp.cos(angle) - cols * jnp.sin(angle)
        kernel = jnp.exp(-0.5 * ((along / s1) ** 2 + (across / s2) ** 2))
        return kernel / jnp.sum(kernel)

    return jax.vmap(one)(major, minor, angles)


def sample_kernels(key, family: BlurFamily, num: int) -> jax.Array:
    """``num`` kernels [num, k, k] of ``family`` (non-negative, each summing to 1)."""
    check_family(family)
    if family.kind == "motion_line":
        return motion_line_kernels(key, num, family.kernel_size, family.strength)
    if family.kind == "motion_walk":
        return motion_walk_kernels(key, num, family.kernel_size, family.strength)
    return gaussian_kernels(key, num, family.kernel_size, family.strength, family.anisotropy)


def blur_images(images, kernels, padding: str = "edge") -> jax.Array:
    """(k * x): each image [B, H, W, C] convolved (true convolution, not correlation) with its kernel [B, k, k].

    Output has the input's shape; borders are extended by ``padding``: "edge" (replicate the border pixel: no
    dark frame on [-1, 1] images) or "zeros" (as ``pix.gaussian_blur``'s "SAME"). Computed as k^2 shifted,
    weighted sums of the padded batch (fused by XLA): with a distinct kernel per image, a grouped
    ``lax.conv_general_dilated`` (B x C groups) took 9.3 ms against 1.1 ms for 64 16 x 16 images and 7 x 7 kernels
    on XLA:CPU (the shared 2-core machine of BENCHMARKS.md); k <= 11 here keeps the unrolled sum short.
    """
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    batch, height, width, channels = images.shape
    size = kernels.shape[-1]
    if kernels.shape != (batch, size, size) or size % 2 == 0:
        raise ValueError(f"kernels must be [B, k, k] with B = {batch} and k odd, got {kernels.shape}")
    if size > min(height, width):
        raise ValueError(f"kernel_size={size} is larger than the images ({height} x {width})")
    radius = size // 2
    pad = ((0, 0), (radius, radius), (radius, radius), (0, 0))
    padded = jnp.pad(images, pad, mode="edge") if padding == "edge" else jnp.pad(images, pad)
    weights = kernels.astype(images.dtype)
    out = jnp.zeros_like(images)
    # (k * x)[p] = sum_q k[q] x[p - q]: the tap at kernel offset (i - r, j - r) reads the padded image shifted the
    # other way, i.e. the window starting at (2r - i, 2r - j).
    for i in range(size):
        for j in range(size):
            window = padded[:, 2 * radius - i:2 * radius - i + height, 2 * radius - j:2 * radius - j + width]
            out = out + weights[:, i, j, None, None, None] * window
    return out


def degrade(key, images, family: BlurFamily, padding: str = "edge"):
    """Eq. (1): (blurry y [B, H, W, C], kernels [B, k, k], noise stds [B]) for sharp ``images`` in [-1, 1]."""
    check_family(family, images.shape[1:])
    k_kernel, k_std, k_noise = jax.random.split(key, 3)
    batch = images.shape[0]
    kernels = sample_kernels(k_kernel, family, batch)
    noise_std = jax.random.uniform(k_std, (batch,), images.dtype, *family.noise_std)
    noise = jax.random.normal(k_noise, images.shape, images.dtype)
    blurry = blur_images(images, kernels, padding) + noise_std[:, None, None, None] * noise
    return blurry, kernels, noise_std


def to_grayscale(images) -> jax.Array:
    """[B, H, W, 1] luma: ``pix.rgb_to_grayscale`` (ITU-R 601) for 3 channels, the identity for 1."""
    channels = images.shape[-1]
    if channels == 1:
        return images
    if channels != 3:
        raise ValueError(f"grayscale needs 1 or 3 channels, got {channels}")
    return pix.rgb_to_grayscale(images)        # [..., 1]; keep_dims=True would repeat it over 3 channels


def downsample(images, factor: int) -> jax.Array:
    """Average pooling by ``factor`` (sides rounded up: odd sides padded with the edge pixel, as for 7 x 7 maps)."""
    if factor == 1:
        return images
    batch, height, width, channels = images.shape
    pad_h, pad_w = (-height) % factor, (-width) % factor
    images = jnp.pad(images, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return images.reshape(batch, (height + pad_h) // factor, factor, (width + pad_w) // factor, factor,
                          channels).mean(axis=(2, 4))


def guidance_targets(sharp, factors) -> tuple:
    """The multiscale structure targets of Ren et al. (Sec. 3.2): the sharp image's grayscale, average-pooled
    by each factor in ``factors`` (e.g. (2, 4) for 1/2 and 1/4 resolution); a tuple of [B, H/f, W/f, 1]."""
    gray = to_grayscale(sharp)
    return tuple(downsample(gray, int(f)) for f in factors)


def _unit_range(images):
    return jnp.clip((jnp.asarray(images, jnp.float32) + 1.0) / 2.0, 0.0, 1.0)


def psnr(restored, sharp) -> jax.Array:
    """Per-image PSNR [B] in dB of [-1, 1] images, ``pix.psnr`` on [0, 1] (10 log10(1 / MSE)); values clipped."""
    return pix.psnr(_unit_range(restored), _unit_range(sharp))


def ssim(restored, sharp, filter_size: int | None = None) -> jax.Array:
    """Per-image SSIM [B] of [-1, 1] images (``pix.ssim`` on [0, 1], Wang et al. 2004).

    ``filter_size`` defaults to pix's 11 for images of side >= 32 and 7 below (window std 1.5 * size / 11), so that
    16 x 16 images keep a 10 x 10 SSIM map rather than 6 x 6.
    """
    side = min(restored.shape[1], restored.shape[2])
    if filter_size is None:
        filter_size = 11 if side >= 32 else 7
    if filter_size > side:
        raise ValueError(f"ssim filter_size={filter_size} exceeds the image side {side}")
    # Standard promotion: pix.ssim adds a Python float to an int32 arange, which strict promotion refuses.
    with jax.numpy_dtype_promotion("standard"):
        return pix.ssim(_unit_range(restored), _unit_range(sharp), filter_size=filter_size,
                        filter_sigma=1.5 * filter_size / 11)
