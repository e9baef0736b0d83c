"""PNG previews of output volumes: three orthogonal slices (sagittal, coronal, axial) in RAS.

A mask is drawn as a red overlay (filled, with its outline) on an image through the mask's centre
of mass; an image output (a crop, an image with tissue removed) is drawn on its own, through its
centre. Views are in neurological convention (the subject's right on the right), with the world
orientation written on the panels, so left and right come from the affine, never from array order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import voxel_lib as vl


def _ras(v: vl.Volume) -> vl.Volume:
    return v if v.orientation == "RAS" else v.reorient("RAS")


def _slices(arr: np.ndarray, ijk) -> list[np.ndarray]:
    i, j, k = (int(round(x)) for x in ijk)
    return [arr[i, :, :], arr[:, j, :], arr[:, :, k]]


def save_preview(path: str | Path, mask: vl.Volume | None = None, image: vl.Volume | None = None,
                 title: str | None = None, dpi: int = 90) -> Path:
    """Writes a three-view PNG of ``mask`` over ``image`` (either may be omitted, not both).

    Args:
        path: the PNG file to write.
        mask: a binary or soft mask (any grid; resampled onto the image's grid in world space).
        image: the background image (any grid); the mask alone is drawn if omitted.
        title: a line above the views.
    """
    if mask is None and image is None:
        raise ValueError("save_preview needs a mask or an image")
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    ref = image if image is not None else mask
    base = _ras(ref)
    img = base.tensor[0].float().numpy() if image is not None else None
    m = None
    if mask is not None:
        mk = mask if mask.is_label else mask.threshold(0.5)
        if not mk.same_grid(ref):      # onto the image's grid (world space), then the same reorientation
            mk = mk.resample_like(ref, mode="nearest")
        m = (_ras(mk).tensor[0] > 0).numpy()
    if m is not None and m.any():
        centre = np.argwhere(m).mean(0)
    elif img is not None:
        nz = np.argwhere(np.abs(img) > 0)
        centre = nz.mean(0) if len(nz) else (np.array(base.shape) - 1) / 2
    else:
        centre = (np.array(base.shape) - 1) / 2
    sp = base.spacing
    views = [("sagittal", (sp[1], sp[2]), "A", "P"), ("coronal", (sp[0], sp[2]), "R", "L"),
             ("axial", (sp[0], sp[1]), "R", "L")]
    if img is not None:
        lo, hi = np.percentile(img[np.isfinite(img)], [1, 99.5]) if img.size else (0, 1)
        if hi <= lo:
            hi = lo + 1
    fig, axes = plt.subplots(1, 3, figsize=(10.5, 3.8), dpi=dpi)
    fig.patch.set_facecolor("black")
    islices = _slices(img, centre) if img is not None else [None] * 3
    mslices = _slices(m, centre) if m is not None else [None] * 3
    for ax, (name, (sx, sy), right, left), isl, msl in zip(axes, views, islices, mslices):
        ax.set_facecolor("black")
        extent_aspect = sy / sx
        if isl is not None:
            ax.imshow(isl.T, origin="lower", cmap="gray", vmin=lo, vmax=hi, aspect=extent_aspect,
                      interpolation="nearest")
        if msl is not None:
            over = np.ma.masked_where(~msl.T, msl.T.astype(float))
            ax.imshow(over, origin="lower", cmap="autumn", alpha=0.45 if isl is not None else 1.0,
                      aspect=extent_aspect, interpolation="nearest", vmin=0, vmax=1)
            if msl.any() and msl.shape[0] > 1 and msl.shape[1] > 1:
                ax.contour(msl.T.astype(float), levels=[0.5], colors="red", linewidths=0.8)
        ax.set_title(name, color="white", fontsize=9)
        ax.text(0.98, 0.5, right, color="yellow", fontsize=8, transform=ax.transAxes, ha="right", va="center")
        ax.text(0.02, 0.5, left, color="yellow", fontsize=8, transform=ax.transAxes, ha="left", va="center")
        ax.axis("off")
    if title:
        fig.suptitle(title, color="white", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, facecolor=fig.get_facecolor())
    plt.close(fig)
    return path


def background_for(output: vl.Volume, inputs: list) -> vl.Volume | None:
    """The input volume to draw a mask on: one on the same grid if any, else the first input."""
    vols = [getattr(i, "volume", i) for i in inputs]
    for v in vols:
        if v is not None and v.same_grid(output):
            return v
    return vols[0] if vols else None


def is_mask(v: vl.Volume) -> bool:
    """True for label volumes holding only 0 and 1 (an output mask rather than an image)."""
    if not v.is_label:
        return False
    t = v.tensor
    return bool(((t == 0) | (t == 1)).all()) if t.numel() else True


def preview_output(path: str | Path, output: vl.Volume, inputs: list, title: str | None = None) -> Path:
    """The PNG of one output volume: a mask over its input, or an image on its own."""
    if is_mask(output):
        return save_preview(path, mask=output, image=background_for(output, inputs), title=title)
    if output.is_label:   # a label map: overlay its non-zero voxels
        return save_preview(path, mask=output.new((output.tensor > 0).to(torch.uint8)),
                            image=background_for(output, inputs), title=title)
    return save_preview(path, image=output, title=title)
