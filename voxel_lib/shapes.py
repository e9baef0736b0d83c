"""Analytic shapes rasterised on any grid in world space (for tests, benchmarks and phantoms).

With ``supersample=1`` a voxel is inside when its centre is (a binary label mask). With
``supersample=k > 1`` each voxel near the boundary is sampled at k sub-positions per axis
(proportionally more along thicker axes) and the
result is a partial-volume image in [0, 1] whose sum × voxel volume approximates the exact
volume closely even on coarse grids.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .volume import Volume


def _inside_sphere(center, radius):
    c = np.asarray(center, dtype=np.float64)

    def f(p):
        return ((p - c) ** 2).sum(-1) <= radius**2
    return f


def _inside_ellipsoid(center, radii, rotation):
    c = np.asarray(center, dtype=np.float64)
    r = np.asarray(radii, dtype=np.float64)
    rot = np.eye(3) if rotation is None else np.asarray(rotation, dtype=np.float64)[:3, :3]

    def f(p):
        q = (p - c) @ rot  # world -> shape frame (rotation columns are the shape axes)
        return ((q / r) ** 2).sum(-1) <= 1.0
    return f


def _inside_box(center, size, rotation):
    c = np.asarray(center, dtype=np.float64)
    h = np.asarray(size, dtype=np.float64) / 2
    rot = np.eye(3) if rotation is None else np.asarray(rotation, dtype=np.float64)[:3, :3]

    def f(p):
        q = (p - c) @ rot
        return (np.abs(q) <= h).all(-1)
    return f


def rasterize(inside: Callable[[np.ndarray], np.ndarray], shape, affine, supersample: int = 1) -> Volume:
    """Rasterises an implicit shape ``inside(points (..., 3) world mm) -> bool`` onto a grid."""
    shape = tuple(int(s) for s in shape)
    affine = np.asarray(affine, dtype=np.float64)
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), -1)
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    centre_in = inside(world)
    if supersample <= 1:
        return Volume(torch.from_numpy(centre_in.astype(np.uint8)), affine, "label")
    # k sub-samples along the finest axis, proportionally more along thicker ones
    sp = np.linalg.norm(affine[:3, :3], axis=0)
    ks = [int(np.ceil(supersample * s / sp.min() - 1e-9)) for s in sp]
    offs = [(np.arange(k) + 0.5) / k - 0.5 for k in ks]
    sub = np.stack(np.meshgrid(*offs, indexing="ij"), -1).reshape(-1, 3)
    # only voxels whose neighbourhood is mixed need sub-sampling
    import scipy.ndimage as ndi
    full = ndi.generate_binary_structure(3, 3)
    edge = ndi.binary_dilation(centre_in, full) & ~ndi.binary_erosion(centre_in, full, border_value=1)
    frac = centre_in.astype(np.float32)
    pts = np.argwhere(edge).astype(np.float64)
    chunk = max(1, 2_000_000 // len(sub))
    for s in range(0, len(pts), chunk):
        p = pts[s:s + chunk]
        q = (p[:, None, :] + sub[None]) @ affine[:3, :3].T + affine[:3, 3]
        frac[tuple(p.astype(int).T)] = inside(q).mean(1)
    return Volume(torch.from_numpy(frac), affine, "image")


def sphere(shape, affine, center, radius: float, supersample: int = 1) -> Volume:
    """A sphere of ``radius`` mm centred at world ``center`` (RAS mm)."""
    return rasterize(_inside_sphere(center, radius), shape, affine, supersample)


def ellipsoid(shape, affine, center, radii, rotation=None, supersample: int = 1) -> Volume:
    """An ellipsoid with semi-axes ``radii`` (mm), optionally rotated (3x3 or 4x4 matrix)."""
    return rasterize(_inside_ellipsoid(center, radii, rotation), shape, affine, supersample)


def box(shape, affine, center, size, rotation=None, supersample: int = 1) -> Volume:
    """A box of edge lengths ``size`` (mm), optionally rotated."""
    return rasterize(_inside_box(center, size, rotation), shape, affine, supersample)
