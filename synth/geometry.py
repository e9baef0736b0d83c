"""Clinical scan geometries: field of view, voxel spacing, slice direction, axis order, obliquity.

Spacing ranges per acquisition type follow seeds/004 Table 2 (in-plane spacing and slice
separation, uniform, clamped at 0.8 mm); the field of view is 155 x 190 x 165 mm (LR x AP x SI)
± 15 mm per axis (seeds/004 C.4). Voxel axes are often not RAS: the slice axis and the in-plane
axis order and directions are drawn from common clinical layouts (axial LPS-like, FreeSurfer
LIA, sagittal PIL, ...), and the grid may be tilted a few degrees (oblique acquisitions).
:func:`sparsify` implements the random sparsification of seeds/004 B.2 (slice separation 1-6 mm
or a cropped field of view, keeping a region of interest). :func:`resample_to` puts a working-grid
image onto an acquisition grid (world space, anti-aliased).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F

import voxel_lib as vl


@dataclass(frozen=True)
class AcquisitionSpec:
    """One acquisition type.

    Attributes:
        contrast: the image contrast (``synth.contrast.CONTRASTS``).
        inplane: (min, max) in-plane spacing, mm.
        slice: (min, max) slice separation, mm; None for isotropic 3D (spacing = in-plane).
        planes: slice-plane weights for 2D acquisitions (axial, coronal, sagittal).
        table2: the seeds/004 Table 2 row it follows (None: not in Table 2, ranges ours).
    """

    contrast: str
    inplane: tuple[float, float]
    slice: tuple[float, float] | None
    planes: tuple[float, float, float] = (1.0, 0.0, 0.0)
    table2: str | None = None


#: Acquisition types. Keys are used in file names (``acq-<key>``) and metadata.
ACQUISITIONS: dict[str, AcquisitionSpec] = {
    "t1w": AcquisitionSpec("t1w", (0.8, 1.2), None, table2="T1-weighted (isotropic)"),
    "t2w": AcquisitionSpec("t2w", (0.8, 1.0), (3.0, 5.0), (0.8, 0.15, 0.05), table2="T2-weighted"),
    "flair": AcquisitionSpec("flair", (0.8, 1.0), (3.0, 5.0), (0.8, 0.1, 0.1), table2="FLAIR"),
    "dwi": AcquisitionSpec("dwi", (1.5, 2.5), (2.0, 3.5), table2="diffusion-weighted (DWI)"),
    "gre": AcquisitionSpec("gre", (0.8, 1.2), (4.0, 6.0), table2="gradient-echo (GRE)"),
    "perfusion": AcquisitionSpec("gre", (1.5, 2.5), (4.0, 6.0), table2="perfusion MRI"),
    "swi": AcquisitionSpec("swi", (0.8, 1.0), (1.5, 3.0), table2="susceptibility-weighted (SWI)"),
    "ct": AcquisitionSpec("ct", (0.8, 1.0), None, table2="CT (isotropic)"),
    "ct_thick": AcquisitionSpec("ct", (0.8, 1.0), (3.0, 6.0), table2="CT (thick slice)"),
    # not in Table 2: PD as a T2-like 2D sequence (dual echo), post-contrast T1 as the 3D T1
    "pd": AcquisitionSpec("pd", (0.8, 1.0), (3.0, 5.0), (0.8, 0.15, 0.05)),
    "t1c": AcquisitionSpec("t1c", (0.8, 1.2), None),
    # ADC maps share the DWI grid (derived from the same acquisition)
    "adc": AcquisitionSpec("adc", (1.5, 2.5), (2.0, 3.5)),
}

FOV_MM = (155.0, 190.0, 165.0)
FOV_DEVIATION_MM = 15.0
MIN_SPACING_MM = 0.8
SPARSIFY_SLICE_MM = (1.0, 6.0)

# Common voxel layouts: (world axis of voxel axes 0, 1, 2 as "RL"/"AP"/"SI" letters), by slice plane.
# The slice axis is listed last for 2D layouts; 3D layouts include FreeSurfer's LIA and sagittal PIL.
_LAYOUTS_2D = {
    0: ("LPS", "RAS", "LAS", "RPS", "LPI", "PLS", "RAI"),   # axial: slice along S/I
    1: ("LSP", "RSA", "LIP", "RIA", "SLA"),                # coronal: slice along A/P
    2: ("PSL", "ASR", "PIR", "SPL", "AIL"),                # sagittal: slice along L/R
}
_LAYOUTS_3D = ("RAS", "LIA", "LPS", "PIL", "ASL", "LAS", "RSP", "PSR")


@dataclass(frozen=True)
class Geometry:
    """A sampled acquisition grid.

    Attributes:
        acquisition: the acquisition type (key of :data:`ACQUISITIONS`).
        shape: voxels per axis.
        affine: voxel -> world RAS (mm).
        spacing: voxel size per voxel axis (mm).
        slice_axis: the voxel axis of the slices (2D acquisitions), None for 3D.
        plane: "axial" / "coronal" / "sagittal" for 2D, "3d" otherwise.
        native_spacing: the sampled spacing before any working-resolution floor.
        sparsified: what :func:`sparsify` did ("", "slices" or "crop").
    """

    acquisition: str
    shape: tuple[int, int, int]
    affine: np.ndarray = field(compare=False)
    spacing: tuple[float, float, float]
    slice_axis: int | None
    plane: str
    native_spacing: tuple[float, float, float]
    sparsified: str = ""

    @property
    def orientation(self) -> str:
        import nibabel.orientations as nio
        return "".join(nio.aff2axcodes(self.affine))

    @property
    def fov(self) -> tuple[float, float, float]:
        return tuple(n * s for n, s in zip(self.shape, self.spacing))

    def meta(self) -> dict:
        """JSON-friendly description (for sidecars)."""
        return {"AcquisitionType": self.acquisition, "Plane": self.plane, "VoxelSpacingMM": list(self.spacing),
                "NativeSpacingMM": list(self.native_spacing), "Shape": list(self.shape),
                "Orientation": self.orientation, "SliceAxis": self.slice_axis, "Sparsified": self.sparsified or None,
                "MRAcquisitionType": "3D" if self.slice_axis is None else "2D"}


_WORLD_AXIS = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}


def _axes_matrix(code: str) -> np.ndarray:
    """3x3 matrix whose column j is the world unit direction of voxel axis j for an axis code."""
    m = np.zeros((3, 3))
    for j, ch in enumerate(code):
        ax, sgn = _WORLD_AXIS[ch]
        m[ax, j] = sgn
    return m


def sample_geometry(acquisition: str, rng: np.random.Generator, *, center=(0.0, -18.0, 10.0),
                    min_spacing: float | None = None, oblique_deg: float = 12.0, oblique_prob: float = 0.5,
                    shift_mm: float = 8.0, fov_mm=FOV_MM, fov_deviation: float = FOV_DEVIATION_MM) -> Geometry:
    """Draws a clinical geometry for an acquisition type.

    Args:
        acquisition: a key of :data:`ACQUISITIONS`.
        rng: random generator.
        center: world point the field of view is centred on (the head centre), before a random shift.
        min_spacing: a floor on every spacing (e.g. the training working resolution, 2 mm); the
            native sampled spacing is kept in ``native_spacing``. Spacings are always ≥ 0.8 mm.
        oblique_deg: maximum tilt of the grid about each world axis.
        oblique_prob: probability of an oblique grid.
        shift_mm: maximum random shift of the field-of-view centre per axis.
        fov_mm, fov_deviation: nominal field of view (LR, AP, SI) and its uniform deviation.
    """
    if acquisition not in ACQUISITIONS:
        raise ValueError(f"unknown acquisition {acquisition!r}; choose one of {sorted(ACQUISITIONS)}")
    spec = ACQUISITIONS[acquisition]
    inplane = float(rng.uniform(*spec.inplane))
    if spec.slice is None:
        plane, code = "3d", _LAYOUTS_3D[int(rng.integers(len(_LAYOUTS_3D)))]
        native = np.full(3, inplane)
        slice_axis = None
    else:
        w = np.asarray(spec.planes, float)
        p = int(rng.choice(3, p=w / w.sum()))
        plane = ("axial", "coronal", "sagittal")[p]
        code = _LAYOUTS_2D[p][int(rng.integers(len(_LAYOUTS_2D[p])))]
        slice_world = 2 - p  # axial -> SI (2), coronal -> AP (1), sagittal -> LR (0)
        native = np.full(3, inplane)
        slice_axis = next(j for j, ch in enumerate(code) if _WORLD_AXIS[ch][0] == slice_world)
        native[slice_axis] = float(rng.uniform(*spec.slice))
    native = np.maximum(native, MIN_SPACING_MM)
    sp = np.maximum(native, min_spacing) if min_spacing else native.copy()
    axes = _axes_matrix(code)
    rot = np.eye(3)
    if rng.random() < oblique_prob:
        rot = vl.rotation_affine(tuple(rng.uniform(-oblique_deg, oblique_deg, 3)))[:3, :3]
    dirs = rot @ axes
    fov_world = np.asarray(fov_mm, float) + rng.uniform(-fov_deviation, fov_deviation, 3)
    world_of_axis = [int(np.argmax(np.abs(axes[:, j]))) for j in range(3)]
    shape = tuple(max(1, int(round(fov_world[world_of_axis[j]] / sp[j]))) for j in range(3))
    c = np.asarray(center, float) + rng.uniform(-shift_mm, shift_mm, 3)
    aff = np.eye(4)
    aff[:3, :3] = dirs * sp
    aff[:3, 3] = c - aff[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return Geometry(acquisition=acquisition, shape=shape, affine=aff, spacing=tuple(float(s) for s in sp),
                    slice_axis=slice_axis, plane=plane, native_spacing=tuple(float(s) for s in native))


def with_grid(g: Geometry, shape, affine, spacing=None, **changes) -> Geometry:
    """A copy of ``g`` on another grid."""
    sp = spacing if spacing is not None else tuple(float(s) for s in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))
    return replace(g, shape=tuple(int(s) for s in shape), affine=np.asarray(affine, float), spacing=tuple(sp),
                   **changes)


def sparsify(g: Geometry, rng: np.random.Generator, *, keep_box=None, slice_range=SPARSIFY_SLICE_MM,
             crop_prob: float = 0.5, margin_mm: float = 10.0) -> Geometry:
    """Random sparsification (seeds/004 B.2): wider slice separation or a cropped field of view.

    Args:
        g: the geometry.
        rng: random generator.
        keep_box: ``((x0, y0, z0), (x1, y1, z1))`` world box (e.g. the target ROI) that must stay in
            the field of view; None keeps nothing in particular.
        slice_range: slice separations (mm) drawn uniformly (only ever widens the spacing).
        crop_prob: probability of cropping instead of widening slices.
        margin_mm: margin kept around ``keep_box`` when cropping.
    """
    a = np.asarray(g.affine, float)
    shape = np.asarray(g.shape)
    if rng.random() >= crop_prob:
        axis = g.slice_axis if g.slice_axis is not None else int(rng.integers(3))
        sep = max(float(rng.uniform(*slice_range)), g.spacing[axis])
        new_sp = np.asarray(g.spacing, float)
        new_sp[axis] = sep
        n = shape.copy()
        n[axis] = max(1, int(round(shape[axis] * g.spacing[axis] / sep)))
        new = a.copy()
        new[:3, :3] = a[:3, :3] / np.asarray(g.spacing) * new_sp
        c_old = a @ np.r_[(shape - 1) / 2.0, 1]
        new[:3, 3] += (c_old - new @ np.r_[(n - 1) / 2.0, 1])[:3]
        return with_grid(g, n, new, tuple(float(s) for s in new_sp), sparsified="slices")
    if keep_box is not None:
        (x0, y0, z0), (x1, y1, z1) = keep_box
        corners = np.array([[x, y, z, 1.0] for x in (x0, x1) for y in (y0, y1) for z in (z0, z1)])
        vox = (np.linalg.inv(a) @ corners.T).T[:, :3]
        m = margin_mm / np.asarray(g.spacing)
        need_lo = np.clip(np.floor(vox.min(0) - m), 0, shape - 1)
        need_hi = np.clip(np.ceil(vox.max(0) + m), 0, shape - 1)
    else:
        need_lo = need_hi = (shape - 1) / 2.0
    frac = rng.uniform(0.5, 0.9, 3)  # fraction of each axis kept
    size = np.maximum(np.round(shape * frac), need_hi - need_lo + 1)
    size = np.minimum(size, shape)
    start_lo = np.maximum(0, need_hi - size + 1)
    start_hi = np.minimum(need_lo, shape - size)
    start = np.floor(start_lo + rng.random(3) * np.maximum(0, start_hi - start_lo + 1)).clip(start_lo, None)
    start = np.minimum(start, shape - size).astype(int)
    new = a.copy()
    new[:3, 3] = (a @ np.r_[start, 1.0])[:3]
    return with_grid(g, size.astype(int), new, g.spacing, sparsified="crop")


# ----------------------------------------------------------------------------- resampling
def resample_to(image: np.ndarray, affine: np.ndarray, shape, target_affine: np.ndarray) -> np.ndarray:
    """Resamples an image (RAS working grid) onto an acquisition grid in world space.

    Fast path of ``voxel_lib.Volume.resample``: the source is first cropped to the target's field
    of view, then Gaussian anti-aliasing (sigma = (factor - 1) / 2 source voxels, as voxel_lib)
    runs only along axes the target really coarsens (sigma ≥ 0.25 voxel), then trilinear
    sampling. Outside the source: 0.
    """
    m = np.linalg.inv(affine) @ np.asarray(target_affine, dtype=np.float64)  # target voxel -> source voxel
    n = np.asarray(shape, dtype=float) - 1
    corners = np.array([[i, j, k, 1.0] for i in (0, n[0]) for j in (0, n[1]) for k in (0, n[2])]) @ m.T
    factors = np.linalg.norm(m[:3, :3], axis=1)
    sigma = np.maximum(0.0, (factors - 1.0) / 2.0)
    pad = np.ceil(3 * sigma + 2).astype(int)
    lo = np.maximum(np.floor(corners[:, :3].min(0)).astype(int) - pad, 0)
    hi = np.minimum(np.ceil(corners[:, :3].max(0)).astype(int) + pad + 1, image.shape)
    if (hi <= lo).any():
        return np.zeros(tuple(int(s) for s in shape), dtype=np.float32)
    crop = np.asarray(image[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], dtype=np.float32)
    for ax, s in enumerate(sigma):
        if s >= 0.25:
            crop = ndi.gaussian_filter1d(crop, float(s), axis=ax, mode="nearest", truncate=3.0)
    m = m.copy()
    m[:3, 3] -= lo  # target voxel -> cropped source voxel
    return sample_affine(crop, m, shape)


def _affine_grid(theta: np.ndarray, shape) -> torch.Tensor:
    """``F.affine_grid(theta, (1, 1, *shape), align_corners=True)`` by broadcasting (much faster on CPU)."""
    d, h, w = shape
    axes = [torch.linspace(-1, 1, n) if n > 1 else torch.zeros(1) for n in (w, h, d)]  # x=W, y=H, z=D
    th = torch.from_numpy(theta).float()
    grid = torch.empty((1, d, h, w, 3), dtype=torch.float32)
    for c in range(3):
        grid[0, ..., c] = (th[c, 0] * axes[0].view(1, 1, w) + th[c, 1] * axes[1].view(1, h, 1)
                           + th[c, 2] * axes[2].view(d, 1, 1) + th[c, 3])
    return grid


def sample_affine(src: np.ndarray, m: np.ndarray, shape) -> np.ndarray:
    """Trilinear sampling of ``src`` at ``m @ (i, j, k, 1)`` for every voxel of a ``shape`` grid (0 outside).

    ``m``: 4x4 target voxel -> source voxel. One ``affine_grid`` + ``grid_sample`` call (float32).
    """
    shape = tuple(int(s) for s in shape)
    n_o = np.asarray(shape, dtype=np.float64) - 1
    n_s = np.maximum(np.asarray(src.shape, dtype=np.float64) - 1, 1e-6)
    d_o, d_s_inv = np.diag(n_o / 2), np.diag(2 / n_s)
    a = d_s_inv @ m[:3, :3] @ d_o
    b = d_s_inv @ (m[:3, :3] @ (n_o / 2) + m[:3, 3]) - 1
    rev = [2, 1, 0]  # grid_sample's coordinate order is (W, H, D) = our (z, y, x)
    theta = np.zeros((1, 3, 4))
    theta[0, :, :3] = a[np.ix_(rev, rev)]
    theta[0, :, 3] = b[rev]
    grid = _affine_grid(theta[0], shape)
    inp = torch.from_numpy(np.ascontiguousarray(src, dtype=np.float32))[None, None]
    out = F.grid_sample(inp, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[0, 0].numpy()
