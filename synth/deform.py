"""Anatomical variability: random affine + smooth nonlinear warps, left/right flips, atrophy.

A :class:`SpatialTransform` maps a subject's world point ``p`` back to the template (pull-back):
``q = flip(A⁻¹ (p + u(p)))``, where ``A`` is a random affine about the brain centre, ``u`` a smooth
displacement (a coarse random lattice, trilinearly interpolated) and ``flip`` mirrors about the
template's mid-sagittal plane. :func:`warp` samples a template :class:`~synth.anatomy.Anatomy` on a
subject grid (nearest neighbour for label maps, linear for the head distance), swaps left/right
labels after a flip and redraws the extra-cerebral layers with the subject's thicknesses.

:func:`resize_structure` changes the volume of a structure by an exact factor (atrophy or
enlargement) by relabelling the voxels nearest its boundary, in a random but smooth order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F

import voxel_lib as vl

from .anatomy import (SINUS, Anatomy, _bbox, _midline_from_labels, draw_head_layers, swap_lut,
                      swapped_name)


@dataclass
class SpatialTransform:
    """Subject world -> template world (pull-back).

    Attributes:
        affine: 4x4 forward affine ``A`` (template world -> subject world), applied after the flip.
        flip: mirror about ``midline_x`` (template world x) with left/right label swap.
        midline_x: the template's mid-sagittal plane.
        displacement: ``(3, a, b, c)`` float32 displacement (mm) on a coarse lattice in subject
            world space, or None.
        lattice_affine: voxel -> world affine of that lattice.
    """

    affine: np.ndarray
    flip: bool = False
    midline_x: float = 0.0
    displacement: torch.Tensor | None = None
    lattice_affine: np.ndarray | None = None

    @property
    def flip_matrix(self) -> np.ndarray:
        f = np.eye(4)
        if self.flip:
            f[0, 0], f[0, 3] = -1.0, 2.0 * self.midline_x
        return f

    def forward_affine(self) -> np.ndarray:
        """Template world -> subject world, ignoring the nonlinear part."""
        return self.affine @ self.flip_matrix

    def displacement_at(self, points: torch.Tensor) -> torch.Tensor:
        """Displacement (mm) at world points ``(N, 3)`` (zeros without a nonlinear part)."""
        if self.displacement is None:
            return torch.zeros_like(points)
        inv = torch.from_numpy(np.linalg.inv(self.lattice_affine)).to(points.dtype)
        v = points @ inv[:3, :3].T + inv[:3, 3]
        n = torch.tensor(self.displacement.shape[1:], dtype=points.dtype)
        g = 2 * v / (n - 1) - 1
        grid = g[:, [2, 1, 0]].view(1, -1, 1, 1, 3).float()
        u = F.grid_sample(self.displacement[None].float(), grid, mode="bilinear", padding_mode="border",
                          align_corners=True)
        return u.view(3, -1).T.to(points.dtype)

    def to_template(self, points) -> np.ndarray:
        """Maps subject world points ``(..., 3)`` to template world points."""
        p = torch.as_tensor(np.asarray(points, dtype=np.float64)).reshape(-1, 3)
        p = p + self.displacement_at(p)
        m = np.linalg.inv(self.forward_affine())
        q = p.numpy() @ m[:3, :3].T + m[:3, 3]
        return q.reshape(np.shape(points))


def random_transform(rng: np.random.Generator, *, center=(0.0, -18.0, 12.0), midline_x: float = 0.0,
                     rotation: float = 10.0, scaling: float = 0.08, shear: float = 0.03,
                     translation: float = 6.0, flip_prob: float = 0.5, nonlinear_mm: float = 3.0,
                     lattice_mm: float = 32.0, extent_mm: float = 260.0) -> SpatialTransform:
    """Draws a random spatial transform.

    Args:
        rng: random generator.
        center: template world point the affine rotates and scales about (the brain centre).
        midline_x: template mid-sagittal plane (for the flip).
        rotation: maximum rotation about each axis (degrees, uniform).
        scaling: maximum relative scaling per axis (uniform in ``1 ± scaling``).
        shear: maximum shear coefficient.
        translation: maximum translation per axis (mm).
        flip_prob: probability of a left/right flip.
        nonlinear_mm: standard deviation of the smooth displacement (mm); 0 disables it.
        lattice_mm: spacing of the displacement lattice (smoothness scale).
        extent_mm: side of the cube (centred on ``center``) the lattice covers.
    """
    c = np.asarray(center, dtype=np.float64)
    rot = vl.rotation_affine(tuple(rng.uniform(-rotation, rotation, 3)))
    sc = np.diag([*rng.uniform(1 - scaling, 1 + scaling, 3), 1.0])
    sh = np.eye(4)
    sh[[0, 0, 1, 1, 2, 2], [1, 2, 0, 2, 0, 1]] = rng.uniform(-shear, shear, 6)
    t_c, t_back = np.eye(4), np.eye(4)
    t_c[:3, 3], t_back[:3, 3] = -c, c + rng.uniform(-translation, translation, 3)
    a = t_back @ rot @ sh @ sc @ t_c
    flip = bool(rng.random() < flip_prob)
    disp = lat = None
    if nonlinear_mm > 0:
        n = max(3, int(math.ceil(extent_mm / lattice_mm)) + 1)
        step = extent_mm / (n - 1)
        lat = vl.ras_grid((n, n, n), step, center=c)
        disp = torch.from_numpy(rng.standard_normal((3, n, n, n)).astype(np.float32) * float(nonlinear_mm))
    return SpatialTransform(affine=a, flip=flip, midline_x=float(midline_x), displacement=disp, lattice_affine=lat)


def identity_transform() -> SpatialTransform:
    """The identity (no affine, flip or displacement)."""
    return SpatialTransform(affine=np.eye(4))


# ------------------------------------------------------------------------------ warping
_CACHE: dict[tuple[str, int], tuple[Anatomy, object]] = {}


def _cached(what: str, anat: Anatomy, fn):
    """Per-template cache (templates are long-lived, cached objects; the entry keeps them alive)."""
    key = (what, id(anat))
    hit = _CACHE.get(key)
    if hit is None or hit[0] is not anat:
        if len(_CACHE) > 16:
            _CACHE.clear()
        hit = _CACHE[key] = (anat, fn(anat))
    return hit[1]


def _cavity_points(anat: Anatomy) -> np.ndarray:
    """World coordinates of the cranial cavity's outer voxels (subsampled), to bound it once transformed."""
    m = anat.structure("Intracranial")
    edge = m & ~ndi.binary_erosion(m)
    idx = np.argwhere(edge)[::5]
    return anat.labels.voxel_to_world(idx)


def output_grid(template: Anatomy, tf: SpatialTransform, spacing: float, margin_mm: float = 20.0):
    """A RAS grid (shape, affine) of ``spacing`` mm: the transformed cranial cavity plus ``margin_mm``.

    The 20 mm default is seeds/004 B.2's crop ("a 20 mm margin around the cranial cavity"): the
    skull and most of the scalp are inside, the neck and face are not.
    """
    w = _cached("cavity", template, _cavity_points)
    fa = tf.forward_affine()
    w = w @ fa[:3, :3].T + fa[:3, 3]
    a, b = w.min(0) - margin_mm, w.max(0) + margin_mm
    shape = tuple(int(math.ceil((bb - aa) / spacing)) + 1 for aa, bb in zip(a, b))
    return shape, vl.ras_grid(shape, spacing, center=(a + b) / 2)


def _displacement_on_grid(tf: SpatialTransform, shape, affine, stride: int = 4) -> torch.Tensor:
    """The displacement (N, 3) at a grid's voxels: evaluated every ``stride`` voxels, then trilinear."""
    coarse = tuple(max(2, int(math.ceil((n - 1) / stride)) + 1) for n in shape)
    a = np.asarray(affine, dtype=np.float64).copy()
    a[:3, :3] = a[:3, :3] * np.array([(n - 1) / (c - 1) for n, c in zip(shape, coarse)])
    u = tf.displacement_at(_grid_points(coarse, a).double()).float()  # (Nc, 3)
    u = u.T.reshape(1, 3, *coarse)
    up = F.interpolate(u, size=shape, mode="trilinear", align_corners=True)[0]
    return up.reshape(3, -1).T


_OUTSIDE = 0xFFF << 27  # packed code of a point outside the template: nothing, far from the head


def _pack(anat: Anatomy) -> torch.Tensor:
    """All template maps in one int64 per voxel, so warping is one gather.

    Bits: label 0-11, lobe 12-14, territory 15-16, hemisphere 17-18, overlay 19-26, head distance
    27-38 (``(d + 1) * 8``, i.e. 0.125 mm steps from -1 to 510 mm).
    """
    lab = anat.array.astype(np.int64)
    if lab.max() >= 4096:
        raise ValueError("label ids must be < 4096 to warp")
    code = lab | (anat.lobes.tensor[0].numpy().astype(np.int64) << 12)
    code |= anat.territories.tensor[0].numpy().astype(np.int64) << 15
    code |= anat.hemispheres.tensor[0].numpy().astype(np.int64) << 17
    if anat.overlay is not None:
        code |= np.clip(anat.overlay.tensor[0].numpy(), 0, 255).astype(np.int64) << 19
    if anat.head_distance is not None:
        d = np.clip(np.round((anat.head_distance.tensor[0].numpy() + 1.0) * 8.0), 0, 4095).astype(np.int64)
        code |= d << 27
    else:
        code |= np.int64(0xFFF) << 27
    return torch.from_numpy(code.reshape(-1))


def _grid_points(shape, affine) -> torch.Tensor:
    """World coordinates (N, 3) float32 of a grid's voxel centres (C order)."""
    a = torch.from_numpy(np.asarray(affine, np.float64)).float()
    axes = [torch.arange(n, dtype=torch.float32) for n in shape]
    i, j, k = torch.meshgrid(*axes, indexing="ij")
    ijk = torch.stack([i.reshape(-1), j.reshape(-1), k.reshape(-1)], 1)
    return ijk @ a[:3, :3].T + a[:3, 3]


def warp(template: Anatomy, tf: SpatialTransform, spacing: float = 2.0, *, shape=None, affine=None,
         thickness: dict | None = None) -> Anatomy:
    """Samples a template anatomy on a subject grid through ``tf``.

    Args:
        template: the template anatomy (atlas or phantom).
        tf: the transform.
        spacing: working-grid voxel size (mm) when ``shape``/``affine`` are not given.
        shape, affine: an explicit output grid.
        thickness: extra-cerebral layer thicknesses (mm) to redraw the layers with (see
            :data:`synth.anatomy.DEFAULT_THICKNESS`); None keeps the template's layers.

    Returns:
        The subject anatomy; every label of the template is present (a structure that nearest
        sampling would drop at a coarse spacing keeps one voxel at its warped centroid).
    """
    if shape is None or affine is None:
        shape, affine = output_grid(template, tf, spacing)
    shape = tuple(int(s) for s in shape)
    m = torch.from_numpy(np.linalg.inv(template.affine) @ np.linalg.inv(tf.forward_affine()))
    v = _grid_points(shape, (m @ torch.from_numpy(np.asarray(affine, np.float64))).numpy())  # template voxels
    if tf.displacement is not None:
        v += _displacement_on_grid(tf, shape, affine) @ m[:3, :3].float().T
    src_shape = template.shape
    idx = torch.round(v).long()
    inside = torch.ones(idx.shape[0], dtype=torch.bool)
    for d in range(3):
        inside &= (idx[:, d] >= 0) & (idx[:, d] < src_shape[d])
        idx[:, d].clamp_(0, src_shape[d] - 1)
    lin = (idx[:, 0] * src_shape[1] + idx[:, 1]) * src_shape[2] + idx[:, 2]
    del idx
    code = torch.take(_cached("packed", template, _pack), lin)
    code = torch.where(inside, code, torch.tensor(_OUTSIDE, dtype=torch.int64)).reshape(shape).numpy()
    labels = (code & 0xFFF).astype(np.int32)
    lobes = ((code >> 12) & 0x7).astype(np.int32)
    terr = ((code >> 15) & 0x3).astype(np.int32)
    hemi = ((code >> 17) & 0x3).astype(np.int32)
    overlay = ((code >> 19) & 0xFF).astype(np.int32) if template.overlay is not None else None
    dist = ((code >> 27) & 0xFFF).astype(np.float32) / 8.0 - 1.0 if template.head_distance is not None else None
    names = dict(template.names)
    overlay_names = dict(template.overlay_names)
    if tf.flip:
        labels = swap_lut(names)[labels]
        hemi = np.array([0, 2, 1], dtype=hemi.dtype)[hemi]
        if overlay is not None and overlay_names:
            by_name = {nm: i for i, nm in overlay_names.items()}
            lut = np.arange(max(overlay_names) + 1, dtype=overlay.dtype)
            for i, nm in overlay_names.items():
                lut[i] = by_name.get(swapped_name(nm), i)
            overlay = lut[overlay]
    labels = _restore_missing(labels, template, v, tf, shape)
    if thickness is not None and dist is not None:
        labels = draw_head_layers(labels, dist, thickness)
        newly = (hemi == 0) & (labels > 0)
        if newly.any():  # layers grown beyond the template head: side of the template x
            tx = (v[:, 0] * float(template.affine[0, 0]) + v[:, 1] * float(template.affine[0, 1])
                  + v[:, 2] * float(template.affine[0, 2]) + float(template.affine[0, 3])).reshape(shape).numpy()
            left = tx < template.midline_x
            if tf.flip:
                left = ~left
            hemi = np.where(newly, np.where(left, 1, 2), hemi).astype(hemi.dtype)
        hemi = np.where(labels == 0, 0, hemi).astype(hemi.dtype)
    out_aff = np.asarray(affine, dtype=np.float64)
    like = vl.Volume(torch.zeros((1, 1, 1, 1), dtype=torch.int32), out_aff, kind="label")

    def vol(a, kind="label"):
        t = torch.from_numpy(np.ascontiguousarray(a))
        return like.new(t if kind == "image" else t.to(torch.int32), kind=kind)

    world_x = out_aff[0, 0] * np.arange(shape[0])[:, None, None] + out_aff[0, 1] * np.arange(shape[1])[None, :, None] \
        + out_aff[0, 2] * np.arange(shape[2])[None, None, :] + out_aff[0, 3]
    mid = _midline_from_labels(labels, names, np.broadcast_to(world_x, shape))
    return replace(template, labels=vol(labels), lobes=vol(lobes), territories=vol(terr), hemispheres=vol(hemi),
                   overlay=vol(overlay) if overlay is not None else None, overlay_names=overlay_names,
                   head_distance=vol(dist.astype(np.float32), "image") if dist is not None else None,
                   midline_x=float(mid), names=names)


def spacing_of(affine) -> tuple[float, float, float]:
    a = np.asarray(affine, dtype=np.float64)
    return tuple(float(s) for s in np.linalg.norm(a[:3, :3], axis=0))


def _centroids(anat: Anatomy) -> dict[int, np.ndarray]:
    a = anat.array
    ids = [i for i in anat.names if i != 0]
    objs = ndi.find_objects(a, max_label=max(ids))
    out = {}
    for i in ids:
        sl = objs[i - 1] if i - 1 < len(objs) else None
        if sl is None:
            continue
        idx = np.argwhere(a[sl] == i)
        if len(idx):
            c = idx.mean(0) + [s.start for s in sl]
            # the voxel of the structure closest to its centroid (centroids of curved shapes may lie outside)
            out[i] = idx[np.argmin(((idx + [s.start for s in sl] - c) ** 2).sum(1))] + [s.start for s in sl]
    return out


def _restore_missing(labels: np.ndarray, template: Anatomy, v: torch.Tensor, tf: SpatialTransform,
                     shape) -> np.ndarray:
    present = set(np.flatnonzero(np.bincount(labels.reshape(-1))).tolist())
    cents = _cached("centroids", template, _centroids)
    missing = [i for i in cents if i not in present]
    if not missing:
        return labels
    lut = swap_lut(template.names) if tf.flip else None
    out = labels.reshape(-1).copy()
    step = float(torch.linalg.norm(v.view(*shape, 3)[1, 0, 0] - v.view(*shape, 3)[0, 0, 0])) if shape[0] > 1 else 1.0
    tol = (0.9 * step + 1.0) ** 2  # the nearest sample lies within ~half a diagonal of the centroid
    for i in missing:
        d = ((v - torch.from_numpy(cents[i].astype(np.float32))) ** 2).sum(1)
        k = int(torch.argmin(d))
        if float(d[k]) <= tol:  # the structure is inside the field of view
            out[k] = lut[i] if lut is not None else i
    return out.reshape(shape)


# ------------------------------------------------------------------------ atrophy, growth
def smooth_noise(shape, rng: np.random.Generator, spacing, scale_mm: float = 12.0) -> np.ndarray:
    """Smooth zero-mean unit-variance noise (a random lattice of ``scale_mm`` cells, trilinear)."""
    sp = np.broadcast_to(np.asarray(spacing, dtype=float), (3,))
    n = [max(2, int(math.ceil(s * d / scale_mm)) + 1) for s, d in zip(shape, sp)]
    lo = torch.from_numpy(rng.standard_normal(n).astype(np.float32))
    up = F.interpolate(lo[None, None], size=tuple(int(s) for s in shape), mode="trilinear", align_corners=True)[0, 0]
    up = up.numpy()
    return (up - up.mean()) / max(float(up.std()), 1e-6)


#: Structure kinds for :func:`resize_structure`: group/label name pattern of the structure, and
#: where shrinking voxels go ("sink", nearest label among those) / what growth may take over.
CHANGE_KINDS = {
    "ventricles": {"structure": "Ventricles", "sink": "parenchyma", "source": "parenchyma"},
    "hippocampus": {"structure": ("Left-Hippocampus", "Right-Hippocampus"), "sink": "csf", "source": "parenchyma"},
    "cortex": {"structure": "Cerebral-Cortex", "sink": "extracerebral_csf", "source": "extracerebral_csf"},
}


def _region(anat: Anatomy, what: str) -> np.ndarray:
    if what == "parenchyma":
        return anat.mask("wm", "gm", "deep_gm")
    if what == "csf":
        return anat.mask("csf")
    if what == "extracerebral_csf":
        return anat.array == 257
    return anat.structure(what)


def structure_mask(anat: Anatomy, kind: str) -> np.ndarray:
    """The voxels of a change kind (:data:`CHANGE_KINDS` key or structure name)."""
    names = CHANGE_KINDS.get(kind, {"structure": kind})["structure"]
    out = np.zeros(anat.shape, bool)
    for nm in (names if isinstance(names, tuple) else (names,)):
        out |= anat.structure(nm)
    return out


def apply_structure_changes(anat: Anatomy, changes: dict[str, float], rng: np.random.Generator
                            ) -> tuple[Anatomy, list[dict]]:
    """Applies several volume changes so that each structure ends at exactly ``factor`` × its start volume.

    Shrinking changes run first, growing ones last; each protects the other changed structures
    (ventricles growing never eat the hippocampus), and each factor is corrected for what earlier
    changes did to it (hippocampal atrophy that widens the temporal horn counts toward the
    ventricles' change). Records as :func:`resize_structure`, with ``achieved`` = end / start.
    """
    masks0 = {k: int(structure_mask(anat, k).sum()) for k in changes}
    records = []
    for kind in sorted(changes, key=lambda k: changes[k] > 1):
        protect = np.zeros(anat.shape, bool)
        for other in changes:
            if other != kind:
                protect |= structure_mask(anat, other)
        now = int(structure_mask(anat, kind).sum())
        target = float(changes[kind]) * masks0[kind] / max(now, 1)
        anat, rec = resize_structure(anat, kind, target, rng, protect=protect)
        rec["factor"] = float(changes[kind])
        records.append(rec)
    vox_ml = anat.labels.voxel_volume / 1000.0
    for rec in records:
        n1 = int(structure_mask(anat, rec["kind"]).sum())
        n0 = masks0[rec["kind"]]
        rec.update(volume_ml_before=n0 * vox_ml, volume_ml_after=n1 * vox_ml, achieved=n1 / max(n0, 1))
    return anat, records


def resize_structure(anat: Anatomy, kind: str, factor: float, rng: np.random.Generator, *,
                     side: str | None = None, noise_strength: float = 0.35,
                     protect: np.ndarray | None = None) -> tuple[Anatomy, dict]:
    """Atrophy (``factor < 1``) or enlargement (``factor > 1``) of a structure by an exact voxel count.

    Shrinking relabels the structure's voxels nearest to its sink (e.g. hippocampus -> nearest
    CSF, cortex -> extra-cerebral CSF, ventricles -> surrounding parenchyma) with the sink's
    nearest label; growing takes over the nearest source voxels (ventricles into periventricular
    parenchyma), each taking the nearest structure label. The order is the distance scaled by
    smooth noise (``exp(noise_strength * N)``), so the change is irregular but contiguous.

    Args:
        anat: the anatomy (not modified).
        kind: a key of :data:`CHANGE_KINDS`, or any name :meth:`Anatomy.structure` resolves
            (sink/source: parenchyma).
        factor: target volume ratio after / before.
        rng: random generator.
        side: "left"/"right" to change only that hemisphere's part.
        protect: voxels whose labels must not change, nor be copied into the structure's place.

    Returns:
        (new anatomy, record) with ``record = {"kind", "side", "factor" (requested), "achieved",
        "volume_ml_before", "volume_ml_after"}``.
    """
    spec = CHANGE_KINDS.get(kind, {"structure": kind, "sink": "parenchyma", "source": "parenchyma"})
    s_mask = structure_mask(anat, kind)
    if side is not None:
        s_mask &= anat.hemispheres.tensor[0].numpy() == (1 if side == "left" else 2)
    n0 = int(s_mask.sum())
    vox_ml = anat.labels.voxel_volume / 1000.0
    rec = {"kind": kind, "side": side, "factor": float(factor), "volume_ml_before": n0 * vox_ml}
    k = int(round(abs(factor - 1.0) * n0))
    labels = anat.array.copy()
    if n0 == 0 or k == 0:
        rec.update(achieved=1.0, volume_ml_after=n0 * vox_ml)
        return anat, rec
    sp = anat.spacing
    if factor < 1:
        region, target = _region(anat, spec["sink"]) & ~s_mask, s_mask
    else:
        region, target = s_mask, _region(anat, spec["source"]) & ~s_mask
    if side is not None and factor > 1:
        target &= anat.hemispheres.tensor[0].numpy() == (1 if side == "left" else 2)
    if protect is not None:
        if factor < 1:
            region = region & ~protect
        else:
            target = target & ~protect
    if not region.any() or not target.any():
        rec.update(achieved=1.0, volume_ml_after=n0 * vox_ml)
        return anat, rec
    # shrinking only needs the sink next to the structure; growth needs room for k voxels
    margin = 3 if factor < 1 else int(math.ceil(10.0 / min(sp))) + int(round((k * 3) ** (1 / 3)))
    while True:
        box = _bbox(s_mask, margin)
        sub_region, sub_target = region[box], target[box]
        if sub_region.any() and (factor < 1 or int(sub_target.sum()) >= k) or margin > max(anat.shape):
            break
        margin *= 3
    # chessboard distance in voxels: twice as fast as the Euclidean transform, and the order is
    # randomised by the noise below anyway
    dist, idx = ndi.distance_transform_cdt(~sub_region, metric="chessboard", return_indices=True)
    dist = dist.astype(np.float32)
    # smooth multiplicative noise: irregular but contiguous change (a far voxel never jumps the queue)
    prio = dist * np.exp(noise_strength * smooth_noise(sub_target.shape, rng, sp))
    cand = np.flatnonzero(sub_target)
    sub_lab = labels[box]
    # no label may vanish: a label whose every voxel is a candidate keeps its last-in-line voxel
    cand_lab = sub_lab.reshape(-1)[cand]
    total = np.bincount(labels.reshape(-1), minlength=int(cand_lab.max(initial=0)) + 1)
    in_cand = np.bincount(cand_lab, minlength=total.size)
    full = np.flatnonzero((in_cand == total[:in_cand.size]) & (in_cand > 0))
    if full.size:
        p_c = prio.reshape(-1)[cand]
        drop = [np.flatnonzero(cand_lab == lab)[np.argmax(p_c[cand_lab == lab])] for lab in full]
        cand = np.delete(cand, drop)
    k = min(k, cand.size)
    chosen = cand[np.argpartition(prio.reshape(-1)[cand], k - 1)[:k]] if k > 0 else cand[:0]
    src = np.stack([i.reshape(-1)[chosen] for i in idx])
    new_vals = sub_lab[src[0], src[1], src[2]]
    flat = sub_lab.reshape(-1).copy()
    flat[chosen] = new_vals
    labels[box] = flat.reshape(sub_lab.shape)
    out = anat.with_labels(labels)
    # lobes / territories follow the tissue: voxels that stopped being cortex or white matter lose them
    keep = out.mask("gm", "wm")
    lobes = np.where(keep, anat.lobes.tensor[0].numpy(), 0)
    terr = np.where(keep, anat.territories.tensor[0].numpy(), 0)
    out = replace(out, lobes=anat.lobes.new(torch.from_numpy(lobes.astype(np.int32))),
                  territories=anat.territories.new(torch.from_numpy(terr.astype(np.int32))))
    n1 = n0 - k if factor < 1 else n0 + k
    rec.update(achieved=n1 / n0, volume_ml_after=n1 * vox_ml)
    return out, rec


def redraw_layers(anat: Anatomy, thickness: dict) -> Anatomy:
    """The anatomy with its extra-cerebral layers redrawn at ``thickness`` (needs ``head_distance``)."""
    if anat.head_distance is None:
        return anat
    lab = draw_head_layers(anat.array, anat.head_distance.tensor[0].numpy(), thickness)
    return anat.with_labels(lab)


__all__ = ["SpatialTransform", "random_transform", "identity_transform", "warp", "output_grid",
           "resize_structure", "apply_structure_changes", "structure_mask", "CHANGE_KINDS", "smooth_noise", "redraw_layers", "SINUS"]
