"""Synthetic lesions on real anatomy, with exact metadata (seeds/004 §3.2, B.6).

Shape: multi-scale Brownian noise minus a quadratic fall-off sized to a sampled diameter,
thresholded so that exactly ``round(volume / voxel volume)`` voxels of the allowed anatomy are
inside (volume of the sampled-diameter sphere). The allowed anatomy depends on the class and
location: parenchymal lesions live in cerebral WM/GM/deep GM, intraventricular ones in the
ventricles, extra-axial ones in the extra-cerebral CSF, dura and the adjacent cortex. The
continuous shape field is kept, so :func:`change` grows or shrinks a lesion by an exact volume
factor. Heterogeneous lesions are split into concentric parts (e.g. necrotic core, enhancing rim,
edema) by ranking their voxels on the shape field plus a secondary Brownian field.

Rendering (:func:`render`): every part has, per contrast, a signal *relative to the surrounding
parenchyma* (``("rel", r)``: MR ``ring × (1 + r)``, CT ``ring + r`` HU), CSF-like signal
(``("csf", m)``: ``m × CSF + (1 - m) × ring`` measured on the image), or an absolute CT density
(``("hu", v)``). Interiors get a Perlin texture and soft borders; the whole-lesion mean is then
moved into the band of its declared signal class (hyper ≥ +25 %, hypo ≤ -25 %, iso within ±4 %
of the surrounding ring; CT also ≥ +10 / ≤ -8 HU), so ``meta["signal"]`` always agrees with the
image under ``voxel_lib.signal_class`` (threshold 10 %). Post-contrast T1 = T1 signal plus each
part's enhancement; PD derives from T2 (× 0.45), SWI from GRE (darkening × 1.2).

Per-class placement and signal rules live in :mod:`synth.lesion_classes`; ontology parents
(``meta["ontology"]``) in ``ONTOLOGY``.

Metadata is measured from the final mask and the anatomy maps (:func:`measure_meta`):
hemisphere (the ``hemispheres`` map; "bilateral" when the smaller side holds ≥ 10 %, as
``voxel_lib.side``), lobe (majority of the voxels in the ``lobes`` map when they are ≥ 30 % of
the lesion; extra-axial lesions take the majority lobe of a 6 mm shell of parenchyma around
them; intraventricular ones have none), deep structure (majority deep-GM / brainstem /
cerebellum / ventricle label when those are ≥ 30 % of the lesion), territory (majority of the
``territories`` map when it covers ≥ 50 %), volume (voxel count × voxel volume) and the
equivalent-sphere diameter.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import scipy.ndimage as ndi

from . import contrast as _contrast
from .lesion_classes import LESION_CLASSES, ONTOLOGY, PLANS, uniform
from .noise import brownian, perlin_at

__all__ = ["LESION_CLASSES", "ONTOLOGY", "SIGNALS", "Lesion", "sample_lesions", "sample_lesion",
           "change", "render", "measure_meta", "enhancing_mask", "growth_capacity", "reference_ring", "relative_signal", "signal_of",
           "example_gallery"]

SIGNALS = ("hyper", "iso", "hypo")
# Label values of the anatomy's lobes / territories maps (synth.anatomy.LOBES / TERRITORIES, CONTRACT.md).
LOBES = {1: "frontal", 2: "parietal", 3: "temporal", 4: "occipital", 5: "insula", 6: "cingulate"}
TERRITORIES = {1: "ACA", 2: "MCA", 3: "PCA"}
CONTRASTS = _contrast.CONTRASTS
PARENCHYMA = ("wm", "gm", "deep_gm", "cerebellum_wm", "cerebellum_gm", "brainstem")
_DEEP = ("deep_gm", "brainstem", "cerebellum_wm", "cerebellum_gm")

# Signal classes: plan classification threshold and rendered bands (relative to the ring mean).
_CLASSIFY = 0.12
_BAND = 0.25
_ISO = 0.04
_CT_HYPER_HU, _CT_HYPO_HU, _CT_ISO_HU = 10.0, 8.0, 2.0


@dataclass
class Lesion:
    """One synthetic lesion on the labels grid.

    Attributes:
        mask: boolean lesion mask (labels grid).
        components: named sub-parts of heterogeneous lesions (e.g. "enhancing", "necrotic",
            "edema"), disjoint, their union is ``mask``; empty for homogeneous lesions.
        meta: JSON-serialisable metadata (see module docstring and ``synth/CONTRACT.md``).
        params: private shape and rendering parameters (shape field, allowed region, part
            appearance, texture); not serialisable, not part of the ground truth.
    """

    mask: np.ndarray
    components: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict, repr=False)

    @property
    def cls(self) -> str:
        return self.meta["cls"]


# ----------------------------------------------------------------------------- anatomy context
class _Ctx:
    """Per-call views of the anatomy: tissue per voxel, spacing, handy masks (lazily cached)."""

    def __init__(self, anatomy):
        self.anatomy = anatomy
        self.lab, lut = _contrast.tissue_index(anatomy)
        lut = np.where(lut < 0, len(_contrast.TISSUES), lut).astype(np.int16)  # unknown -> sentinel
        self.tis = lut[self.lab]
        self._nlab = lut.shape[0]
        self.shape = self.lab.shape
        self.spacing = np.asarray(anatomy.labels.spacing, dtype=np.float64)
        self.voxvol = float(anatomy.labels.voxel_volume)
        self._cache: dict = {}

    def tissue(self, *names) -> np.ndarray:
        key = ("t",) + tuple(sorted(names))
        if key not in self._cache:
            sel = np.zeros(len(_contrast.TISSUES) + 1, bool)
            sel[[_contrast.TISSUES.index(n) for n in names]] = True
            self._cache[key] = sel[self.tis]
        return self._cache[key]

    def labels_in(self, ids) -> np.ndarray:
        """Mask of the voxels whose label id is in ``ids`` (lookup table, fast)."""
        sel = np.zeros(self._nlab, bool)
        sel[[i for i in ids if 0 <= i < self._nlab]] = True
        return sel[self.lab]

    def ids_where(self, pred: Callable[[int, str], bool]) -> list[int]:
        return [i for i, n in self.anatomy.names.items() if pred(i, n)]

    @property
    def ventricles(self) -> np.ndarray:
        if "vent" not in self._cache:
            ids = self.ids_where(lambda i, n: "vent" in n.lower() and self.anatomy.tissue.get(i) == "csf")
            self._cache["vent"] = self.labels_in(ids)
        return self._cache["vent"]

    @property
    def lateral_ventricles(self) -> np.ndarray:
        if "latvent" not in self._cache:
            ids = self.ids_where(lambda i, n: ("lateral-ventricle" in n.lower() or "inf-lat-vent" in n.lower()))
            m = self.labels_in(ids)
            self._cache["latvent"] = m if m.any() else self.ventricles
        return self._cache["latvent"]

    @property
    def ext_csf(self) -> np.ndarray:
        return self.tissue("csf") & ~self.ventricles

    @property
    def cerebral(self) -> np.ndarray:
        return self.tissue("wm", "gm", "deep_gm")

    @property
    def parenchyma(self) -> np.ndarray:
        return self.tissue(*PARENCHYMA)

    def near(self, mask: np.ndarray, mm: float, key: str | None = None) -> np.ndarray:
        """Voxels within ``mm`` of ``mask`` (box dilation on the mask's bounding box; cached by ``key``)."""
        if key is not None and (key, mm) in self._cache:
            return self._cache[key, mm]
        out = np.zeros(self.shape, bool)
        if mask.any():
            r = np.maximum(1, np.round(mm / self.spacing)).astype(int)
            sub = _crop_around(mask, float(mm), self.spacing)
            m = mask[sub].view(np.uint8)
            for ax in range(3):
                m = ndi.maximum_filter1d(m, 2 * r[ax] + 1, axis=ax)
            out[sub] = m.astype(bool)
        if key is not None:
            self._cache[key, mm] = out
        return out

    def grid_mm(self, box) -> list[np.ndarray]:
        return [(np.arange(s.start, s.stop) * sp).reshape([-1 if a == ax else 1 for a in range(3)])
                for ax, (s, sp) in enumerate(zip(box, self.spacing))]


# ----------------------------------------------------------------------------- signal planning
def _nominal_rel(spec, c: str) -> float:
    """Relative signal of a part spec on the nominal contrast (ring = mean of WM and GM)."""
    nom = _contrast.NOMINAL[c]
    ring = 0.5 * (nom["wm"] + nom["gm"])
    kind, v = spec
    if kind == "csf":
        return v * (nom["csf"] - ring) / abs(ring)
    if kind == "hu":
        return (v - ring) / abs(ring)
    return v / abs(ring) if c == "ct" else v


def _classify(r: float) -> str:
    return "hyper" if r > _CLASSIFY else "hypo" if r < -_CLASSIFY else "iso"


def _plan_signal(parts, app) -> dict[str, str]:
    """Whole-lesion signal class per contrast; shifts 'rel' specs so the plan sits inside its band."""
    out = {}
    for c in CONTRASTS:
        r = sum(f * _nominal_rel(app[p][c], c) for p, f in parts if f > 0)
        cls = _classify(r)
        lo, hi = {"hyper": (_BAND, np.inf), "hypo": (-np.inf, -_BAND), "iso": (-_ISO, _ISO)}[cls]
        target = min(max(r, lo), hi)
        rel_frac = sum(f for p, f in parts if f > 0 and app[p][c][0] == "rel")
        if target != r and rel_frac > 0:
            shift = (target - r) / rel_frac
            if c == "ct":
                shift *= abs(0.5 * (_contrast.NOMINAL["ct"]["wm"] + _contrast.NOMINAL["ct"]["gm"]))
            for p, f in parts:
                if f > 0 and app[p][c][0] == "rel":
                    app[p][c] = ("rel", app[p][c][1] + shift)
        out[c] = cls
    return out


# ----------------------------------------------------------------------------- shape
def _box_for(ctx, foci, factor=1.7):
    """Box around the foci, large enough for the lesion to grow about 4× in volume (1.3: elongation)."""
    lo = np.full(3, np.inf)
    hi = np.full(3, -np.inf)
    for c, d in foci:
        r = np.ceil(factor * 0.5 * d * 1.3 / ctx.spacing) + 3
        lo = np.minimum(lo, c - r)
        hi = np.maximum(hi, c + r + 1)
    lo = np.clip(lo, 0, None).astype(int)
    hi = np.minimum(hi, ctx.shape).astype(int)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def _shape_field(ctx, foci, box, rng, lobulation):
    """max over foci of (beta * Brownian - (distance / radius)^2) on the box (float32)."""
    shp = tuple(s.stop - s.start for s in box)
    gx, gy, gz = ctx.grid_mm(box)
    dmean = float(np.mean([d for _, d in foci]))
    scales = tuple(max(2 * float(ctx.spacing.min()), dmean / k) for k in (1.0, 2.0, 4.0))
    noise = brownian(shp, rng, spacing=ctx.spacing, scales_mm=scales, hurst=0.7)
    beta = uniform(rng, *lobulation)
    f = np.full(shp, -np.inf, dtype=np.float32)
    for c, d in foci:
        cm = c * ctx.spacing
        ax = 0.5 * d * np.exp(rng.uniform(-0.25, 0.25, 3))
        d2 = ((gx - cm[0]) / ax[0]) ** 2 + ((gy - cm[1]) / ax[1]) ** 2 + ((gz - cm[2]) / ax[2]) ** 2
        np.maximum(f, (beta * noise - d2).astype(np.float32), out=f)
    return f


def _top_n(fld: np.ndarray, allowed: np.ndarray, n: int) -> np.ndarray:
    """Exactly ``n`` allowed voxels with the largest field values (all allowed if fewer)."""
    out = np.zeros(fld.shape, dtype=bool)
    idx = np.flatnonzero(allowed)
    if n >= idx.size:
        out.ravel()[idx] = True
        return out
    if n <= 0:
        return out
    sel = np.argpartition(-fld.ravel()[idx], n - 1)[:n]
    out.ravel()[idx[sel]] = True
    return out


def _layers(mask_box: np.ndarray, rank: np.ndarray, parts) -> dict[str, np.ndarray]:
    """Concentric parts: the innermost part takes the highest-ranked voxels, and so on outward."""
    idx = np.flatnonzero(mask_box)
    order = idx[np.argsort(-rank.ravel()[idx], kind="stable")]
    n = idx.size
    out = {}
    start = 0
    fr = [f for _, f in parts]
    for k, (name, f) in enumerate(reversed(parts)):
        cnt = n - start if k == len(parts) - 1 else int(round(sum(fr[len(parts) - 1 - k:]) * n)) - start
        m = np.zeros(mask_box.shape, dtype=bool)
        m.ravel()[order[start:start + max(cnt, 0)]] = True
        out[name] = m
        start += max(cnt, 0)
    return out


def _paste(ctx, box, arr) -> np.ndarray:
    out = np.zeros(ctx.shape, dtype=bool)
    out[box] = arr
    return out


def _assemble(ctx, les: Lesion) -> None:
    """Sets mask and components from params (field, allowed, n, parts)."""
    p = les.params
    box = p["box"]
    m = _top_n(p["field"], p["allowed"], p["n"])
    les.mask = _paste(ctx, box, m)
    parts = [(k, f) for k, f in p["parts"] if f > 0]
    if len(parts) > 1:
        lay = _layers(m, p["rank"], parts)
        les.components = {k: _paste(ctx, box, v) for k, v in lay.items() if v.any()}
    else:
        les.components = {}


# ----------------------------------------------------------------------------- metadata
def _majority(values: np.ndarray) -> tuple[int, int]:
    if values.size == 0:
        return 0, 0
    u, cnt = np.unique(values, return_counts=True)
    k = int(np.argmax(cnt))
    return int(u[k]), int(cnt[k])


def growth_capacity(lesion: Lesion) -> float:
    """The largest volume factor :func:`change` can apply (allowed voxels around it / its voxels)."""
    return float((lesion.params["allowed"] | lesion.mask[lesion.params["box"]]).sum()) / max(1, int(lesion.mask.sum()))


def enhancing_mask(lesion: Lesion) -> np.ndarray:
    """The voxels of the lesion's enhancing parts (the whole mask for a homogeneous enhancing lesion)."""
    p = lesion.params
    parts = [k for k, f in p["parts"] if f > 0 and p["app"][k]["_enh"] >= 0.3]
    if not lesion.components:
        return lesion.mask.copy() if parts else np.zeros_like(lesion.mask)
    out = np.zeros_like(lesion.mask)
    for k in parts:
        if k in lesion.components:
            out |= lesion.components[k]
    return out


def measure_meta(mask: np.ndarray, anatomy, *, _ctx: _Ctx | None = None) -> dict:
    """Location metadata measured from a mask and the anatomy maps (rules in the module docstring).

    Returns:
        ``{hemisphere, lobe, deep_structure, territory, volume_ml, diameter_mm, center_mm}``.
    """
    ctx = _ctx or _Ctx(anatomy)
    m = np.asarray(mask, dtype=bool)
    n = int(m.sum())
    if n == 0:
        raise ValueError("measure_meta: empty mask")
    hemi = anatomy.hemispheres.numpy()[0][m]
    nl, nr = int((hemi == 1).sum()), int((hemi == 2).sum())
    if nl + nr == 0:
        x = anatomy.labels.voxel_to_world(np.argwhere(m).astype(float))[:, 0]
        nl, nr = int((x < anatomy.midline_x).sum()), int((x >= anatomy.midline_x).sum())
    left = nl / (nl + nr)
    hemisphere = "left" if left >= 0.9 else "right" if left <= 0.1 else "bilateral"

    lobes = anatomy.lobes.numpy()[0]
    lv = lobes[m]
    lab, cnt = _majority(lv[lv > 0])
    lobe = None
    if (lv > 0).sum() >= 0.3 * n:
        lobe = LOBES.get(lab)
    else:
        paren = ctx.parenchyma[m].mean()
        vent = ctx.ventricles[m].mean()
        if paren < 0.5 and vent < 0.5:  # extra-axial: the lobe it abuts
            sp = ctx.spacing
            sub = _crop_around(m, 6.0, sp)
            dist = ndi.distance_transform_edt(~m[sub], sampling=sp)
            shell = (dist > 0) & (dist <= 6.0) & ctx.parenchyma[sub]
            sv = lobes[sub][shell]
            lab, _ = _majority(sv[sv > 0])
            lobe = LOBES.get(lab) if lab else None

    labs = ctx.lab[m]
    deep_sel = ctx.tissue(*_DEEP)[m] | ctx.ventricles[m]
    deep = None
    if deep_sel.sum() >= 0.3 * n:
        lab, _ = _majority(labs[deep_sel])
        deep = anatomy.names.get(lab)

    tv = anatomy.territories.numpy()[0][m]
    territory = None
    if (tv > 0).sum() >= 0.5 * n:
        lab, _ = _majority(tv[tv > 0])
        territory = TERRITORIES.get(lab)

    vol = n * ctx.voxvol
    center = anatomy.labels.voxel_to_world(np.argwhere(m).mean(0))
    return {"hemisphere": hemisphere, "lobe": lobe, "deep_structure": deep, "territory": territory,
            "volume_ml": round(vol / 1000.0, 4), "diameter_mm": round((6 * vol / math.pi) ** (1 / 3), 2),
            "center_mm": [round(float(v), 1) for v in center]}


def _crop_around(m: np.ndarray, mm: float, spacing) -> tuple[slice, ...]:
    idx = np.argwhere(m)
    pad = np.ceil(mm / np.asarray(spacing)).astype(int) + 1
    lo = np.maximum(idx.min(0) - pad, 0)
    hi = np.minimum(idx.max(0) + pad + 1, m.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


# ----------------------------------------------------------------------------- sampling
def _build(ctx, cls: str, plan: dict, rng, occupied: np.ndarray, lesion_id: int) -> Lesion | None:
    foci = [(c, d) for c, d in plan["foci"] if c is not None]
    if not foci:
        return None
    box = _box_for(ctx, foci)
    fld = _shape_field(ctx, foci, box, rng, plan.get("lobulation", (0.4, 1.2)))
    allowed = plan["allowed"][box] & ~occupied[box]
    if plan.get("same_side", True) and len(foci) == 1:  # stay in the hemisphere of the centre
        hemi = ctx.anatomy.hemispheres.numpy()[0]
        side = hemi[tuple(foci[0][0])]
        if side > 0:
            allowed &= hemi[box] == side
    if "prefer" in plan:  # pull extra-axial lesions toward their compartment
        fld = fld + 0.5 * plan["prefer"][box].astype(np.float32)
    n = int(round(sum(math.pi / 6 * d ** 3 for _, d in foci) / ctx.voxvol))
    shp = fld.shape
    rank = fld + uniform(rng, 0.2, 0.5) * brownian(shp, rng, spacing=ctx.spacing,
                                               scales_mm=(max(4.0, foci[0][1] / 2), max(2.0, foci[0][1] / 4)))
    app = plan["app"]
    parts = [(k, float(f)) for k, f in plan["parts"]]
    signal = _plan_signal([(k, f) for k, f in parts if f > 0], app)
    les = Lesion(mask=np.zeros(ctx.shape, bool),
                 params={"box": box, "field": fld, "allowed": allowed, "n": max(1, n), "rank": rank.astype(np.float32),
                         "parts": parts, "app": app, "texture_seed": int(rng.integers(2**31)),
                         "border_alpha": uniform(rng, 0.55, 0.9), "texture_amp": uniform(rng, 0.03, 0.1),
                         "bloom": plan.get("bloom", False), "nominal_diameter_mm": float(foci[0][1])})
    _assemble(ctx, les)
    if les.mask.sum() < 2:
        return None
    enh = any(app[k]["_enh"] >= 0.3 for k, f in parts if f > 0)
    meta = {"id": lesion_id, "cls": cls, "ontology": list(ONTOLOGY[cls]), "acuity": plan.get("acuity"),
            "location": plan["location"]}
    meta.update(measure_meta(les.mask, ctx.anatomy, _ctx=ctx))
    meta.update({"signal": signal, "enhancement": bool(enh),
                 "restriction": signal["dwi"] == "hyper" and signal["adc"] == "hypo",
                 "components": sorted(les.components), "grade": plan.get("grade")})
    if cls == "wmh":
        meta["n_foci"] = len(foci)
    les.meta = meta
    return les


def sample_lesion(anatomy, rng: np.random.Generator, cls: str, *, lesion_id: int = 1,
                  occupied: np.ndarray | None = None, tries: int = 8, _ctx: _Ctx | None = None) -> Lesion:
    """One lesion of class ``cls`` (see ``LESION_CLASSES``), avoiding ``occupied`` voxels."""
    if cls not in PLANS:
        raise ValueError(f"unknown lesion class {cls!r}; choose one of {LESION_CLASSES}")
    ctx = _ctx or _Ctx(anatomy)
    occ = np.zeros(ctx.shape, bool) if occupied is None else np.asarray(occupied, bool)
    free = ~occ
    for _ in range(tries):
        les = _build(ctx, cls, PLANS[cls](ctx, rng, free), rng, occ, lesion_id)
        if les is not None:
            return les
    raise RuntimeError(f"could not place a {cls} lesion in this anatomy")


def sample_lesions(anatomy, rng: np.random.Generator, n: int = 1, classes: Sequence[str] | None = None) -> list[Lesion]:
    """``n`` non-overlapping lesions with distinct descriptions.

    Args:
        anatomy: a ``synth.anatomy.Anatomy``.
        rng: random generator.
        n: number of lesions.
        classes: one class per lesion, or a pool to draw from (default: all classes, without
            repetition while possible).

    Lesions are at least 4 mm apart (never overlapping or touching), and each is redrawn (up to
    6 times) while it shares (class, hemisphere, lobe, deep structure) with an earlier one.
    Ids are 1..n in order.
    """
    ctx = _Ctx(anatomy)
    if classes is not None and len(classes) == n:
        chosen = list(classes)
    else:
        pool = list(classes or LESION_CLASSES)
        chosen = list(rng.choice(pool, size=n, replace=n > len(pool)))
    occupied = np.zeros(ctx.shape, bool)
    out: list[Lesion] = []
    seen = set()
    for k, cls in enumerate(chosen, start=1):
        les = None
        for _ in range(6):
            cand = sample_lesion(anatomy, rng, str(cls), lesion_id=k, occupied=ctx.near(occupied, 4), _ctx=ctx)
            key = (cand.cls, cand.meta["hemisphere"], cand.meta["lobe"], cand.meta["deep_structure"])
            les = cand
            if key not in seen:
                break
        seen.add((les.cls, les.meta["hemisphere"], les.meta["lobe"], les.meta["deep_structure"]))
        occupied |= les.mask
        out.append(les)
    return out


def change(lesion: Lesion, anatomy, factor: float, rng: np.random.Generator, *,
           avoid: np.ndarray | None = None) -> Lesion:
    """The same lesion grown or shrunk to ``factor`` × its volume (exact to one voxel).

    Growth keeps every current voxel and adds the best-ranked allowed voxels of the lesion's
    shape field, perturbed by fresh Brownian noise so growth is irregular; shrinkage keeps a
    subset. Parts keep their fractions. Identity, class and signal are kept; location metadata
    is re-measured.

    Args:
        lesion: the lesion (unchanged).
        anatomy: its anatomy.
        factor: volume factor (> 0).
        rng: random generator.
        avoid: optional mask the grown lesion must not enter (e.g. other lesions).

    Raises:
        ValueError: when the allowed anatomy around the lesion cannot hold the grown lesion
            (``factor > growth_capacity(lesion)``).
    """
    if factor <= 0:
        raise ValueError("factor must be positive")
    ctx = _Ctx(anatomy)
    p = lesion.params
    box = p["box"]
    cur = lesion.mask[box]
    allowed = p["allowed"] | cur
    if avoid is not None:
        allowed = allowed & (~np.asarray(avoid, bool)[box] | cur)
    n_old = int(cur.sum())
    n_new = max(1, int(round(factor * n_old)))
    if n_new > int(allowed.sum()):
        raise ValueError(f"cannot grow this lesion by {factor}: its allowed region holds "
                         f"{int(allowed.sum())} voxels, {n_new} needed")
    fld = p["field"] + 0.3 * brownian(cur.shape, rng, spacing=ctx.spacing, scales_mm=(8.0, 4.0))
    if n_new >= n_old:  # keep every current voxel
        fld = np.where(cur, fld + np.float32(1e4), fld)
    else:  # keep a subset
        fld = np.where(cur, fld, fld - np.float32(1e4))
    new = Lesion(mask=lesion.mask, components={}, meta=copy.deepcopy(lesion.meta), params=dict(p))
    new.params.pop("_cache", None)
    new.params.update(field=fld.astype(np.float32), allowed=allowed, n=n_new)
    _assemble(ctx, new)
    new.meta.update(measure_meta(new.mask, anatomy, _ctx=ctx))
    new.meta["components"] = sorted(new.components)
    return new


# ----------------------------------------------------------------------------- rendering
def reference_ring(mask: np.ndarray, anatomy, exclude: np.ndarray | None = None, *, _ctx: _Ctx | None = None,
                   min_voxels: int = 20) -> np.ndarray:
    """The surrounding-tissue reference of a lesion: a shell of parenchyma around it.

    The shell is 3 mm wide (as ``voxel_lib.surrounding``), limited to brain parenchyma and
    outside ``exclude`` (other lesions); it widens to 6, 10, 15 mm while it holds fewer than
    ``min_voxels`` (e.g. intraventricular lesions). Falls back to any non-background shell.
    """
    ctx = _ctx or _Ctx(anatomy)
    m = np.asarray(mask, bool)
    sub = _crop_around(m, 16.0, ctx.spacing)
    dist = ndi.distance_transform_edt(~m[sub], sampling=ctx.spacing)
    ok = ctx.parenchyma[sub]
    if exclude is not None:
        ok = ok & ~np.asarray(exclude, bool)[sub]
    ring = None
    for w in (3.0, 6.0, 10.0, 15.0):
        ring = (dist > 0) & (dist <= w) & ok
        if ring.sum() >= min_voxels:
            break
    if ring.sum() == 0:
        ring = (dist > 0) & (dist <= 3.0) & (ctx.tis[sub] > 0)
        if exclude is not None:
            ring &= ~np.asarray(exclude, bool)[sub]
    out = np.zeros(ctx.shape, bool)
    out[sub] = ring
    return out


def relative_signal(image: np.ndarray, mask: np.ndarray, ring: np.ndarray) -> float:
    """(mean in mask - mean in ring) / |mean in ring| (what ``voxel_lib.signal_class`` thresholds)."""
    a = float(np.mean(image[mask], dtype=np.float64))
    b = float(np.mean(image[ring], dtype=np.float64))
    return (a - b) / (abs(b) or 1.0)


def signal_of(rel: float, threshold: float = 0.1) -> str:
    """"hyper" / "iso" / "hypo" from a relative signal (``voxel_lib.signal_class`` rule)."""
    return "hyper" if rel > threshold else "hypo" if rel < -threshold else "iso"


def _cached(les: Lesion, key, make):
    cache = les.params.setdefault("_cache", {})
    if key not in cache:
        cache[key] = make()
    return cache[key]


def _texture_at(les: Lesion, ctx: _Ctx, loc) -> np.ndarray:
    """Perlin texture of the lesion (fixed lattice on its box) at box-local voxel indices ``loc``."""
    p = les.params
    pts = np.stack(loc, 1)
    scale = float(np.clip(p["nominal_diameter_mm"] / 2, 4.0, 16.0))
    return perlin_at(pts, p["field"].shape, np.random.default_rng(p["texture_seed"]), spacing=ctx.spacing,
                     scale_mm=scale, octaves=2)


def _border_alpha(les: Lesion, ctx: _Ctx, vox) -> np.ndarray:
    """Blend weight per lesion voxel: 1 inside, ``border_alpha`` on voxels with a face neighbour outside."""
    sub = _crop_around(les.mask, 2.0, ctx.spacing)
    inner = np.zeros(ctx.shape, bool)
    inner[sub] = ndi.binary_erosion(les.mask[sub])
    return np.where(inner[vox], 1.0, les.params["border_alpha"]).astype(np.float32)


def _band(cls: str, ring: float, contrast: str) -> tuple[float, float]:
    a = abs(ring) or 1.0
    if contrast == "ct":
        if cls == "hyper":
            return ring + max(_BAND * a, _CT_HYPER_HU), np.inf
        if cls == "hypo":
            return -np.inf, ring - max(_BAND * a, _CT_HYPO_HU)
        w = min(_ISO * a, _CT_ISO_HU)
        return ring - w, ring + w
    if cls == "hyper":
        return ring + _BAND * a, np.inf
    if cls == "hypo":
        return -np.inf, ring - _BAND * a
    return ring - _ISO * a, ring + _ISO * a


def _part_value(spec, contrast, ring, csf):
    kind, v = spec
    if kind == "csf":
        return v * csf + (1 - v) * ring
    if kind == "hu":
        return v if contrast == "ct" else ring
    return ring + v if contrast == "ct" else ring * (1 + v)


def render(image: np.ndarray, contrast: str, lesions: Sequence[Lesion], anatomy,
           rng: np.random.Generator) -> np.ndarray:
    """Paints lesions into a synthesized image (labels grid); returns a new float32 array.

    Call on the output of ``synth.contrast.synthesize`` before artifacts. Each lesion's mean
    signal relative to its :func:`reference_ring` (other lesions excluded) lands in the band of
    ``meta["signal"][contrast]``. Blood that is dark on GRE/SWI also darkens a 3 mm halo
    outside its mask (blooming); the bands account for it (the ring is measured after it).
    """
    if contrast not in CONTRASTS:
        raise ValueError(f"unknown contrast {contrast!r}")
    img = np.array(image, dtype=np.float32)
    if not lesions:
        return img
    ctx = _Ctx(anatomy)
    union = np.zeros(ctx.shape, bool)
    for les in lesions:
        union |= les.mask
    for les in lesions:  # susceptibility blooming: a dark halo around blood on T2*-weighted images
        if les.params.get("bloom") and contrast in ("gre", "swi") and les.meta["signal"][contrast] == "hypo":
            sub = _crop_around(les.mask, 4.0, ctx.spacing)
            dist = ndi.distance_transform_edt(~les.mask[sub], sampling=ctx.spacing)
            halo = (dist > 0) & (dist <= 3.0) & ~union[sub]
            region = img[sub]
            region[halo] *= np.float32(1 - uniform(rng, 0.15, 0.35))
    out = img.copy()
    csf_m = ctx.lateral_ventricles & ~union
    if csf_m.sum() < 20:
        csf_m = ctx.tissue("csf") & ~union
    csf = float(np.median(img[csf_m])) if csf_m.any() else float(_contrast.NOMINAL[contrast]["csf"])
    mr = contrast != "ct"
    union_key = tuple((les.meta.get("id"), int(les.params.get("n", 0))) for les in lesions)
    for les in lesions:
        p = les.params
        box = p["box"]
        ring_m = _cached(les, ("ring", union_key), lambda: reference_ring(les.mask, anatomy, union, _ctx=ctx))
        ring = float(np.mean(img[ring_m], dtype=np.float64)) if ring_m.any() else float(np.mean(img[les.mask]))
        vox = _cached(les, "vox", lambda: np.nonzero(les.mask))
        loc = tuple(v - s.start for v, s in zip(vox, box))
        base = np.empty(vox[0].size, dtype=np.float32)
        amp = np.empty_like(base)
        parts = {k: f for k, f in p["parts"] if f > 0}
        comp = les.components or {next(iter(parts)): les.mask}
        for name, cm in comp.items():
            sel = cm[vox]
            spec = p["app"][name][contrast]
            base[sel] = _part_value(spec, contrast, ring, csf)
            amp[sel] = p["texture_amp"] * (0.4 if spec[0] == "csf" else 1.0)
        tex = _cached(les, "tex", lambda: _texture_at(les, ctx, loc))
        if mr:
            new = base * (1 + amp * tex)
        else:
            new = base + amp * 30.0 * tex
        alpha = _cached(les, "alpha", lambda: _border_alpha(les, ctx, vox))
        healthy = img[vox]
        val = alpha * new + (1 - alpha) * healthy
        lo, hi = _band(les.meta["signal"][contrast], ring, contrast)
        wa = float(alpha.mean())
        for _ in range(3):
            mval = float(val.mean(dtype=np.float64))
            if lo <= mval <= hi:
                break
            margin = 0.005 * abs(ring) + 1e-4
            target = lo + margin if mval < lo else hi - margin
            val = val + (target - mval) * alpha / wa
            if mr:
                np.clip(val, 0, None, out=val)
        out[vox] = val
    return out


# ----------------------------------------------------------------------------- docs gallery
def example_gallery(anatomy, out_dir, *, seed: int = 0, classes: Sequence[str] = LESION_CLASSES,
                    contrasts: Sequence[str] = ("t1w", "t2w", "flair", "dwi", "adc", "gre", "t1c", "ct")
                    ) -> dict[str, Path]:
    """Writes one PNG per lesion class (axial slice through the lesion in several contrasts) and a montage.

    Returns:
        ``{cls: path}`` (``lesion_<cls>.png``) plus ``"montage"`` (``lesions.png``).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import artifacts
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = {}
    for k, cls in enumerate(classes):
        rng = np.random.default_rng([seed, 100 + k])
        les = max((sample_lesions(anatomy, rng, 1, [cls])[0] for _ in range(4)),  # the most visible of 4
                  key=lambda le: le.meta["volume_ml"] * (le.meta["location"] != "intraventricular"))
        z = int(np.argmax(les.mask.sum(axis=(0, 1))))
        panels = []
        for j, c in enumerate(contrasts):
            r2 = np.random.default_rng([seed, 100 + k, j])
            img = render(_contrast.synthesize(anatomy, c, r2), c, [les], anatomy, r2)
            img = artifacts.add_noise(artifacts.corrupt(img, c, r2, anatomy.labels.spacing, strength=0.4), r2, 0.015,
                                      contrast=c)
            panels.append((c, np.rot90(img[:, :, z])))
        rows[cls] = (les, panels, np.rot90(les.mask[:, :, z]))
    paths: dict[str, Path] = {}

    def draw(axs, les, panels, outline):
        for ax, (c, sl) in zip(axs, panels):
            lo, hi = (0.0, 80.0) if c == "ct" else (0.0, float(np.percentile(sl, 99.5)) or 1.0)
            ax.imshow(sl, cmap="gray", vmin=lo, vmax=hi)
            ax.set_title(c, fontsize=9)
            ax.axis("off")
        axs[-1].imshow(panels[0][1], cmap="gray", vmin=0, vmax=float(np.percentile(panels[0][1], 99.5)) or 1)
        axs[-1].contour(outline, levels=[0.5], colors="r", linewidths=0.8)
        axs[-1].set_title("mask", fontsize=9)
        axs[-1].axis("off")

    def caption(les):
        m = les.meta
        where = " ".join(x for x in (m["hemisphere"], m["lobe"] or m["deep_structure"] or "") if x)
        extra = [m["acuity"]] if m["acuity"] else []
        extra += ["enhancing"] if m["enhancement"] else []
        extra += ["restricted diffusion"] if m["restriction"] else []
        return f"{m['cls']} — {where}, {m['volume_ml']:.1f} mL" + (f" ({', '.join(extra)})" if extra else "")

    for cls, (les, panels, outline) in rows.items():
        fig, axs = plt.subplots(1, len(panels) + 1, figsize=(1.7 * (len(panels) + 1), 2.2))
        draw(axs, les, panels, outline)
        fig.suptitle(caption(les), fontsize=9)
        fig.tight_layout()
        p = out_dir / f"lesion_{cls}.png"
        fig.savefig(p, dpi=80)
        plt.close(fig)
        paths[cls] = p
    fig, axs = plt.subplots(len(rows), len(contrasts) + 1, figsize=(1.6 * (len(contrasts) + 1), 1.8 * len(rows)))
    axs = np.asarray(axs).reshape(len(rows), -1)
    for i, (cls, (les, panels, outline)) in enumerate(rows.items()):
        draw(axs[i], les, panels, outline)
        axs[i, 0].text(-0.1, 0.5, cls, transform=axs[i, 0].transAxes, rotation=90, va="center", ha="right", fontsize=9)
    fig.tight_layout()
    p = out_dir / "lesions.png"
    fig.savefig(p, dpi=80)
    plt.close(fig)
    paths["montage"] = p
    return paths
