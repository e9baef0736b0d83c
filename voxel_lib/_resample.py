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
    n_src = np.asarray(vol.shape, dtype=np.float64)
    X, Y, Z = shape
    per_plane = Y * Z * 3 * 4
    slab = max(1, int(_SLAB_BYTES // max(per_plane, 1)))
    out = torch.empty((vol.channels, X, Y, Z), dtype=out_dtype)
    inp = work.unsqueeze(0).to(torch.float32 if work.dtype != torch.float64 else torch.float64)
    m_np = m.numpy()
    # source voxel index -> normalised coordinate (align_corners=True); 1-voxel axes map to 0
    s_src = np.eye(4)
    for r in range(3):
        d = max(n_src[r] - 1, 1.0)
        s_src[r, r] = 2.0 / d
        s_src[r, 3] = -1.0 if n_src[r] > 1 else 0.0
    rev = [2, 1, 0]  # grid_sample's coordinate order is (W, H, D) = (z, y, x)
    for x0 in range(0, X, slab):
        x1 = min(X, x0 + slab)
        n_tgt = np.array([x1 - x0, Y, Z], dtype=np.float64)
        # normalised target coordinate -> target voxel index (this slab starts at x0)
        t_tgt = np.eye(4)
        for r in range(3):
            t_tgt[r, r] = (n_tgt[r] - 1) / 2.0
            t_tgt[r, 3] = (n_tgt[r] - 1) / 2.0 + (x0 if r == 0 else 0)
        theta = (s_src @ m_np @ t_tgt)[:3]
        theta = theta[rev][:, rev + [3]]
        grid = F.affine_grid(torch.from_numpy(theta).to(inp.dtype).unsqueeze(0),
                             [1, 1, x1 - x0, Y, Z], align_corners=True)
        res = F.grid_sample(inp, grid, mode="bilinear" if mode == "linear" else "nearest",
                            padding_mode="zeros", align_corners=True)[0]
        if (n_src == 1).any():  # grid_sample cannot tell inside from outside on a 1-voxel axis
            idx = np.stack(np.meshgrid(np.arange(x0, x1), np.arange(Y), np.arange(Z), indexing="ij"), -1)
            src_idx = idx @ m_np[:3, :3].T + m_np[:3, 3]
            valid = np.ones(idx.shape[:3], bool)
            for r in range(3):
                if n_src[r] == 1:
                    valid &= np.abs(src_idx[..., r]) <= 0.5
            res = res * torch.from_numpy(valid).unsqueeze(0).to(res.dtype)
        if mode == "nearest" and not out_dtype.is_floating_point:
            res = torch.round(res)
        out[:, x0:x1] = res.to(out_dtype)
    return out
