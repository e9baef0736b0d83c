"""A procedural bilateral brain phantom with FreeSurfer labels (no atlas needed).

Ellipsoidal cerebrum with a folded cortical ribbon split into Desikan-Killiany-named parcels by
position, an interhemispheric fissure, white matter, lateral (with temporal horns), third and
fourth ventricles, choroid plexus, caudate, putamen, pallidum, thalamus, hippocampus, amygdala,
accumbens, ventral DC, corpus callosum, brainstem and cerebellum, then the same extra-cerebral
layers, lobes, territories and hemispheres as the atlas (:func:`synth.anatomy.finish_anatomy`).
World coordinates are MNI-like (RAS mm, origin near the anterior commissure).
"""

from __future__ import annotations

import functools

import numpy as np

import voxel_lib as vl

from .anatomy import Anatomy, finish_anatomy

# FreeSurfer ids (left, right) of the bilateral structures drawn here
_IDS = {"Cerebral-White-Matter": (2, 41), "Lateral-Ventricle": (4, 43), "Inf-Lat-Vent": (5, 44),
        "Cerebellum-White-Matter": (7, 46), "Cerebellum-Cortex": (8, 47), "Thalamus-Proper": (10, 49),
        "Caudate": (11, 50), "Putamen": (12, 51), "Pallidum": (13, 52), "Hippocampus": (17, 53),
        "Amygdala": (18, 54), "Accumbens-area": (26, 58), "VentralDC": (28, 60), "choroid-plexus": (31, 63)}
_MIDLINE = {14: "3rd-Ventricle", 15: "4th-Ventricle", 16: "Brain-Stem", 24: "CSF", 251: "CC_Posterior",
            252: "CC_Mid_Posterior", 253: "CC_Central", 254: "CC_Mid_Anterior", 255: "CC_Anterior"}
#: Cortical parcels drawn (DK names) and their offsets in the DK id tables (1000 + k / 2000 + k).
_PARCELS = {"superiorfrontal": 28, "rostralmiddlefrontal": 27, "precentral": 24, "postcentral": 22,
            "superiorparietal": 29, "inferiorparietal": 8, "superiortemporal": 30, "middletemporal": 15,
            "inferiortemporal": 9, "lateraloccipital": 11, "cuneus": 5, "lingual": 13, "insula": 35,
            "caudalanteriorcingulate": 2, "posteriorcingulate": 23, "medialorbitofrontal": 14,
            "parahippocampal": 16, "precuneus": 25, "parstriangularis": 20}

# (name, centre (x>0 for the right copy), semi-axes) of the bilateral deep structures, mm
_DEEP = [
    ("Thalamus-Proper", (11, -18, 6), (7, 13, 8)),
    ("Caudate", (14, 8, 12), (4.5, 13, 7)),
    ("Putamen", (25, 3, 1), (5, 13, 9)),
    ("Pallidum", (19, -1, -1), (3.5, 7, 5)),
    ("Hippocampus", (28, -24, -13), (5, 17, 5)),
    ("Amygdala", (23, -4, -18), (6, 6, 6)),
    ("Accumbens-area", (10, 12, -7), (4, 4, 4)),
    ("VentralDC", (11, -15, -10), (5, 7, 5)),
]


class _Grid:
    """Axis-aligned RAS grid with 1D world axes, for fast box-restricted shape tests."""

    def __init__(self, shape, affine):
        self.shape = shape
        self.axes = [affine[i, 3] + affine[i, i] * np.arange(n, dtype=np.float32) for i, n in enumerate(shape)]

    def box(self, lo, hi):
        """Index slices of the world box [lo, hi] and the 1D coordinates inside it (broadcastable)."""
        sl, co = [], []
        for i, a in enumerate(self.axes):
            i0, i1 = np.searchsorted(a, lo[i]), np.searchsorted(a, hi[i], side="right")
            sl.append(slice(int(i0), int(max(i0, i1))))
            shp = [1, 1, 1]
            shp[i] = -1
            co.append(a[i0:max(i0, i1)].reshape(shp))
        return tuple(sl), co

    def ellipsoid(self, center, radii):
        """(slices, boolean block) of an axis-aligned ellipsoid."""
        c, r = np.asarray(center, np.float32), np.asarray(radii, np.float32)
        sl, (x, y, z) = self.box(c - r, c + r)
        return sl, ((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2 <= 1.0


def _paint(lab, grid, center, radii, value, where=None):
    sl, m = grid.ellipsoid(center, radii)
    block = lab[sl]
    if where is not None:
        m = m & where(block)
    block[m] = value


@functools.lru_cache(maxsize=2)
def phantom(spacing: float = 1.0) -> Anatomy:
    """The phantom anatomy on a RAS grid of ``spacing`` mm (cached; treat as read-only)."""
    shape = tuple(int(round(n / spacing)) for n in (184, 224, 196))
    aff = vl.ras_grid(shape, spacing, center=(0.0, -14.0, 4.0))
    grid = _Grid(shape, aff)
    lab = np.zeros(shape, dtype=np.int32)

    # cerebrum (in its bounding box): one ellipsoid per hemisphere with a folded surface, flatter below
    c = np.array([0.0, -16.0, 12.0], np.float32)
    r = np.array([68.0, 86.0, 60.0], np.float32)
    box, (x, y, z) = grid.box(c - r * 1.08 - [0, 0, 8], c + r * 1.08)
    x, y, z = np.broadcast_arrays(x, y, z)
    u, v, w = (x - c[0]) / r[0], (y - c[1]) / r[1], (z - c[2]) / r[2]
    w = np.where(w < 0, w * 1.25, w)
    rho = np.sqrt(u * u + v * v + w * w)
    theta = np.arctan2(v, u)
    phi = np.arctan2(w, np.sqrt(u * u + v * v))
    folds = 0.05 * np.sin(9 * theta) * np.sin(7 * phi + 0.5) + 0.025 * np.sin(17 * theta + 1.3 * phi)
    surface = 1.0 + folds
    ax = np.abs(x)
    thick = 4.5 / 64.0
    cerebrum = (rho <= surface) & (ax >= 1.2)  # interhemispheric fissure
    cortex = cerebrum & (rho > surface - thick)
    cortex |= cerebrum & (ax < 4.5) & (z > -5)  # medial cortex along the fissure
    # temporal lobes hang lower, lateral and anterior
    temporal = np.zeros_like(cerebrum)
    tcore = np.zeros_like(cerebrum)
    for sgn in (-1, 1):
        tc, tr = np.array([sgn * 46, -14, -16], np.float32), np.array([20, 40, 17], np.float32)
        e = ((x - tc[0]) / tr[0]) ** 2 + ((y - tc[1]) / tr[1]) ** 2 + ((z - tc[2]) / tr[2]) ** 2
        temporal |= e <= 1.0
        tcore |= e <= 0.72
    cortex |= temporal & ~tcore & ~(rho <= surface - thick)
    cerebrum |= temporal
    wm = cerebrum & ~cortex
    right = x >= 0
    sub = lab[box]
    sub[wm] = np.where(right[wm], 41, 2)

    # cortical parcels by position (approximate DK layout); the first rule that matches wins
    fr = y > -8 + 0.25 * (z - 20)
    cing = (ax < 9) & (z > 8) & (z < 40) & (y > -55) & (y < 40)
    tmp = (z < -2) & (ax > 28) & (y > -70)
    occ = y < -66
    par = ~fr & ~occ & ~tmp
    rules = [
        ("caudalanteriorcingulate", cing & (y >= -10)), ("posteriorcingulate", cing & (y < -10)),
        ("medialorbitofrontal", fr & (z < 0) & (ax < 20)), ("superiorfrontal", fr & ~cing & ((z >= 38) | (ax < 20))),
        ("precentral", fr & (y < 8 + 0.25 * (z - 20)) & (z >= 0)),
        ("parstriangularis", fr & (ax > 44) & (z < 22) & (z > -6)), ("rostralmiddlefrontal", fr),
        ("parahippocampal", tmp & (ax < 34) & (z < -14)), ("inferiortemporal", tmp & (z < -20)),
        ("middletemporal", tmp & (z < -10)), ("superiortemporal", tmp),
        ("cuneus", occ & (ax < 16) & (z >= 6)), ("lingual", occ & (ax < 16)), ("lateraloccipital", occ),
        ("precuneus", par & (ax < 12) & ~cing), ("postcentral", par & (y > -26 + 0.25 * (z - 20))),
        ("superiorparietal", par & (z >= 40)), ("inferiorparietal", par),
    ]
    parcel = np.zeros(cortex.shape, dtype=np.int16)  # DK parcel offset, 0 = not assigned yet
    for name, m in rules:
        parcel[cortex & m & (parcel == 0)] = _PARCELS[name]
    parcel[cortex & (parcel == 0)] = _PARCELS["inferiorparietal"]
    m = parcel > 0
    sub[m] = np.where(right[m], 2000, 1000) + parcel[m]
    lab[box] = sub
    for sgn, cid in ((-1, 1035), (1, 2035)):  # insula: a buried plate lateral to the putamen
        _paint(lab, grid, (sgn * 36, 2, 2), (2.5, 15, 11), cid)

    # deep grey matter
    for name, cen, rad in _DEEP:
        for sgn in (-1, 1):
            _paint(lab, grid, (sgn * cen[0], cen[1], cen[2]), rad, _IDS[name][0 if sgn < 0 else 1])
    # corpus callosum: a midline arch split into five FreeSurfer segments
    sl, cc = grid.ellipsoid((0, -10, 18), (9, 36, 4))
    yy = grid.axes[1][sl[1]].reshape(1, -1, 1)
    block = lab[sl]
    for cid, (lo, hi) in zip((255, 254, 253, 252, 251), ((13, 99), (1, 13), (-14, 1), (-28, -14), (-99, -28))):
        block[cc & (yy >= lo) & (yy < hi)] = cid
    # ventricles
    for sgn in (-1, 1):
        sid = 0 if sgn < 0 else 1
        for cen, rad in (((sgn * 9, -4, 20), (5, 28, 5)), ((sgn * 19, -36, 10), (5, 9, 7)),
                         ((sgn * 17, -50, 8), (3, 10, 3))):
            _paint(lab, grid, cen, rad, _IDS["Lateral-Ventricle"][sid])
        _paint(lab, grid, (sgn * 31, -20, -9), (2.2, 10, 2.2), _IDS["Inf-Lat-Vent"][sid])
        _paint(lab, grid, (sgn * 19, -34, 10), (2.5, 5, 2.5), _IDS["choroid-plexus"][sid])
    _paint(lab, grid, (0, -12, 2), (1.6, 12, 8), 14)
    _paint(lab, grid, (0, -20, -20), (3, 8, 5), 24)  # basal cistern CSF
    # brainstem, cerebellum, fourth ventricle
    _paint(lab, grid, (0, -26, -36), (11, 12, 26), 16)
    for sgn in (-1, 1):
        sid = 0 if sgn < 0 else 1
        _paint(lab, grid, (sgn * 24, -60, -32), (26, 24, 17), _IDS["Cerebellum-Cortex"][sid],
               where=lambda b: b != 16)
        _paint(lab, grid, (sgn * 20, -58, -31), (13, 12, 8), _IDS["Cerebellum-White-Matter"][sid],
               where=lambda b: b != 16)
    _paint(lab, grid, (0, -44, -32), (5, 4, 5), 15)

    names = {i: n for i, n in _MIDLINE.items()}
    for base, (li, ri) in _IDS.items():
        names[li], names[ri] = f"Left-{base}", f"Right-{base}"
    for pname, k in _PARCELS.items():
        names[1000 + k], names[2000 + k] = f"ctx-lh-{pname}", f"ctx-rh-{pname}"
    names[1035], names[2035] = "ctx-lh-insula", "ctx-rh-insula"
    # strict sides: structures overlapping the midline take the side of the voxel
    to_side = {1: np.arange(4096, dtype=np.int32), 2: np.arange(4096, dtype=np.int32)}
    for li, ri in [*_IDS.values(), *((1000 + k, 2000 + k) for k in _PARCELS.values())]:
        to_side[1][ri], to_side[2][li] = li, ri
    right_half = (grid.axes[0] >= 0)[:, None, None]
    lab = np.where(right_half, to_side[2][lab], to_side[1][lab])
    return finish_anatomy(lab, names, aff, "phantom", midline_x=0.0, closing_mm=4.0)
