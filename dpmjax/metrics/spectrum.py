"""Radially averaged power spectra of images and the spectrum error of samples against data: the diagnostic of
Spectral Diffusion (Yang et al., CVPR 2023, arXiv 2211.17106: small diffusion models under-generate high frequencies).

    profile = radial_power_spectrum(images)                 # [K] mean power per radial frequency bin
    report = spectrum_error(samples, data)                  # dict of floats and per-bin arrays

Definition (numpy, float64; images [N, H, W, C], any range -- use the same for samples and data):

    F_nc(ky, kx) = DFT2(x_nc)(ky, kx) / sqrt(H W)          (orthonormal 2D DFT of each image n and channel c)
    P(ky, kx)    = mean_{n, c} |F_nc(ky, kx)|^2            (the mean power spectrum)
    r(ky, kx)    = round(sqrt((ky H0 / H)^2 + (kx H0 / W)^2)),  ky, kx the signed integer frequencies
                   (numpy.fft.fftfreq * side), H0 = min(H, W): radius in cycles per image along the shorter side
    S(k)         = mean_{r(ky, kx) = k} P(ky, kx),  k = 0 .. K - 1     (radial bins; K = round(sqrt2 H0 / 2) + 1)

    per-bin error     e(k) = |log10 S_samples(k) - log10 S_data(k)|  (log10 of a ratio: 0.3 is a factor of 2)
    spectrum_error    = mean_{k >= 1} e(k)                (DC excluded: it is the mean brightness, not a frequency)
    hf_error          = mean_{k >= K_hf} e(k),  K_hf = ceil((K - 1) / 2)  (the high-frequency half of the radii)
    hf_log_ratio      = mean_{k >= K_hf} (log10 S_samples(k) - log10 S_data(k))  (< 0: high frequencies missing)
    hf_share          = sum_{k >= K_hf} S(k) n_k / sum_{k >= 1} S(k) n_k   (n_k frequencies in bin k: the share of
                        the non-DC energy in the high band), for samples and for data

At 8x8, K = 7 (radii 0..6) and the high band is radii 3..6: the 4x4 -> 8x8 octave plus the corners.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["radial_bins", "power_spectrum", "radial_power_spectrum", "spectrum_error"]


def radial_bins(height: int, width: int) -> np.ndarray:
    """int [H, W]: the radial bin r(ky, kx) of each DFT coefficient (unshifted numpy layout)."""
    side = min(height, width)
    ky = np.fft.fftfreq(height) * side
    kx = np.fft.fftfreq(width) * side
    return np.rint(np.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2)).astype(np.int64)


def _as_images(images) -> np.ndarray:
    images = np.asarray(images, np.float64)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[0] < 1:
        raise ValueError(f"images must be [N, H, W, C] (or [N, H, W]) with N >= 1, got shape {images.shape}")
    return images


def power_spectrum(images) -> np.ndarray:
    """float64 [H, W]: P = mean over images and channels of |orthonormal DFT2|^2 (unshifted layout)."""
    images = _as_images(images)
    coeffs = np.fft.fft2(images, axes=(1, 2), norm="ortho")
    return np.mean(np.abs(coeffs) ** 2, axis=(0, 3))


def radial_power_spectrum(images) -> np.ndarray:
    """float64 [K]: S(k), the mean of ``power_spectrum`` over the frequencies of radial bin k (module docstring)."""
    power = power_spectrum(images)
    bins = radial_bins(*power.shape).ravel()
    counts = np.bincount(bins)
    return np.bincount(bins, weights=power.ravel()) / np.maximum(counts, 1)


def spectrum_error(samples, data, eps: float = 1e-12) -> dict:
    """The radially averaged spectrum error of ``samples`` against ``data`` (module docstring for the definition).

    Returns a dict: ``spectrum_error``, ``hf_error``, ``hf_log_ratio``, ``hf_share_samples``, ``hf_share_data``
    (floats), ``hf_from`` (K_hf), ``per_bin`` e(k) [K], ``samples`` / ``data`` S(k) [K]. ``eps`` keeps log10 finite
    for an all-zero bin.
    """
    samples, data = _as_images(samples), _as_images(data)
    if samples.shape[1:] != data.shape[1:]:
        raise ValueError(f"samples {samples.shape[1:]} and data {data.shape[1:]} must have one image shape")
    s_samples, s_data = radial_power_spectrum(samples), radial_power_spectrum(data)
    log_ratio = np.log10(s_samples + eps) - np.log10(s_data + eps)
    num_bins = len(s_data)
    hf_from = max(1, math.ceil((num_bins - 1) / 2))
    counts = np.bincount(radial_bins(*samples.shape[1:3]).ravel())

    def share(profile):
        energy = profile * counts
        return float(energy[hf_from:].sum() / max(energy[1:].sum(), eps))

    return {"spectrum_error": float(np.mean(np.abs(log_ratio[1:]))), "hf_error": float(np.mean(np.abs(log_ratio[hf_from:]))),
            "hf_log_ratio": float(np.mean(log_ratio[hf_from:])), "hf_share_samples": share(s_samples),
            "hf_share_data": share(s_data), "hf_from": hf_from, "per_bin": np.abs(log_ratio), "samples": s_samples,
            "data": s_data}
