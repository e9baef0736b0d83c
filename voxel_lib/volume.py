"""The :class:`Volume`: a tensor ``(C, X, Y, Z)`` plus its voxel-to-world affine (RAS, mm).

Every operation returns a new volume; the geometry (affine) is carried through all of them,
so measurements are always in world millimetres and left/right always come from the affine.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import nibabel.orientations as nio
import numpy as np
import torch

from .errors import AffineError, DimensionError, EmptyAxisError, GeometryError

KINDS = ("image", "label")


def _as_affine(affine) -> torch.Tensor:
    a = torch.as_tensor(np.asarray(affine, dtype=np.float64) if not torch.is_tensor(affine) else affine)
    a = a.detach().to("cpu", torch.float64).clone()
    if a.shape == (3, 4):
        a = torch.cat([a, torch.tensor([[0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)])
    if a.shape != (4, 4):
        raise AffineError(f"affine must be 4x4, got shape {tuple(a.shape)}")
    if not torch.isfinite(a).all():
        raise AffineError("affine contains NaN or Inf", fix="fix the header's sform/qform")
    if abs(float(torch.linalg.det(a[:3, :3]))) < 1e-12:
        raise AffineError("affine is singular (zero voxel size or collinear axes)",
                          fix="fix the header's pixdim/sform")
    return a


class Volume:
    """A 3D image or label map with its geometry.

    Args:
        data: array or tensor of shape ``(X, Y, Z)`` (one channel) or ``(C, X, Y, Z)``.
        affine: 4x4 voxel-index -> world RAS (mm) matrix; identity (1 mm, RAS) if omitted.
        kind: ``"image"`` (intensities, linear interpolation) or ``"label"`` (integer labels or
            binary masks, nearest-neighbour interpolation). Inferred if omitted: integer and
            boolean data are labels, floating data are images.
        header: an optional nibabel header, kept for a faithful round trip on save.

    Example:
        >>> import torch, voxel_lib as vl
        >>> v = vl.Volume(torch.zeros(10, 10, 10), affine=torch.diag(torch.tensor([2., 2., 2., 1.])))
        >>> v.spacing
        (2.0, 2.0, 2.0)
    """

    __array_priority__ = 1000

    def __init__(self, data, affine=None, kind: str | None = None, header=None):
        t = data if torch.is_tensor(data) else torch.as_tensor(np.asarray(data))
        if t.dtype == torch.bool:
            t = t.to(torch.uint8)
            kind = kind or "label"
        if t.ndim == 3:
            t = t.unsqueeze(0)
        if t.ndim != 4:
            raise DimensionError(f"volume data must be 3D (X, Y, Z) or 4D (C, X, Y, Z), got {t.ndim}D "
                                 f"shape {tuple(t.shape)}")
        if min(t.shape) == 0:
            raise EmptyAxisError(f"volume has a zero-length axis: shape {tuple(t.shape)}")
        if kind is None:
            kind = "image" if t.is_floating_point() else "label"
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.tensor: torch.Tensor = t
        self.affine: torch.Tensor = _as_affine(torch.eye(4, dtype=torch.float64) if affine is None else affine)
        self.kind: str = kind
        self.header = header

    # ------------------------------------------------------------------ basics
    def new(self, data, affine=None, kind: str | None = None) -> "Volume":
        """A volume with new data and (by default) this volume's geometry and kind."""
        return Volume(data, self.affine if affine is None else affine, kind or self.kind, self.header)

    def __repr__(self) -> str:
        sp = "×".join(f"{s:.3g}" for s in self.spacing)
        return (f"Volume({self.kind}, shape={self.shape}, channels={self.channels}, spacing={sp} mm, "
                f"orientation={self.orientation}, dtype={str(self.tensor.dtype).replace('torch.', '')})")

    @property
    def is_label(self) -> bool:
        """True for label maps and binary masks."""
        return self.kind == "label"

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape ``(X, Y, Z)`` in voxels."""
        return tuple(int(s) for s in self.tensor.shape[1:])

    @property
    def channels(self) -> int:
        """Number of channels C."""
        return int(self.tensor.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        return self.tensor.dtype

    @property
    def device(self) -> torch.device:
        return self.tensor.device

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size along each voxel axis, in mm."""
        return tuple(float(s) for s in torch.linalg.norm(self.affine[:3, :3], dim=0))

    @property
    def voxel_volume(self) -> float:
        """Volume of one voxel in mm³ (|det| of the affine's linear part)."""
        return abs(float(torch.linalg.det(self.affine[:3, :3])))

    @property
    def orientation(self) -> str:
        """Axis code such as ``"RAS"`` or ``"LIA"``: the world direction each voxel axis increases toward."""
        return "".join(nio.aff2axcodes(self.affine.numpy()))

    @property
    def origin(self) -> tuple[float, float, float]:
        """World RAS position (mm) of the centre of voxel (0, 0, 0)."""
        return tuple(float(v) for v in self.affine[:3, 3])

    @property
    def fov(self) -> tuple[float, float, float]:
        """Field of view along each voxel axis, in mm (shape × spacing)."""
        return tuple(n * s for n, s in zip(self.shape, self.spacing))

    @property
    def center(self) -> tuple[float, float, float]:
        """World RAS position (mm) of the centre of the grid."""
        c = torch.tensor([(n - 1) / 2 for n in self.shape] + [1.0], dtype=torch.float64)
        return tuple(float(v) for v in (self.affine @ c)[:3])

    def to(self, device=None, dtype=None) -> "Volume":
        """Moves the data to a device and/or dtype (the affine stays float64 on the CPU)."""
        return self.new(self.tensor.to(device=device, dtype=dtype))

    def float(self) -> "Volume":
        """The data as float32 (kind unchanged)."""
        return self.new(self.tensor.float())

    def numpy(self) -> np.ndarray:
        """The data as a numpy array of shape ``(C, X, Y, Z)``."""
        return self.tensor.detach().cpu().numpy()

    def as_label(self) -> "Volume":
        """The same data marked as a label map (nearest-neighbour resampling)."""
        return self.new(self.tensor, kind="label")

    def as_image(self) -> "Volume":
        """The same data marked as an intensity image (linear resampling)."""
        return self.new(self.tensor.float(), kind="image")

    def channel(self, c: int) -> "Volume":
        """One channel as a single-channel volume."""
        return self.new(self.tensor[c:c + 1])

    # -------------------------------------------------------------- coordinates
    def voxel_to_world(self, ijk) -> np.ndarray:
        """Maps voxel indices ``(..., 3)`` to world RAS mm."""
        p = np.asarray(ijk, dtype=np.float64)
        a = self.affine.numpy()
        return p @ a[:3, :3].T + a[:3, 3]

    def world_to_voxel(self, xyz) -> np.ndarray:
        """Maps world RAS mm ``(..., 3)`` to (fractional) voxel indices."""
        p = np.asarray(xyz, dtype=np.float64)
        inv = np.linalg.inv(self.affine.numpy())
        return p @ inv[:3, :3].T + inv[:3, 3]

    def same_grid(self, other: "Volume", atol: float = 1e-4) -> bool:
        """True when both volumes have the same spatial shape and affine."""
        return self.shape == other.shape and bool(torch.allclose(self.affine, other.affine, atol=atol))

    # --------------------------------------------------------------- arithmetic
    def _other(self, other):
        if isinstance(other, Volume):
            if not self.same_grid(other):
                raise GeometryError("volumes are on different grids; resample one with "
                                    "`a.resample_like(b)` first")
            return other.tensor
        return other

    def __add__(self, o): return self.new(self.tensor + self._other(o), kind="image")
    def __radd__(self, o): return self.__add__(o)
    def __sub__(self, o): return self.new(self.tensor - self._other(o), kind="image")
    def __rsub__(self, o): return self.new(self._other(o) - self.tensor, kind="image")
    def __mul__(self, o): return self.new(self.tensor * self._other(o), kind="image")
    def __rmul__(self, o): return self.__mul__(o)
    def __truediv__(self, o): return self.new(self.tensor / self._other(o), kind="image")
    def __neg__(self): return self.new(-self.tensor, kind="image")

    # ------------------------------------------------------------------- labels
    def select(self, labels: int | Iterable[int]) -> "Volume":
        """A binary mask (uint8 label volume) of the voxels whose label is in ``labels``."""
        labels = [labels] if isinstance(labels, (int, np.integer)) else list(labels)
        t = self.tensor[:1]
        m = torch.zeros_like(t, dtype=torch.bool)
        for lab in labels:
            m |= t == lab
        return self.new(m.to(torch.uint8), kind="label")

    def threshold(self, value: float = 0.5) -> "Volume":
        """A binary mask of the voxels strictly above ``value`` (e.g. a soft segmentation at 0.5)."""
        return self.new((self.tensor[:1] > value).to(torch.uint8), kind="label")

    def labels(self) -> list[int]:
        """The distinct non-zero labels present."""
        return [int(v) for v in torch.unique(self.tensor) if v != 0]

    # -------------------------------------------------------------- orientation
    def reorient(self, orientation: str = "RAS") -> "Volume":
        """Reorders and flips the voxel axes so they point toward ``orientation`` (e.g. ``"RAS"``).

        Only permutations and flips: no interpolation, the data are unchanged and the world
        position of every voxel is kept.
        """
        orientation = orientation.upper()
        if len(orientation) != 3 or sorted(orientation.replace("L", "R").replace("P", "A").replace("I", "S")) != ["A", "R", "S"]:
            raise ValueError(f"orientation must name each of L/R, A/P, I/S once, got {orientation!r}")
        src = nio.io_orientation(self.affine.numpy())
        dst = nio.axcodes2ornt(tuple(orientation))
        tr = nio.ornt_transform(src, dst)
        if np.array_equal(tr, [[0, 1], [1, 1], [2, 1]]):
            return self.new(self.tensor)
        t = self.tensor
        for ax, flip in enumerate(tr[:, 1]):
            if flip == -1:
                t = torch.flip(t, dims=(ax + 1,))
        t = t.permute(0, *[int(np.where(tr[:, 0] == i)[0][0]) + 1 for i in range(3)]).contiguous()
        aff = self.affine.numpy() @ nio.inv_ornt_aff(tr, self.shape)
        return Volume(t, aff, self.kind, self.header)

    # --------------------------------------------------------------- resampling
    def resample(self, spacing: float | Sequence[float] | None = None, *, like: "Volume | None" = None,
                 shape=None, affine=None, mode: str | None = None, antialias: bool = True) -> "Volume":
        """Resamples in world space.

        Give one of: ``spacing`` (mm; same field of view, same orientation), ``like`` (another
        volume's grid), or ``shape`` + ``affine`` (an explicit grid).

        Args:
            mode: ``"linear"`` (images' default) or ``"nearest"`` (labels' default).
            antialias: Gaussian pre-filter when an image is downsampled (sigma = (factor - 1) / 2
                voxels per axis, as in scikit-image).
        """
        if like is not None:
            shape, affine = like.shape, like.affine
        elif spacing is not None:
            sp = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,))
            if (sp <= 0).any():
                raise ValueError(f"spacing must be positive, got {tuple(sp)}")
            old = np.asarray(self.spacing)
            shape = tuple(max(1, int(round(n * o / s))) for n, o, s in zip(self.shape, old, sp))
            a = self.affine.numpy().copy()
            a[:3, :3] = a[:3, :3] / old * sp
            # keep the field of view centred on the same world point
            c_old = self.affine.numpy() @ np.r_[(np.asarray(self.shape) - 1) / 2, 1]
            c_new = a @ np.r_[(np.asarray(shape) - 1) / 2, 1]
            a[:3, 3] += (c_old - c_new)[:3]
            affine = a
        elif shape is None or affine is None:
            raise ValueError("resample needs spacing=, like=, or shape= and affine=")
        from ._resample import resample_to_grid
        mode = mode or ("nearest" if self.is_label else "linear")
        out = resample_to_grid(self, tuple(int(s) for s in shape), _as_affine(affine), mode, antialias)
        return Volume(out, affine, self.kind, self.header)

    def resample_like(self, other: "Volume", mode: str | None = None) -> "Volume":
        """Resamples onto ``other``'s grid (a no-op copy when the grids already match)."""
        if self.same_grid(other, atol=1e-6):
            return self.new(self.tensor)
        return self.resample(like=other, mode=mode)

    # -------------------------------------------------------- cropping, padding
    def _mask_on_grid(self, mask: "Volume") -> torch.Tensor:
        m = mask if mask.same_grid(self) else mask.resample_like(self, mode="nearest" if mask.is_label else "linear")
        t = m.tensor[:1]
        return (t > 0.5) if t.is_floating_point() else (t != 0)

    def crop(self, mask: "Volume | None" = None, *, box=None, margin: float = 0.0) -> "Volume":
        """Crops to the bounding box of ``mask`` (any grid) or of a world box, plus ``margin`` mm.

        Args:
            mask: a mask volume; its non-zero voxels define the region.
            box: ``((x0, y0, z0), (x1, y1, z1))`` world RAS corners in mm.
            margin: extra margin in mm on every side (clipped to the image).
        """
        if (mask is None) == (box is None):
            raise ValueError("crop needs exactly one of mask= or box=")
        if mask is not None:
            m = self._mask_on_grid(mask)[0]
            if not m.any():
                raise GeometryError("crop mask is empty on this image's grid: nothing to crop to")
            idx = torch.nonzero(m)
            lo = idx.min(0).values.numpy().astype(float)
            hi = idx.max(0).values.numpy().astype(float)
        else:
            (x0, y0, z0), (x1, y1, z1) = box
            corners = np.array([[x, y, z] for x in (x0, x1) for y in (y0, y1) for z in (z0, z1)], float)
            v = self.world_to_voxel(corners)
            lo, hi = np.ceil(v.min(0) - 1e-6), np.floor(v.max(0) + 1e-6)
        pad = np.ceil(margin / np.asarray(self.spacing) - 1e-9)
        lo = np.clip(lo - pad, 0, None).astype(int)
        hi = np.minimum(hi + pad, np.asarray(self.shape) - 1).astype(int)
        if (hi < lo).any():
            raise GeometryError("crop box lies outside the image")
        t = self.tensor[:, lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1]
        a = self.affine.numpy().copy()
        a[:3, 3] = self.voxel_to_world(lo)
        return Volume(t.clone(), a, self.kind, self.header)

    def pad(self, width: float | Sequence[float], *, unit: str = "voxels", value: float = 0) -> "Volume":
        """Pads every side by ``width`` voxels (or mm with ``unit="mm"``), per axis or for all."""
        w = np.broadcast_to(np.asarray(width, dtype=np.float64), (3,))
        if unit == "mm":
            w = np.ceil(w / np.asarray(self.spacing) - 1e-9)
        elif unit != "voxels":
            raise ValueError("unit must be 'voxels' or 'mm'")
        w = w.astype(int)
        if (w < 0).any():
            raise ValueError("pad width must be non-negative")
        t = torch.nn.functional.pad(self.tensor, (w[2], w[2], w[1], w[1], w[0], w[0]), value=value)
        a = self.affine.numpy().copy()
        a[:3, 3] = self.voxel_to_world(-w.astype(float))
        return Volume(t, a, self.kind, self.header)

    def masked(self, mask: "Volume", *, invert: bool = False, fill: float = 0) -> "Volume":
        """Keeps the signal inside ``mask`` (or removes it with ``invert=True``), filling the rest."""
        m = self._mask_on_grid(mask)
        if invert:
            m = ~m
        return self.new(torch.where(m, self.tensor, torch.as_tensor(fill, dtype=self.tensor.dtype)))

    # ---------------------------------------------------------------- intensity
    def normalize(self, low: float = 0.5, high: float = 99.5, mask: "Volume | None" = None) -> "Volume":
        """Robust intensity normalisation to [0, 1]: the ``low``/``high`` percentiles map to 0/1.

        Percentiles are taken over the non-zero voxels (or inside ``mask``), per channel; values
        outside are clipped.
        """
        out = torch.empty_like(self.tensor, dtype=torch.float32)
        m = self._mask_on_grid(mask)[0] if mask is not None else None
        for c in range(self.channels):
            x = self.tensor[c].float()
            sel = x[m] if m is not None else x[x != 0]
            if sel.numel() == 0:
                sel = x.reshape(-1)
            sel = sel.reshape(-1)
            if sel.numel() > 2_000_000:  # quantile on a fixed subsample: fast and deterministic
                sel = sel[torch.linspace(0, sel.numel() - 1, 2_000_000).long()]
            lo, hi = torch.quantile(sel, torch.tensor([low / 100, high / 100]))
            scale = float(hi - lo) if float(hi - lo) > 0 else 1.0
            out[c] = ((x - lo) / scale).clamp(0, 1)
        return self.new(out, kind="image")

    # ------------------------------------------------------------- hemispheres
    def hemisphere(self, side: str, midline: float | None = 0.0) -> "Volume":
        """Keeps the voxels on one side of the mid-sagittal plane ``x = midline`` (world RAS mm).

        Left is world x < midline (RAS: x increases toward the subject's right). With
        ``midline=None`` the plane passes through the intensity-weighted centre of this volume
        (use it for scans not aligned to a template). Voxels outside are set to zero.
        """
        side = side.lower()
        if side not in ("left", "right"):
            raise ValueError("side must be 'left' or 'right'")
        if midline is None:
            from .morphometry import center_of_mass
            midline = center_of_mass(self)[0]
        x = self.world_coordinates()[0]
        keep = (x < midline) if side == "left" else (x >= midline)
        return self.new(torch.where(keep.unsqueeze(0), self.tensor, torch.zeros((), dtype=self.tensor.dtype)))

    def world_coordinates(self) -> torch.Tensor:
        """World RAS coordinates (mm) of every voxel centre, shape ``(3, X, Y, Z)`` (float32)."""
        a = self.affine.float()
        axes = [torch.arange(n, dtype=torch.float32) for n in self.shape]
        out = a[:3, 3].view(3, 1, 1, 1).expand(3, *self.shape).clone()
        for i in range(3):
            shape = [1, 1, 1]
            shape[i] = -1
            out += a[:3, i].view(3, 1, 1, 1) * axes[i].view(1, *shape)
        return out


def stack(volumes: Sequence[Volume]) -> Volume:
    """Stacks single- or multi-channel volumes on one grid into one multi-channel volume."""
    if not volumes:
        raise ValueError("stack needs at least one volume")
    ref = volumes[0]
    for v in volumes[1:]:
        if not v.same_grid(ref):
            raise GeometryError("stack needs volumes on one grid; resample with resample_like first")
    return ref.new(torch.cat([v.tensor.to(ref.dtype) for v in volumes], 0))


def ras_grid(shape, spacing=1.0, center=(0.0, 0.0, 0.0)) -> np.ndarray:
    """An RAS affine for a grid of ``shape`` voxels of ``spacing`` mm centred on world ``center``."""
    sp = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,))
    a = np.diag([*sp, 1.0])
    a[:3, 3] = np.asarray(center, dtype=np.float64) - sp * (np.asarray(shape) - 1) / 2
    return a


def rotation_affine(angles_deg=(0.0, 0.0, 0.0)) -> np.ndarray:
    """A 4x4 rotation about the world x, y, z axes (degrees, applied in that order)."""
    ax, ay, az = (math.radians(a) for a in angles_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    out = np.eye(4)
    out[:3, :3] = rz @ ry @ rx
    return out
