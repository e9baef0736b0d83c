"""World-space resampling onto an arbitrary grid (torch ``grid_sample``, processed in slabs)."""

from __future__ import annotations

import numpy as np
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F

_SLAB_BYTES = 256 * 2**20  # sampling-grid memory per slab


def resample_to_grid(vol, shape: tuple[int, int, int], affine: torch.Tensor, mode: str,
                     antialias: bool = True) -> torch.Tensor:
    """Samples ``vol`` at the voxel centres of the grid (``shape``, ``affine``).

    Returns a tensor ``(C, *shape)``: float32 for images, the input dtype for labels (nearest).
    Points outside the source field of view are 0.
    """
    if mode not in ("linear", "nearest"):
        raise ValueError(f"mode must be 'linear' or 'nearest', got {mode!r}")
    src_inv = torch.linalg.inv(vol.affine)
    m = (src_inv @ affine)  # target voxel -> source voxel (float64)
    src = vol.tensor.detach()
    out_dtype = src.dtype if mode == "nearest" else torch.float32
    if src.dtype == torch.float64:
        work = src
    else:
        work = src.float()
    if antialias and mode == "linear":
        factors = np.linalg.norm(m[:3, :3].numpy(), axis=1)  # target voxel size in source voxels
        sigma = np.maximum(0.0, (factors - 1.0) / 2.0)
        if (sigma > 0.05).any():
            arr = work.cpu().numpy()
            arr = np.stack([ndi.gaussian_filter(c, sigma=sigma, mode="nearest") for c in arr])
            work = torch.from_numpy(arr)
    n_src = torch.tensor(vol.shape, dtype=torch.float64)
    denom = torch.clamp(n_src - 1, min=1)
    X, Y, Z = shape
    per_plane = Y * Z * 3 * 8
    slab = max(1, int(_SLAB_BYTES // max(per_plane, 1)))
    out = torch.empty((vol.channels, X, Y, Z), dtype=out_dtype)
    jj, kk = torch.meshgrid(torch.arange(Y, dtype=torch.float64), torch.arange(Z, dtype=torch.float64),
                            indexing="ij")
    inp = work.unsqueeze(0).to(torch.float32 if work.dtype != torch.float64 else torch.float64)
    for x0 in range(0, X, slab):
        x1 = min(X, x0 + slab)
        ii = torch.arange(x0, x1, dtype=torch.float64).view(-1, 1, 1).expand(-1, Y, Z)
        j = jj.unsqueeze(0).expand(x1 - x0, Y, Z)
        k = kk.unsqueeze(0).expand(x1 - x0, Y, Z)
        pts = [m[r, 0] * ii + m[r, 1] * j + m[r, 2] * k + m[r, 3] for r in range(3)]
        valid = None
        for r in range(3):
            if vol.shape[r] == 1:  # grid_sample cannot tell inside from outside on a 1-voxel axis
                v = pts[r].abs() <= 0.5
                valid = v if valid is None else valid & v
        norm = [(2 * pts[r] / denom[r] - 1) for r in range(3)]
        grid = torch.stack([norm[2], norm[1], norm[0]], dim=-1).unsqueeze(0).to(inp.dtype)
        res = F.grid_sample(inp, grid, mode="bilinear" if mode == "linear" else "nearest",
                            padding_mode="zeros", align_corners=True)[0]
        if valid is not None:
            res = res * valid.unsqueeze(0).to(res.dtype)
        if mode == "nearest" and not out_dtype.is_floating_point:
            res = torch.round(res)
        out[:, x0:x1] = res.to(out_dtype)
    return out
