"""A case: the subject data a task is sampled on, seen the way tasks need it.

A :class:`Case` holds dated sessions of acquisitions (kernel variable name, modality, Volume),
each session's anatomy (``synth.anatomy.Anatomy``) and lesions (``synth.lesions.Lesion``, same
``meta["id"]`` across sessions). It resolves ROIs to ground-truth masks on any acquisition's grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

import voxel_lib as vl

from .terms import CONTRAST_STEM, MODALITIES, structure_name


@dataclass
class Acquisition:
    name: str            # kernel variable, e.g. "t1" or "t1_2"
    stem: str            # "t1", "flair", ...
    modality: str        # "T1w", "FLAIR", ...
    volume: vl.Volume


@dataclass
class Session:
    date: str
    acquisitions: list[Acquisition]
    anatomy: object                     # synth.anatomy.Anatomy
    lesions: list = field(default_factory=list)   # synth.lesions.Lesion

    def acq(self, stem: str) -> Acquisition | None:
        return next((a for a in self.acquisitions if a.stem == stem), None)

    def lesion(self, lesion_id) -> object | None:
        return next((l for l in self.lesions if l.meta["id"] == lesion_id), None)


@dataclass(frozen=True)
class ROI:
    """What a task refers to: an anatomical structure, a lesion, or a lesion component."""

    kind: str                 # "anatomy", "lesion", "component", "absent" (a lesion the case does not have)
    key: str                  # anatomy key (terms.ANATOMY), lesion id, or the absent target's noun
    side: str | None = None   # anatomy side
    component: str | None = None

    @property
    def label(self) -> str:
        """A stable identifier for per-structure scores (e.g. ``Left-Hippocampus``, ``lesion:glioma``)."""
        if self.kind == "anatomy":
            return structure_name(self.key, self.side)
        if self.kind == "absent":
            return f"absent:{self.key}"
        return f"lesion:{self.key}" + (f":{self.component}" if self.component else "")


class Case:
    """Sessions in date order, with ground-truth lookups."""

    def __init__(self, sessions: list[Session], source: str = "phantom", subject_id: str = "sub"):
        if not sessions:
            raise ValueError("a case needs at least one session")
        self.sessions = sorted(sessions, key=lambda s: s.date)
        self.source = source
        self.subject_id = subject_id
        self._cache: dict = {}

    @classmethod
    def from_subject(cls, subject) -> "Case":
        """Builds a case from a ``synth.subject.Subject`` (variables named per contrast and session)."""
        multi = len(subject.sessions) > 1
        sessions = []
        for k, ses in enumerate(sorted(subject.sessions, key=lambda s: str(s.date))):
            acqs, seen = [], set()
            for acq_name, vol in ses.acquisitions.items():
                contrast = ses.acquisition_meta.get(acq_name, {}).get("Contrast", acq_name)
                stem = CONTRAST_STEM.get(contrast, contrast)
                if stem in seen:  # one acquisition per contrast and session (e.g. thin and thick CT)
                    continue
                seen.add(stem)
                name = f"{stem}_{k + 1}" if multi else stem
                acqs.append(Acquisition(name, stem, MODALITIES[stem][0], vol))
            sessions.append(Session(str(ses.date), acqs, ses.anatomy, list(ses.lesions)))
        return cls(sessions, getattr(subject, "source", "phantom"), getattr(subject, "id", "sub"))

    @property
    def lesion_meta(self) -> list[dict]:
        """Metadata of each lesion as in the first session."""
        return [l.meta for l in self.sessions[0].lesions]

    def stems(self, session: int = 0) -> list[str]:
        return [a.stem for a in self.sessions[session].acquisitions]

    def lesion_sites(self) -> list[tuple[dict, set[str], set[str]]]:
        """Where every lesion of every session may be: ``(meta, sides, lobes)``, conservatively.

        ``sides`` holds each hemisphere the mask reaches (voxels outside the hemisphere map
        count by world x against the midline) plus the metadata's; a "bilateral" or unknown
        hemisphere counts as both. ``lobes`` holds each lobe the mask touches plus the
        metadata's; a lesion with no lobe in its metadata (deep, extra-axial) counts as
        reaching every lobe. Used to make sure an absent target's description cannot refer to
        a lesion the case has (:func:`task_templates.describe.describe_absent`).
        """
        if "lesion_sites" in self._cache:
            return self._cache["lesion_sites"]
        from synth.lesions import LOBES
        out = []
        for ses in self.sessions:
            anat = ses.anatomy
            hemi = anat.hemispheres.tensor[0].numpy()
            lobes = anat.lobes.tensor[0].numpy()
            for les in ses.lesions:
                m, meta = np.asarray(les.mask, bool), les.meta
                sides, lob = set(), set()
                h = hemi[m]
                if (h == 1).any():
                    sides.add("left")
                if (h == 2).any():
                    sides.add("right")
                if (h == 0).any():
                    x = anat.labels.voxel_to_world(np.argwhere(m & (hemi == 0)).astype(float))[:, 0]
                    if (x < anat.midline_x).any():
                        sides.add("left")
                    if (x >= anat.midline_x).any():
                        sides.add("right")
                side = meta.get("hemisphere")
                sides |= {side} if side in ("left", "right") else {"left", "right"}
                lob |= {LOBES[int(v)] for v in np.unique(lobes[m]) if int(v) in LOBES}
                lob |= {meta["lobe"]} if meta.get("lobe") else set(LOBES.values())
                out.append((meta, sides, lob))
        self._cache["lesion_sites"] = out
        return out

    # ---------------------------------------------------------------- truth
    def roi_array(self, roi: ROI, session: int) -> np.ndarray | None:
        """Boolean truth mask of an ROI on the session's anatomy grid (None if absent)."""
        ses = self.sessions[session]
        if roi.kind == "anatomy":
            try:
                if roi.side == "both":
                    return (ses.anatomy.structure(structure_name(roi.key, "left"))
                            | ses.anatomy.structure(structure_name(roi.key, "right")))
                return ses.anatomy.structure(structure_name(roi.key, roi.side))
            except KeyError:
                return None
        if roi.kind == "absent":  # a described lesion the case does not have: an empty mask
            return np.zeros(ses.anatomy.shape, bool)
        les = ses.lesion(roi.key if not roi.key.isdigit() else int(roi.key))
        if les is None:
            return None
        if roi.kind == "lesion":
            return np.asarray(les.mask, bool)
        comp = les.components.get(roi.component)
        return None if comp is None else np.asarray(comp, bool)

    def truth(self, roi: ROI, session: int, like: vl.Volume) -> vl.Volume | None:
        """Truth mask of an ROI resampled (nearest) onto an acquisition's grid."""
        key = (roi, session, tuple(like.shape), like.affine.numpy().tobytes())
        if key not in self._cache:
            arr = self.roi_array(roi, session)
            if arr is None:
                self._cache[key] = None
            else:
                anat = self.sessions[session].anatomy.labels
                m = vl.Volume(torch.from_numpy(arr.astype(np.uint8)), anat.affine, "label")
                self._cache[key] = m.resample_like(like, mode="nearest")
        return self._cache[key]

    def present(self, roi: ROI, session: int = 0, min_voxels: int = 8) -> bool:
        """True when the ROI covers at least ``min_voxels`` voxels of the session's coarsest acquisition.

        Judged on the anatomy grid (no resampling), so it is cheap enough to scan every ROI.
        """
        key = ("present", roi, session)
        if key not in self._cache:
            arr = self.roi_array(roi, session)
            ses = self.sessions[session]
            if arr is None:
                self._cache[key] = 0.0
            else:
                self._cache[key] = float(arr.sum()) * ses.anatomy.labels.voxel_volume
        ckey = ("coarsest", session)
        if ckey not in self._cache:
            self._cache[ckey] = max(a.volume.voxel_volume for a in self.sessions[session].acquisitions)
        return self._cache[key] >= min_voxels * self._cache[ckey]
