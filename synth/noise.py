"""Procedural noise for synthesis: multi-scale Brownian noise, Perlin gradient noise, smooth fields.

Everything is vectorised (numpy random numbers, torch interpolation) and deterministic for a
given ``numpy.random.Generator``. Scales are in millimetres; ``spacing`` converts them to voxels.

- :func:`brownian`: fractional-Brownian-like noise, the sum of random low-resolution lattices
  upsampled trilinearly, amplitude falling with frequency. Lesion shapes (seeds/004 B.6).
- :func:`perlin` / :func:`perlin_at`: Perlin gradient noise (fade-curve interpolation of random
  lattice gradients), summed over octaves, on a grid or only at chosen voxels. Lesion texture.
- :func:`smooth_field`: one smooth random field (bias fields, slow variations).
- :func:`random_label_map`: argmax of 10-20 Brownian maps (seeds/004 C.5 "corrupted" label maps).
- :func:`normal`: fast standard-normal voxel noise (torch generator seeded from the numpy one).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["brownian", "perlin", "perlin_at", "smooth_field", "random_label_map", "normal"]


def normal(shape: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """Standard normal float32 noise of ``shape`` (torch's fast generator, seeded from ``rng``)."""
    g = torch.Generator().manual_seed(int(rng.integers(0, 2**63 - 1)))
    return torch.randn(tuple(int(s) for s in shape), generator=g).numpy()


def _spacing3(spacing) -> np.ndarray:
    return np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,)).astype(np.float64)


def _lattice_octave(shape: Sequence[int], cell_vox: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One octave: a random lattice with about ``cell_vox`` voxels per cell, upsampled trilinearly."""
    n = [max(2, int(math.ceil((s - 1) / max(c, 1.0))) + 1) for s, c in zip(shape, cell_vox)]
    lo = rng.standard_normal(n, dtype=np.float32)
    return F.interpolate(torch.from_numpy(lo)[None, None], size=tuple(shape), mode="trilinear",
                         align_corners=True)[0, 0].numpy()


def brownian(shape: Sequence[int], rng: np.random.Generator, *, spacing=1.0,
             scales_mm: Sequence[float] = (32.0, 16.0, 8.0, 4.0), hurst: float = 0.8) -> np.ndarray:
    """Multi-scale Brownian-like noise: summed upsampled random lattices.

    Args:
        shape: output shape in voxels.
        rng: random generator.
        spacing: voxel size (mm), scalar or per axis.
        scales_mm: lattice cell sizes, coarse to fine.
        hurst: amplitude exponent; octave ``i`` has amplitude ``(scale_i / scale_0) ** hurst``
            (higher = smoother).

    Returns:
        float32 array of ``shape`` with zero mean and unit standard deviation.
    """
    shape = tuple(int(s) for s in shape)
    sp = _spacing3(spacing)
    out = np.zeros(shape, dtype=np.float32)
    s0 = float(scales_mm[0])
    for s in scales_mm:
        out += (float(s) / s0) ** hurst * _lattice_octave(shape, float(s) / sp, rng)
    out -= out.mean()
    sd = float(out.std())
    return out / sd if sd > 0 else out


def smooth_field(shape: Sequence[int], rng: np.random.Generator, *, spacing=1.0,
                 scale_mm: float = 64.0) -> np.ndarray:
    """A smooth zero-mean, unit-variance random field with features about ``scale_mm`` across."""
    return brownian(shape, rng, spacing=spacing, scales_mm=(scale_mm,))


def _fade(t: torch.Tensor) -> torch.Tensor:
    return t * t * t * (t * (t * 6 - 15) + 10)


def _perlin_eval(g: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Perlin noise of lattice gradients ``g`` (nx, ny, nz, 3) at lattice coordinates ``p`` (N, 3)."""
    nx, ny, nz = g.shape[:3]
    i0 = torch.floor(p)
    i0 = torch.minimum(i0.clamp_min(0), torch.tensor([nx - 2, ny - 2, nz - 2], dtype=p.dtype))
    f = p - i0
    i0 = i0.long()
    u = _fade(f)
    gf = g.reshape(-1, 3)
    base = (i0[:, 0] * ny + i0[:, 1]) * nz + i0[:, 2]
    out = torch.zeros(p.shape[0], dtype=torch.float32)
    for cx in (0, 1):
        wx = u[:, 0] if cx else 1 - u[:, 0]
        for cy in (0, 1):
            wxy = wx * (u[:, 1] if cy else 1 - u[:, 1])
            for cz in (0, 1):
                w = wxy * (u[:, 2] if cz else 1 - u[:, 2])
                gg = gf.index_select(0, base + (cx * ny + cy) * nz + cz)
                dot = gg[:, 0] * (f[:, 0] - cx) + gg[:, 1] * (f[:, 1] - cy) + gg[:, 2] * (f[:, 2] - cz)
                out += w * dot
    return out


def _perlin_lattices(shape, sp, rng, scale_mm, octaves):
    lat = []
    for o in range(octaves):
        cell = np.maximum(scale_mm / 2 ** o / sp, 1.5)
        n = [int(math.ceil(s / c)) + 2 for s, c in zip(shape, cell)]
        g = torch.from_numpy(rng.standard_normal((*n, 3), dtype=np.float32))
        g = g / g.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        lat.append((g, torch.from_numpy(cell.astype(np.float32)), torch.from_numpy(rng.random(3).astype(np.float32))))
    return lat


# Standard deviation of one octave of 3D Perlin noise with unit gradients (measured).
_PERLIN_SD = 0.193


def perlin_at(points, shape: Sequence[int], rng: np.random.Generator, *, spacing=1.0, scale_mm: float = 8.0,
              octaves: int = 3, persistence: float = 0.5) -> np.ndarray:
    """Perlin noise of a ``shape`` grid evaluated only at voxel ``points`` (N, 3).

    Same lattice as :func:`perlin` for the same ``rng`` state, but only N evaluations (fast for
    sparse regions such as lesion interiors). Normalised by the theoretical standard deviation,
    so values do not depend on which points are asked for.
    """
    sp = _spacing3(spacing)
    pts = torch.as_tensor(np.asarray(points, dtype=np.float32))
    out = torch.zeros(pts.shape[0], dtype=torch.float32)
    norm = 0.0
    for o, (g, cell, off) in enumerate(_perlin_lattices(tuple(shape), sp, rng, scale_mm, octaves)):
        out += persistence ** o * _perlin_eval(g, pts / cell + off)
        norm += persistence ** (2 * o)
    return (out / (_PERLIN_SD * math.sqrt(norm))).numpy()


def perlin(shape: Sequence[int], rng: np.random.Generator, *, spacing=1.0, scale_mm: float = 8.0,
           octaves: int = 3, persistence: float = 0.5) -> np.ndarray:
    """Perlin gradient noise on a grid, summed over octaves (each octave half the cell size).

    Args:
        shape: output shape in voxels.
        rng: random generator.
        spacing: voxel size (mm), scalar or per axis.
        scale_mm: cell size of the coarsest octave.
        octaves: number of octaves.
        persistence: amplitude ratio between successive octaves.

    Returns:
        float32 array of ``shape``, zero mean and about unit standard deviation.
    """
    shape = tuple(int(s) for s in shape)
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij")
    pts = torch.stack(grids, -1).reshape(-1, 3).numpy()
    return perlin_at(pts, shape, rng, spacing=spacing, scale_mm=scale_mm, octaves=octaves,
                     persistence=persistence).reshape(shape)


def random_label_map(shape: Sequence[int], rng: np.random.Generator, *, spacing=1.0,
                     n_labels: tuple[int, int] = (10, 20), scales_mm=(48.0, 24.0, 12.0)) -> np.ndarray:
    """A random label map: each voxel takes the index of the largest of 10-20 Brownian maps.

    Used for "corrupted" images with no brain anatomy (seeds/004 C.5). Labels are 1..n (int32).
    """
    n = int(rng.integers(n_labels[0], n_labels[1] + 1))
    best = np.full(tuple(shape), -np.inf, dtype=np.float32)
    lab = np.zeros(tuple(shape), dtype=np.int32)
    for k in range(1, n + 1):
        b = brownian(shape, rng, spacing=spacing, scales_mm=scales_mm)
        sel = b > best
        best[sel] = b[sel]
        lab[sel] = k
    return lab
