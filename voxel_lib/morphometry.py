"""Morphometry of masks and images in world units.

Every function takes :class:`~voxel_lib.Volume` inputs on any grid (a mask and an image may
differ: the mask is resampled onto the image in world space) and returns numbers that carry
their unit (:class:`~voxel_lib.Quantity`) or small dicts of them. A *mask* is a label volume
(non-zero = inside) or a soft image in [0, 1] (> 0.5 = inside, except for
:func:`center_of_mass`, which weights by the values).
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass

import numpy as np
import scipy.ndimage as ndi
import torch

from .errors import GeometryError
from .quantity import Quantity
from .volume import Volume

_AXES = {"lr": 0, "ap": 1, "si": 2}
_AXIS_ALIASES = {
    "lr": "lr", "rl": "lr", "x": "lr", "lateral": "lr", "width": "lr", "left-right": "lr", "sagittal": "lr",
    "ap": "ap", "pa": "ap", "y": "ap", "length": "ap", "anterior-posterior": "ap", "coronal": "ap",
    "si": "si", "is": "si", "z": "si", "height": "si", "superior-inferior": "si", "axial": "si",
}


def _binary(mask: Volume) -> np.ndarray:
    t = mask.tensor[0].detach().cpu()
    return (t > 0.5).numpy() if t.is_floating_point() else (t != 0).numpy()


def _nonempty(mask: Volume, what: str) -> np.ndarray:
    m = _binary(mask)
    if not m.any():
        raise GeometryError(f"{what}: the mask is empty (no voxels inside)")
    return m


def volume(mask: Volume, unit: str = "mm³") -> Quantity:
    """Volume of a mask in ``unit`` ("mm³" or "mL").

    Label masks: non-zero voxel count × voxel volume. Soft (image) masks in [0, 1], e.g.
    partial-volume maps: the sum of the values × voxel volume (values are clipped to [0, 1]).
    """
    t = mask.tensor[0].detach().cpu()
    if t.is_floating_point():
        v = float(t.double().clamp(0, 1).sum()) * mask.voxel_volume
    else:
        v = float((t != 0).sum()) * mask.voxel_volume
    return Quantity(v, "mm³", "volume").to(unit)


def _world_points(mask: Volume, m: np.ndarray) -> np.ndarray:
    return mask.voxel_to_world(np.argwhere(m).astype(np.float64))


def _voxel_halfwidth(mask: Volume) -> np.ndarray:
    """Half the extent of one voxel along each world axis (oblique voxels project wider)."""
    return 0.5 * np.abs(mask.affine.numpy()[:3, :3]).sum(axis=1)


@dataclass(frozen=True)
class BoundingBox:
    """World-axis-aligned bounding box of a mask, in world RAS mm (voxel edges, not centres)."""

    min: tuple[float, float, float]
    max: tuple[float, float, float]

    @property
    def size(self) -> tuple[Quantity, Quantity, Quantity]:
        """Dimensions along L-R, A-P and S-I (mm)."""
        return tuple(Quantity(b - a, "mm", f"extent_{k}") for a, b, k in zip(self.min, self.max, ("lr", "ap", "si")))

    def as_dict(self) -> dict:
        return {"min_ras_mm": list(self.min), "max_ras_mm": list(self.max),
                "size_mm": {k: float(s) for k, s in zip(("lr", "ap", "si"), self.size)}}

    def __str__(self) -> str:
        lr, ap, si = self.size
        return f"{lr.value:.1f} × {ap.value:.1f} × {si.value:.1f} mm (L-R × A-P × S-I)"


def bounding_box(mask: Volume) -> BoundingBox:
    """World-axis-aligned bounding box (RAS mm) of a mask, including the voxels' own extent."""
    m = _nonempty(mask, "bounding_box")
    pts = _world_points(mask, m)
    h = _voxel_halfwidth(mask)
    return BoundingBox(tuple(float(v) for v in pts.min(0) - h), tuple(float(v) for v in pts.max(0) + h))


def extent(mask: Volume, axis: str | None = None):
    """Extent of a mask along world axes, in mm.

    Args:
        axis: ``"lr"`` (lateral width), ``"ap"`` (anterior-posterior length), ``"si"``
            (superior-inferior height) or an alias ("width", "length", "height", "x", ...);
            ``None`` returns all three as a dict.
    """
    size = bounding_box(mask).size
    if axis is None:
        return {"lr": size[0], "ap": size[1], "si": size[2]}
    key = _AXIS_ALIASES.get(axis.lower().replace("_", "-"))
    if key is None:
        raise ValueError(f"unknown axis {axis!r}; use 'lr', 'ap' or 'si'")
    return size[_AXES[key]]


def max_diameter(mask: Volume) -> Quantity:
    """Largest distance between two points of the mask (mm), Feret diameter on the convex hull.

    The distance between the outermost voxel centres is extended by the voxel's own size
    along that direction.
    """
    m = _nonempty(mask, "max_diameter")
    surf = m & ~ndi.binary_erosion(m)
    pts = _world_points(mask, surf)
    if len(pts) > 4:
        try:
            from scipy.spatial import ConvexHull
            pts = pts[ConvexHull(pts).vertices]
        except Exception:  # degenerate (flat) sets: fall back to all surface points
            pass
    if len(pts) > 6000:
        pts = pts[np.random.default_rng(0).choice(len(pts), 6000, replace=False)]
    if len(pts) == 1:
        d, u = 0.0, np.array([1.0, 0.0, 0.0])
    else:
        diff = pts[:, None, :] - pts[None, :, :]
        d2 = (diff**2).sum(-1)
        i, j = np.unravel_index(np.argmax(d2), d2.shape)
        d = float(np.sqrt(d2[i, j]))
        u = (pts[i] - pts[j]) / max(d, 1e-12)
    a = mask.affine.numpy()[:3, :3]
    voxel_along_u = float(np.abs(a.T @ u).sum())  # projected width of one voxel along u
    return Quantity(d + voxel_along_u, "mm", "max_diameter")


def center_of_mass(mask: Volume) -> tuple[Quantity, Quantity, Quantity]:
    """Centre of mass in world RAS mm (binary masks: centroid; soft masks: value-weighted)."""
    t = mask.tensor[0].detach().cpu()
    w = t.double().numpy() if t.is_floating_point() else (t != 0).numpy().astype(np.float64)
    w = np.clip(w, 0, None)
    total = w.sum()
    if total <= 0:
        raise GeometryError("center_of_mass: the mask is empty (no voxels inside)")
    idx = [np.arange(n, dtype=np.float64) for n in mask.shape]
    c = [float((w.sum(axis=tuple(j for j in range(3) if j != i)) * idx[i]).sum() / total) for i in range(3)]
    xyz = mask.voxel_to_world(np.array(c))
    return tuple(Quantity(float(v), "mm", f"com_{k}") for v, k in zip(xyz, "xyz"))


def side(mask: Volume, midline: float = 0.0, tolerance: float = 0.9) -> str:
    """Which side of the world mid-sagittal plane ``x = midline`` a mask lies on.

    Returns ``"left"`` or ``"right"`` when at least ``tolerance`` of its volume is on that side,
    otherwise ``"bilateral"``. Left/right come from the affine (RAS: x < midline is left).
    """
    m = _nonempty(mask, "side")
    x = _world_points(mask, m)[:, 0]
    left = float((x < midline).mean())
    if left >= tolerance:
        return "left"
    if 1 - left >= tolerance:
        return "right"
    return "bilateral"


# ------------------------------------------------------------------ intensity
def _values_in(image: Volume, mask: Volume, channel: int = 0) -> np.ndarray:
    m = mask if mask.same_grid(image) else mask.resample_like(image, mode="nearest" if mask.is_label else "linear")
    inside = _binary(m)
    vals = image.tensor[channel].detach().cpu().double().numpy()[inside]
    if vals.size == 0:
        raise GeometryError("intensity: the mask covers no voxel of the image")
    return vals


def intensity_stats(image: Volume, mask: Volume, unit: str = "a.u.", channel: int = 0) -> dict:
    """Intensity statistics of ``image`` inside ``mask`` (any grid).

    Returns a dict of Quantities: mean, median, std, min, max, p5, p25, p75, p95, and ``n_voxels``.
    Use ``unit="HU"`` for CT in Hounsfield units.
    """
    v = _values_in(image, mask, channel)
    p5, p25, p50, p75, p95 = np.percentile(v, [5, 25, 50, 75, 95])
    out = {
        "mean": v.mean(), "median": p50, "std": v.std(ddof=1) if v.size > 1 else 0.0,
        "min": v.min(), "max": v.max(), "p5": p5, "p25": p25, "p75": p75, "p95": p95,
    }
    res = {k: Quantity(float(x), unit, k) for k, x in out.items()}
    res["n_voxels"] = int(v.size)
    return res


def mean_intensity(image: Volume, mask: Volume, unit: str = "a.u.") -> Quantity:
    """Mean intensity of ``image`` inside ``mask``."""
    return Quantity(float(_values_in(image, mask).mean()), unit, "mean_intensity")


def relative_intensity(image: Volume, roi: Volume, reference: Volume, unit: str = "a.u.") -> dict:
    """Mean intensity of ``roi`` relative to ``reference`` on the same image.

    Returns ``{"ratio", "difference", "roi_mean", "reference_mean"}`` (ratio unitless).
    """
    a = float(_values_in(image, roi).mean())
    b = float(_values_in(image, reference).mean())
    return {
        "ratio": Quantity(a / b if b != 0 else float("inf"), "1", "intensity_ratio"),
        "difference": Quantity(a - b, unit, "intensity_difference"),
        "roi_mean": Quantity(a, unit, "roi_mean"),
        "reference_mean": Quantity(b, unit, "reference_mean"),
    }


def surrounding(mask: Volume, width: float = 3.0, within: Volume | None = None) -> Volume:
    """A shell of ``width`` mm around a mask (outside it), optionally limited to ``within``."""
    m = _nonempty(mask, "surrounding")
    sp = np.asarray(mask.spacing)
    dist = ndi.distance_transform_edt(~m, sampling=sp)
    shell = (dist > 0) & (dist <= width)
    out = mask.new(torch.from_numpy(shell.astype(np.uint8))[None], kind="label")
    if within is not None:
        out = out.new(out.tensor * torch.from_numpy(_binary(within.resample_like(mask, mode="nearest")).astype(np.uint8))[None])
    return out


def signal_class(image: Volume, roi: Volume, reference: Volume | None = None, threshold: float = 0.1) -> str:
    """Characterises ``roi`` as ``"hyperintense"``, ``"hypointense"`` or ``"isointense"``.

    Compares its mean with ``reference`` (default: a 3 mm shell around it); relative
    differences within ±``threshold`` are isointense.
    """
    ref = reference if reference is not None else surrounding(roi, 3.0)
    r = relative_intensity(image, roi, ref)
    base = abs(float(r["reference_mean"])) or 1.0
    rel = float(r["difference"]) / base
    if rel > threshold:
        return "hyperintense"
    if rel < -threshold:
        return "hypointense"
    return "isointense"


# ----------------------------------------------------------------- components
@dataclass(frozen=True)
class Component:
    """One connected component: its label index, volume (mm³) and centroid (RAS mm)."""

    index: int
    volume: Quantity
    centroid: tuple[float, float, float]


def _label_components(mask: Volume, connectivity: int):
    m = _binary(mask)
    structure = ndi.generate_binary_structure(3, {6: 1, 18: 2, 26: 3}[connectivity])
    lab, n = ndi.label(m, structure=structure)
    return lab, n


def components(mask: Volume, connectivity: int = 26) -> list[Component]:
    """Connected components of a mask, largest first (``connectivity`` 6, 18 or 26)."""
    lab, n = _label_components(mask, connectivity)
    if n == 0:
        return []
    counts = np.bincount(lab.ravel(), minlength=n + 1)[1:]
    cents = ndi.center_of_mass(np.ones_like(lab, dtype=np.uint8), lab, index=np.arange(1, n + 1))
    out = []
    for i in range(n):
        c = mask.voxel_to_world(np.asarray(cents[i], dtype=np.float64))
        out.append(Component(i + 1, Quantity(float(counts[i]) * mask.voxel_volume, "mm³", "component_volume"),
                             tuple(float(v) for v in c)))
    out.sort(key=lambda c: -float(c.volume))
    return out


def count_components(mask: Volume, connectivity: int = 26) -> int:
    """Number of connected components."""
    return int(_label_components(mask, connectivity)[1])


def largest_component(mask: Volume, connectivity: int = 26) -> Volume:
    """A mask of the largest connected component."""
    lab, n = _label_components(mask, connectivity)
    if n == 0:
        raise GeometryError("largest_component: the mask is empty")
    keep = np.argmax(np.bincount(lab.ravel())[1:]) + 1
    return mask.new(torch.from_numpy((lab == keep).astype(np.uint8))[None], kind="label")


def component_at(mask: Volume, point, connectivity: int = 26) -> Volume:
    """A mask of the connected component containing the world RAS point ``point`` (mm)."""
    lab, _ = _label_components(mask, connectivity)
    ijk = np.rint(mask.world_to_voxel(np.asarray(point, dtype=np.float64))).astype(int)
    if (ijk < 0).any() or (ijk >= np.asarray(mask.shape)).any():
        raise GeometryError(f"point {tuple(point)} mm lies outside the image")
    k = lab[tuple(ijk)]
    if k == 0:
        raise GeometryError(f"point {tuple(point)} mm is not inside the mask")
    return mask.new(torch.from_numpy((lab == k).astype(np.uint8))[None], kind="label")


# ---------------------------------------------------------- comparison, change
def asymmetry(left, right) -> Quantity:
    """Asymmetry index ``100 × (L − R) / ((L + R) / 2)`` in %, from two masks or two numbers.

    Positive means the left is larger.
    """
    a = float(volume(left)) if isinstance(left, Volume) else float(left)
    b = float(volume(right)) if isinstance(right, Volume) else float(right)
    if a + b == 0:
        raise GeometryError("asymmetry: both sides are empty")
    return Quantity(100.0 * (a - b) / ((a + b) / 2.0), "%", "asymmetry_index")


def _to_date(d) -> _dt.date:
    if isinstance(d, _dt.datetime):
        return d.date()
    if isinstance(d, _dt.date):
        return d
    return _dt.date.fromisoformat(str(d)[:10])


def change(before, after, date_before=None, date_after=None) -> dict:
    """Change of a measurement between two sessions.

    Args:
        before, after: two Quantities (or numbers; or two masks, whose volumes are compared).
        date_before, date_after: optional dates (``date``, ``datetime`` or ISO strings) for the
            annualised rate.

    Returns:
        ``{"absolute", "percent", "per_year" (if dates), "years" (if dates)}``.
    """
    if isinstance(before, Volume):
        before = volume(before)
    if isinstance(after, Volume):
        after = volume(after)
    unit = getattr(before, "unit", None) or getattr(after, "unit", None) or "1"
    if getattr(before, "unit", unit) != getattr(after, "unit", unit):
        after = after.to(before.unit)
    a, b = float(before), float(after)
    out = {"absolute": Quantity(b - a, unit, "change"),
           "percent": Quantity(100.0 * (b - a) / a if a != 0 else float("inf"), "%", "percent_change")}
    if date_before is not None and date_after is not None:
        years = (_to_date(date_after) - _to_date(date_before)).days / 365.25
        if years <= 0:
            raise ValueError(f"the second date ({date_after}) must be after the first ({date_before})")
        out["years"] = Quantity(years, "years", "interval")
        out["per_year"] = Quantity((b - a) / years, f"{unit}/year", "change_per_year")
    return out
