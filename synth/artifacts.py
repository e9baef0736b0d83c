"""Acquisition artifacts for synthetic images: bias field, blur, gamma, k-space ghosting and spikes, noise.

The subject builder applies :func:`corrupt` on the labels grid (after lesions are painted), resamples
to the acquisition grid, then calls :func:`add_noise` (noise must be white on the acquisition grid).

MR images stay non-negative. CT (Hounsfield units) gets no bias field, gamma or k-space artifacts
(they have no CT counterpart); it is only blurred, and its noise is Gaussian in HU.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import scipy.ndimage as ndi

from .noise import normal, smooth_field

__all__ = ["corrupt", "add_noise", "gaussian_blur", "bias_field", "gamma", "ghosting", "spikes"]


def gaussian_blur(image: np.ndarray, sigma_vox) -> np.ndarray:
    """Separable Gaussian blur (``sigma_vox`` voxels, scalar or per axis; edges replicated)."""
    sig = np.broadcast_to(np.asarray(sigma_vox, dtype=np.float64), (3,))
    out = np.asarray(image, dtype=np.float32)
    for ax, s in enumerate(sig):
        if s >= 0.05:
            out = ndi.gaussian_filter1d(out, float(s), axis=ax, mode="nearest", truncate=3.0)
    return out


def bias_field(shape: Sequence[int], rng: np.random.Generator, spacing, strength: float = 0.2) -> np.ndarray:
    """A smooth multiplicative field ``exp(strength * N)`` with features 50-120 mm across."""
    scale = float(rng.uniform(50.0, 120.0))
    return np.exp(strength * smooth_field(shape, rng, spacing=spacing, scale_mm=scale)).astype(np.float32)


def gamma(image: np.ndarray, g: float) -> np.ndarray:
    """Exponential intensity scaling ``max * (x / max) ** g`` (non-negative images)."""
    hi = float(image.max())
    if hi <= 0:
        return image
    t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    return (t.clamp_min(0).div(hi).pow(g).mul(hi)).numpy()


def ghosting(image: np.ndarray, rng: np.random.Generator, axis: int, amplitude: float) -> np.ndarray:
    """Motion-like ghosts: a periodic phase error on k-space lines along the phase-encode ``axis``."""
    k = torch.fft.fft(torch.from_numpy(image.astype(np.float32)), dim=axis)
    n = image.shape[axis]
    period = int(rng.integers(2, 5))
    phase = torch.zeros(n)
    phase[int(rng.integers(0, period))::period] = float(rng.uniform(0.5, 1.0)) * math.pi * amplitude * 4
    shape = [1, 1, 1]
    shape[axis] = n
    k = k * torch.polar(torch.ones(n), phase).view(shape)
    return torch.fft.ifft(k, dim=axis).abs().numpy().astype(np.float32)


def spikes(image: np.ndarray, rng: np.random.Generator, n: int = 1, amplitude: float = 1.0) -> np.ndarray:
    """Herringbone stripes: ``n`` spurious spikes in 3D k-space (each ``amplitude`` × the DC term / 50)."""
    k = torch.fft.fftn(torch.from_numpy(image.astype(np.float32)))
    dc = float(k[0, 0, 0].abs())
    for _ in range(n):
        idx = tuple(int(rng.integers(-s // 4, s // 4)) % s for s in image.shape)
        k[idx] += dc / 50.0 * amplitude * complex(np.exp(1j * rng.uniform(0, 2 * np.pi)))
    return torch.fft.ifftn(k).abs().numpy().astype(np.float32)


def corrupt(image: np.ndarray, contrast: str, rng: np.random.Generator, spacing, *,
            strength: float = 1.0) -> np.ndarray:
    """Random acquisition artifacts on a synthesized image (same grid, float32).

    MR: bias field (p 0.9), ghosting (p 0.2), spikes (p 0.05), blur (p 0.5), gamma (p 0.7),
    each scaled by ``strength`` (0 = none). ADC (a quantitative map) gets no bias field or gamma.
    CT: blur only.

    Args:
        image: synthesized image (labels grid).
        contrast: one of ``synth.contrast.CONTRASTS``.
        rng: random generator.
        spacing: voxel size in mm (scalar or per axis).
        strength: artifact strength multiplier.
    """
    out = np.asarray(image, dtype=np.float32).copy()
    if strength <= 0:
        return out
    sp = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,))
    mr = contrast != "ct"
    quantitative = contrast in ("adc", "ct")
    if mr and not quantitative and rng.random() < 0.9:
        out *= bias_field(out.shape, rng, sp, float(rng.uniform(0.05, 0.3)) * strength)
    if mr and rng.random() < 0.2 * strength:
        out = ghosting(out, rng, int(rng.integers(0, 2)), float(rng.uniform(0.02, 0.08)) * strength)
    if mr and rng.random() < 0.05 * strength:
        out = spikes(out, rng, int(rng.integers(1, 3)), float(rng.uniform(0.5, 2.0)) * strength)
    if rng.random() < 0.5:
        sig_mm = rng.uniform(0.0, 1.2, size=3) * strength
        out = gaussian_blur(out, sig_mm / sp)
    if mr and not quantitative and rng.random() < 0.7:
        out = gamma(np.clip(out, 0, None), float(np.exp(np.clip(rng.normal(0, 0.12 * strength), -0.3, 0.3))))
    if mr:
        np.clip(out, 0, None, out=out)
    return out.astype(np.float32)


def add_noise(image: np.ndarray, rng: np.random.Generator, level: float, *, contrast: str | None = None) -> np.ndarray:
    """Adds acquisition noise (call after resampling to the acquisition grid).

    MR: Rician noise (magnitude of complex Gaussian) with sigma = ``level`` × the 99th percentile.
    CT: Gaussian noise with sigma = ``level`` × 100 HU (level 0.05 → 5 HU). With ``contrast=None``,
    an image reaching below -500 (air in HU) is taken as CT.
    """
    x = np.asarray(image, dtype=np.float32)
    is_ct = contrast == "ct" if contrast is not None else float(x.min()) < -500
    if level <= 0:
        return x.copy()
    if is_ct:
        return (x + normal(x.shape, rng) * np.float32(100.0 * level)).astype(np.float32)
    sigma = np.float32(level * max(float(np.percentile(x[::2, ::2, ::2], 99)), 1e-6))
    re = x + normal(x.shape, rng) * sigma
    im = normal(x.shape, rng) * sigma
    return np.sqrt(re * re + im * im).astype(np.float32)
