"""Synthetic subjects: anatomy, lesions and dated sessions of clinical acquisitions, from one seed.

:func:`generate_subject` builds a :class:`Subject`:

1. anatomy: a template (atlas or phantom) warped by a random affine + smooth nonlinear
   transform, flipped left/right half of the time (labels swapped), on a RAS working grid of
   ``resolution`` mm, with random skull/scalp/CSF thicknesses and random atrophy/enlargement of
   the ventricles, hippocampi and cortex;
2. lesions (``synth.lesions.sample_lesions``), 0-3 per subject;
3. 1-3 dated sessions; each later session changes by known amounts (every lesion grown or
   shrunk by a sampled factor via ``synth.lesions.change``, structure atrophy via
   :func:`synth.deform.resize_structure`), recorded in ``Session.changes``;
4. per session 1-8 acquisitions (an MR protocol, or CT), each on its own clinical geometry
   (:mod:`synth.geometry`): the image is synthesized on the working grid
   (``synth.contrast.synthesize`` -> ``synth.lesions.render`` -> ``synth.artifacts.corrupt``),
   resampled in world space onto the acquisition grid (anti-aliased, so thick slices get partial
   volume) and given noise (``synth.artifacts.add_noise``). All acquisitions of a subject are
   aligned in world space. With ``skull_strip_prob`` an MR image is skull-stripped first, as a
   preprocessed scan would be (:func:`strip_mask`: zero outside a brain envelope of random margin;
   ``SkullStripped`` in its metadata).

The working resolution is a parameter: 2 mm for the CPU model's training, the ``paper`` config's
native resolution with ``resolution=1.0, floor_spacing=False``. With ``floor_spacing`` (default)
acquisition spacings are floored at the working resolution (a 0.9 mm T1 becomes 2 mm at training
time, a 5 mm slice stays 5 mm); the sampled native spacing is kept in the metadata.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import voxel_lib as vl

from . import deform, geometry
from .anatomy import DEFAULT_THICKNESS, Anatomy, _bbox, template

#: MR protocol: acquisition type -> weight of being in a session (dwi brings its adc map along).
MR_PROTOCOL = {"t1w": 0.9, "flair": 0.8, "t2w": 0.7, "dwi": 0.6, "t1c": 0.4, "swi": 0.3, "gre": 0.3, "pd": 0.15}
CT_PROB = 0.15
#: Ranges of the subject's random anatomy: layer thicknesses (mm) and baseline structure factors.
THICKNESS_RANGE = {"csf": (0.8, 4.0), "dura": (1.0, 2.0), "skull": (4.0, 9.0), "fat": (1.5, 5.0), "scalp": (2.5, 5.0)}
BASELINE_CHANGE = {"ventricles": (0.7, 1.8, 0.7), "hippocampus": (0.8, 1.05, 0.5), "cortex": (0.9, 1.0, 0.5)}
#: Per-session (longitudinal) changes: (low, high, probability).
SESSION_CHANGE = {"ventricles": (1.0, 1.12, 0.5), "hippocampus": (0.93, 1.0, 0.5), "cortex": (0.97, 1.0, 0.4)}
LESION_FACTOR = ((0.5, 0.9), (1.1, 2.0))  # shrink or grow ranges
NOISE_LEVEL = (0.005, 0.04)
#: Skull-stripping envelope: the brain dilated by this many working-grid voxels (drawn per image).
STRIP_MARGIN = (0, 2)


@dataclass
class Session:
    """One dated imaging session.

    Attributes:
        date: the session date.
        anatomy: the anatomy at this session (working grid).
        lesions: ``synth.lesions.Lesion`` list (masks on the working grid), ids stable across sessions.
        acquisitions: name -> image volume on its own acquisition grid.
        acquisition_meta: name -> sidecar metadata (contrast, geometry, date, ...).
        changes: what changed since the previous session (empty for the first): ``{"lesions":
            [{id, factor, volume_ml_before, volume_ml_after}], "structures": [resize records]}``.
    """

    date: dt.date
    anatomy: Anatomy
    lesions: list
    acquisitions: dict[str, vl.Volume] = field(default_factory=dict)
    acquisition_meta: dict[str, dict] = field(default_factory=dict)
    changes: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        """BIDS session label (``20210301``)."""
        return self.date.strftime("%Y%m%d")

    def lesion_map(self) -> vl.Volume:
        """Label map of the lesions on the working grid (value = lesion ``meta["id"]``)."""
        out = np.zeros(self.anatomy.shape, dtype=np.int32)
        for les in self.lesions:
            out[les.mask] = int(les.meta["id"])
        return self.anatomy.labels.new(torch.from_numpy(out))

    def truth(self) -> dict[str, vl.Volume]:
        """Ground-truth maps on the working grid: anatomy, lobes, territories, hemispheres, lesions."""
        a = self.anatomy
        return {"anatomy": a.labels, "lobes": a.lobes, "territories": a.territories,
                "hemispheres": a.hemispheres, "lesions": self.lesion_map()}

    def truth_on(self, name: str, what: str = "anatomy") -> vl.Volume:
        """A ground-truth map (see :meth:`truth`) resampled (nearest) onto acquisition ``name``'s grid."""
        return self.truth()[what].resample(like=self.acquisitions[name], mode="nearest")


@dataclass
class Subject:
    """A synthetic subject: dated sessions of aligned acquisitions with exact ground truth.

    Attributes:
        id: subject label (``0001``).
        seed: the seed it was generated from (same seed, same subject).
        sessions: chronological sessions.
        meta: how it was generated (anatomy source, resolution, transform, thicknesses, baseline
            structure changes).
    """

    id: str
    seed: int
    sessions: list[Session]
    meta: dict = field(default_factory=dict)

    def write_bids(self, root) -> list[Path]:
        """Writes the subject into a BIDS dataset at ``root`` (see :mod:`synth.bids`); returns the files."""
        from .bids import write_subject
        return write_subject(self, root)

    def mosaic_png(self, path, *, dpi: int = 80) -> Path:
        """Writes a PNG mosaic: every acquisition (3 views through the first lesion) with lesion outlines."""
        from .bids import mosaic_png
        return mosaic_png(self, path, dpi=dpi)


# ----------------------------------------------------------------------------- generation
def _child(ss: np.random.SeedSequence, *path: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(ss.entropy, spawn_key=tuple(ss.spawn_key) + tuple(path)))


def sample_protocol(rng: np.random.Generator, max_acquisitions: int = 8) -> list[str]:
    """Acquisition types of one session: CT (1-2 series) or an MR protocol of 1-``max_acquisitions`` images.

    DWI always comes with its ADC map (they count as two).
    """
    if rng.random() < CT_PROB:
        return [["ct"], ["ct_thick"], ["ct", "ct_thick"]][int(rng.integers(3))]
    n = int(rng.integers(1, max_acquisitions + 1))
    keys = list(MR_PROTOCOL)
    w = np.array([MR_PROTOCOL[k] for k in keys])
    order = rng.choice(len(keys), size=len(keys), replace=False, p=w / w.sum())
    out: list[str] = []
    for i in order:
        k = keys[int(i)]
        need = 2 if k == "dwi" else 1
        if len(out) + need > n:
            if len(out) == 0 and n == 1:
                continue
            break
        out += ["dwi", "adc"] if k == "dwi" else [k]
    return out or ["t1w"]


def strip_mask(anatomy: Anatomy, rng: np.random.Generator, lesions: list = ()) -> np.ndarray:
    """A skull-stripping envelope on the working grid: the brain, the lesions (an extra-axial
    meningioma stays in the image) and, half the time, the extra-cerebral CSF, dilated by a random
    :data:`STRIP_MARGIN`, holes filled, as a brain-extraction tool's mask is."""
    import scipy.ndimage as ndi

    from .anatomy import CSF_EXTRA
    m = anatomy.brain_mask()
    if rng.random() < 0.5:      # some tools keep the sulcal CSF, some cut at the pia
        m = m | (anatomy.array == CSF_EXTRA)
    for les in lesions:
        m = m | np.asarray(les.mask, bool)
    k = int(rng.integers(STRIP_MARGIN[0], STRIP_MARGIN[1] + 1))
    if k:
        m = ndi.binary_dilation(m, iterations=k)
    return ndi.binary_fill_holes(m)


def render_acquisition(anatomy: Anatomy, lesions: list, contrast: str, geom: geometry.Geometry,
                       rng: np.random.Generator, *, artifacts: float = 1.0, noise_level: float | None = None,
                       tissue_rng: np.random.Generator | None = None, strip: np.ndarray | None = None) -> vl.Volume:
    """One image: synthesize on the working grid, paint lesions, corrupt, resample to ``geom``, add noise.

    ``tissue_rng`` (default ``rng``) drives the tissue contrast and lesion painting; give a T1w and a
    T1c generators in the same state to make them a pre/post-contrast pair. ``strip``: a boolean
    envelope on the working grid (:func:`strip_mask`) outside which the image is background before
    resampling (a skull-stripped scan; its noise floor stays).
    """
    from . import artifacts as art
    from . import contrast as con
    from . import lesions as les_mod
    trng = rng if tissue_rng is None else tissue_rng
    img = con.synthesize(anatomy, contrast, trng)
    if lesions:
        img = les_mod.render(img, contrast, lesions, anatomy, trng)
    img = art.corrupt(img, contrast, rng, anatomy.spacing, strength=artifacts)
    bg = -1000.0 if contrast == "ct" else 0.0  # air outside the working grid
    if strip is not None:
        img = np.where(strip, img, bg)
    out = geometry.resample_to(img - bg, anatomy.affine, geom.shape, geom.affine) + bg
    level = float(rng.uniform(*NOISE_LEVEL)) if noise_level is None else noise_level
    out = art.add_noise(out, rng, level * artifacts, contrast=contrast)
    return vl.Volume(torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)), geom.affine, kind="image")


def _baseline_anatomy(source: str, rng: np.random.Generator, resolution: float, flip: bool | None,
                      transform_kw: dict) -> tuple[Anatomy, dict]:
    tpl = template(source)
    tf = deform.random_transform(rng, midline_x=tpl.midline_x, **transform_kw)
    if flip is not None:
        tf.flip = bool(flip)
    thick = {k: float(rng.uniform(*r)) for k, r in THICKNESS_RANGE.items()}
    anat = deform.warp(tpl, tf, resolution, thickness=thick)
    changes = {}
    for kind, (lo, hi, p) in BASELINE_CHANGE.items():
        f = float(rng.uniform(lo, hi))
        if rng.random() < p:
            changes[kind] = f
    anat, records = deform.apply_structure_changes(anat, changes, rng)
    meta = {"anatomy": source, "resolution_mm": resolution, "flip": tf.flip,
            "affine": np.round(tf.affine, 6).tolist(), "thickness_mm": thick, "baseline_changes": records}
    return anat, meta


def _change_session(prev: Session, rng: np.random.Generator, date: dt.date, lesion_factors: dict | None,
                    structure_changes: dict | None) -> Session:
    from . import lesions as les_mod
    changes = structure_changes if structure_changes is not None else {
        k: float(rng.uniform(lo, hi)) for k, (lo, hi, p) in SESSION_CHANGE.items() if rng.random() < p}
    anat, struct_recs = deform.apply_structure_changes(prev.anatomy, changes, rng)
    new_lesions, les_recs = [], []
    vox_ml = anat.labels.voxel_volume / 1000.0
    for les in prev.lesions:
        lid = int(les.meta["id"])
        if lesion_factors is not None and lid in lesion_factors:
            f = float(lesion_factors[lid])
        else:
            lo, hi = LESION_FACTOR[int(rng.integers(2))]
            f = float(rng.uniform(lo, hi))
        others = np.zeros(anat.shape, bool)
        for o in prev.lesions:
            if o is not les:
                others |= o.mask
        if f > 1 and hasattr(les_mod, "growth_capacity"):
            f = min(f, 1.0 + 0.9 * (les_mod.growth_capacity(les) - 1.0))
        new = None
        for attempt in range(4):  # a lesion that cannot grow that much gets a smaller growth factor
            try:
                new = les_mod.change(les, anat, f, rng, avoid=others)
                break
            except ValueError:
                f = 1.0 + (f - 1.0) / 2.0
        if new is None:
            new, f = les, 1.0
        n0, n1 = int(les.mask.sum()), int(new.mask.sum())
        les_recs.append({"id": lid, "cls": les.meta["cls"], "factor": f, "achieved": n1 / max(n0, 1),
                         "volume_ml_before": n0 * vox_ml, "volume_ml_after": n1 * vox_ml})
        new_lesions.append(new)
    return Session(date=date, anatomy=anat, lesions=new_lesions,
                   changes={"days_since_previous": (date - prev.date).days, "lesions": les_recs,
                            "structures": struct_recs})


def generate_subject(seed: int, *, subject_id: str | None = None, anatomy: str = "atlas", resolution: float = 2.0,
                     floor_spacing: bool = True, n_sessions: int | None = None, max_acquisitions: int = 8,
                     protocols: list[list[str]] | None = None, n_lesions: int | None = None,
                     lesion_classes: list[str] | None = None, lesion_factors: dict | None = None,
                     structure_changes: dict | None = None, flip: bool | None = None, artifacts: float = 1.0,
                     sparsify_prob: float = 0.0, transform: dict | None = None,
                     skull_strip_prob: float = 0.0) -> Subject:
    """Generates a subject, deterministically from ``seed``.

    Args:
        seed: random seed.
        subject_id: BIDS subject label (default: the seed, zero-padded).
        anatomy: "atlas" or "phantom".
        resolution: working-grid spacing (mm): anatomy, lesions and images are made on it.
        floor_spacing: floor acquisition spacings at ``resolution`` (training); False keeps the
            sampled native spacing (images then upsample the working grid).
        n_sessions: number of sessions (default: 1-3 at random).
        max_acquisitions: most acquisitions per session (1-8).
        protocols: explicit acquisition types per session (overrides the random protocol and
            ``n_sessions``), e.g. ``[["t1w", "flair"], ["flair"]]``.
        n_lesions: number of lesions (default: 0-3 at random).
        lesion_classes: lesion classes (one per lesion, or a pool).
        lesion_factors: lesion id -> volume factor applied at every later session (default random).
        structure_changes: kind -> volume factor applied at every later session (default random;
            ``{}`` for none). Kinds: ``synth.deform.CHANGE_KINDS`` or structure names.
        flip: force (True/False) or forbid the left/right flip (default: random, p 0.5).
        artifacts: artifact and noise strength (0 = clean images).
        sparsify_prob: probability of sparsifying each acquisition grid (seeds/004 B.2).
        transform: keyword arguments for :func:`synth.deform.random_transform`.
        skull_strip_prob: probability of skull-stripping each MR acquisition (:func:`strip_mask`),
            drawn from its own stream so the images of a seed are otherwise unchanged.
    """
    from . import lesions as les_mod
    ss = np.random.SeedSequence(int(seed))
    anat, meta = _baseline_anatomy(anatomy, _child(ss, 0), float(resolution), flip, dict(transform or {}))
    rng_l = _child(ss, 1)
    if n_lesions is None:
        n_lesions = int(rng_l.choice(4, p=[0.2, 0.45, 0.25, 0.1]))
    lesions = les_mod.sample_lesions(anat, rng_l, n_lesions, lesion_classes) if n_lesions > 0 else []
    rng_s = _child(ss, 2)
    if protocols is not None:
        n_sessions = len(protocols)
    elif n_sessions is None:
        n_sessions = int(rng_s.choice([1, 2, 3], p=[0.5, 0.35, 0.15]))
    first = dt.date(2008, 1, 1) + dt.timedelta(days=int(rng_s.integers(0, 16 * 365)))
    sessions = [Session(date=first, anatomy=anat, lesions=lesions)]
    for k in range(1, n_sessions):
        date = sessions[-1].date + dt.timedelta(days=int(rng_s.integers(30, 731)))
        sessions.append(_change_session(sessions[-1], _child(ss, 3, k), date, lesion_factors, structure_changes))
    for k, ses in enumerate(sessions):
        rng_p = _child(ss, 4, k)
        protocol = protocols[k] if protocols is not None else sample_protocol(rng_p, max_acquisitions)
        _render_session(ses, protocol, ss, k, resolution if floor_spacing else None, artifacts, sparsify_prob,
                        skull_strip_prob)
    meta.update(n_sessions=n_sessions, lesion_classes=[le.meta["cls"] for le in lesions])
    return Subject(id=subject_id or f"{int(seed) % 10000:04d}", seed=int(seed), sessions=sessions, meta=meta)


def _render_session(ses: Session, protocol: list[str], ss, k: int, min_spacing, artifacts: float,
                    sparsify_prob: float, skull_strip_prob: float = 0.0) -> None:
    box = _bbox(ses.anatomy.brain_mask())  # centre the field of view on the brain
    head = tuple(ses.anatomy.labels.voxel_to_world([(b.start + b.stop - 1) / 2.0 for b in box]))
    keep = None
    if ses.lesions:
        m = np.zeros(ses.anatomy.shape, bool)
        for les in ses.lesions:
            m |= les.mask
        box = _bbox(m)
        w = ses.anatomy.labels.voxel_to_world(np.array([[b.start for b in box], [b.stop - 1 for b in box]]))
        keep = (tuple(w.min(0)), tuple(w.max(0)))
    dwi_geom = None
    pair_seed = int(_child(ss, 6, k).integers(2**63))  # t1w and t1c share tissue contrast (pre/post pair)
    for j, acq in enumerate(protocol):
        rng = _child(ss, 5, k, j)
        spec = geometry.ACQUISITIONS[acq]
        if acq == "adc" and dwi_geom is not None:
            g = dwi_geom
        else:
            g = geometry.sample_geometry(acq, rng, center=head, min_spacing=min_spacing)
            if sparsify_prob > 0 and rng.random() < sparsify_prob:
                g = geometry.sparsify(g, rng, keep_box=keep)
            if acq == "dwi":
                dwi_geom = g
        name = acq if acq not in ses.acquisitions else f"{acq}_run{j + 1}"
        trng = np.random.default_rng(pair_seed) if acq in ("t1w", "t1c") else None
        strip = None
        if skull_strip_prob > 0 and spec.contrast != "ct":
            srng = _child(ss, 7, k, j)
            if srng.random() < skull_strip_prob:
                strip = strip_mask(ses.anatomy, srng, ses.lesions)
        ses.acquisitions[name] = render_acquisition(ses.anatomy, ses.lesions, spec.contrast, g, rng,
                                                    artifacts=artifacts, tissue_rng=trng, strip=strip)
        ses.acquisition_meta[name] = {"Contrast": spec.contrast, "AcquisitionDate": ses.date.isoformat(),
                                      "Modality": "CT" if spec.contrast == "ct" else "MR", **g.meta()}
        if strip is not None:
            ses.acquisition_meta[name]["SkullStripped"] = True


__all__ = ["Subject", "Session", "generate_subject", "render_acquisition", "sample_protocol", "strip_mask", "MR_PROTOCOL",
           "DEFAULT_THICKNESS"]
