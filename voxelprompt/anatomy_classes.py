"""The anatomy partitions the vision network's dense heads predict (training targets and class tables).

A segment call supervises one structure; a subject's label map supervises all of them at once.
With ``VisionConfig.anatomy_classes`` set, the vision network has a dense head per partition of
the head (docs/model.md, "Anatomy heads"), trained on every segment call against the subject's
anatomy, and each mask it returns is the union of the partition classes φ selects, or'ed with
its free, φ-conditioned mask head (lesions and structures no partition holds). The partitions:

- ``labels``: the FreeSurfer ids of the atlas anatomy (synth.anatomy, aparc+aseg plus the
  extra-cerebral layers), 0 = outside the head; index = position in :data:`LABEL_IDS`.
- ``lobes``: lobe × hemisphere (0 elsewhere, then left frontal … right cingulate).
- ``territories``: vascular territory × hemisphere (0 elsewhere, then left ACA … right PCA).
- ``lesions``: the lesion class at each voxel (0 = no lesion, then ``synth.lesion_classes.LESION_CLASSES``
  in order); where lesions overlap the smaller one is kept.
- ``components``: the lesion component (0 = none, then :data:`COMPONENTS`) of any lesion.

The two lesion partitions are session-specific (lesions grow and shrink between sessions) and
their foreground classes are rare, so their cross-entropy weighs foreground voxels
:data:`LESION_WEIGHT` × (:func:`class_weights`).

Ids a phantom anatomy uses that the atlas lacks get :data:`IGNORE` (no loss at those voxels).
"""

from __future__ import annotations

import numpy as np

LABEL_IDS: tuple[int, ...] = (
    0, 2, 4, 5, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 26, 28, 30, 31, 41, 43, 44, 46, 47, 49,
    50, 51, 52, 53, 54, 58, 60, 62, 63, 85, 98, 125, 165, 251, 252, 253, 254, 255, 257, 258, 262,
    *range(1001, 1004), *range(1005, 1036), *range(2001, 2004), *range(2005, 2036))
N_LOBES = 6           # synth.anatomy.LOBES
N_TERRITORIES = 3     # synth.anatomy.TERRITORIES
LESION_CLASSES = ("glioma", "meningioma", "metastasis", "edema", "infarct", "wmh", "hemorrhage", "cyst",
                  "resection_cavity")   # synth.lesion_classes.LESION_CLASSES (kept torch- and synth-free here)
COMPONENTS = ("edema", "enhancing", "necrotic")
SIZES: tuple[int, ...] = (len(LABEL_IDS), 1 + 2 * N_LOBES, 1 + 2 * N_TERRITORIES, 1 + len(LESION_CLASSES),
                          1 + len(COMPONENTS))
NAMES = ("labels", "lobes", "territories", "lesions", "components")
IGNORE = 255
LESION_WEIGHT = 5.0

_LUT = np.full(max(LABEL_IDS) + 1, IGNORE, dtype=np.uint8)
_LUT[list(LABEL_IDS)] = np.arange(len(LABEL_IDS), dtype=np.uint8)


def _sided(ids: np.ndarray, hemi: np.ndarray, n: int) -> np.ndarray:
    """Class index of a partition id on a side: 0 outside, ``id`` on the left, ``n + id`` on the right."""
    out = np.where(hemi == 2, ids + n, ids).astype(np.uint8)
    out[(ids == 0) | (hemi == 0)] = 0
    return out


def class_weights(sizes) -> list:
    """Cross-entropy class weights per partition of ``sizes`` (a prefix of :data:`SIZES`): None
    (uniform) for the anatomy partitions, :data:`LESION_WEIGHT` on the lesion partitions' foreground."""
    out = []
    for k, n in enumerate(sizes):
        out.append(None if NAMES[k] not in ("lesions", "components") else [1.0] + [LESION_WEIGHT] * (n - 1))
    return out


def targets(anatomy, lesions=()):
    """The partition class maps of a ``synth.anatomy.Anatomy`` (and its session's lesions) as one
    label volume, a channel per partition in :data:`NAMES` order.

    Args:
        anatomy: the session's anatomy.
        lesions: the session's ``synth.lesions.Lesion`` s (masks on the anatomy's grid).

    Returns:
        A ``voxel_lib.Volume`` (kind "label", uint8, channels labels/lobes/territories/lesions/
        components) on the anatomy's grid.
    """
    import torch

    import voxel_lib as vl

    lab = anatomy.array
    lab_idx = np.full(lab.shape, IGNORE, dtype=np.uint8)
    known = (lab >= 0) & (lab < _LUT.size)
    lab_idx[known] = _LUT[lab[known]]
    hemi = anatomy.hemispheres.tensor[0].numpy()
    lobes = _sided(anatomy.lobes.tensor[0].numpy().astype(np.int64), hemi, N_LOBES)
    terr = _sided(anatomy.territories.tensor[0].numpy().astype(np.int64), hemi, N_TERRITORIES)
    cls = np.zeros(lab.shape, dtype=np.uint8)
    comp = np.zeros(lab.shape, dtype=np.uint8)
    for les in sorted(lesions, key=lambda le: -int(np.count_nonzero(le.mask))):   # smaller ones on top
        m = np.asarray(les.mask, bool)
        name = les.meta.get("cls")
        if name not in LESION_CLASSES:
            raise ValueError(f"lesion {les.meta.get('id')}: class {name!r} is not one of {LESION_CLASSES}")
        cls[m] = 1 + LESION_CLASSES.index(name)
        comp[m] = 0
        for c, cm in les.components.items():
            if c in COMPONENTS:
                comp[np.asarray(cm, bool) & m] = 1 + COMPONENTS.index(c)
    arr = np.stack([lab_idx, lobes, terr, cls, comp])
    return vl.Volume(torch.from_numpy(arr), anatomy.labels.affine, "label")
