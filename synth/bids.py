"""Writing synthetic subjects as a BIDS dataset, reading it back, and PNG mosaics.

Layout (``root`` = the dataset)::

    dataset_description.json, participants.tsv
    sub-0001/sub-0001_sessions.tsv                      session_id, acq_time (the dates)
    sub-0001/ses-20210301/anat/sub-0001_ses-20210301_T1w.nii.gz   + .json sidecar
                         /anat/..._ce-gadolinium_T1w, _T2w, _FLAIR, _PDw, _acq-gre_T2starw, _acq-swi_T2starw
                         /dwi/..._acq-trace_dwi, _acq-adc_dwi      (DWI trace and its ADC map)
                         /ct/..._ct, _acq-thick_ct                 (BIDS BEP024 naming)
    derivatives/truth/dataset_description.json, derivatives/truth/dseg.tsv (index, name, tissue),
        desc-lobes_dseg.tsv, desc-territories_dseg.tsv, desc-hemispheres_dseg.tsv (index, name)
    derivatives/truth/sub-0001/ses-20210301/anat/
        sub-0001_ses-20210301_desc-anatomy_dseg.nii.gz      FreeSurfer labels (working grid)
        ..._desc-lobes_dseg, _desc-territories_dseg, _desc-hemispheres_dseg
        ..._desc-lesions_dseg.nii.gz                       value = lesion id
        ..._desc-lesion<id>_mask.nii.gz, ..._desc-lesion<id><component>_mask.nii.gz
        ..._lesions.json                                   lesion metadata (list)
        ..._changes.json                                   changes since the previous session
    derivatives/truth/sub-0001/sub-0001_subject.json       generation metadata

Sidecars hold the modality, contrast, acquisition type, plane, spacing (working and native),
orientation, date and units. All images of a subject are aligned in world space; truth maps are
on the session's working grid (resample with ``voxel_lib`` to any acquisition).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch

import voxel_lib as vl

#: acquisition type -> (datatype folder, file-name entities + suffix)
BIDS_NAMES = {
    "t1w": ("anat", "T1w"), "t1c": ("anat", "ce-gadolinium_T1w"), "t2w": ("anat", "T2w"),
    "flair": ("anat", "FLAIR"), "pd": ("anat", "PDw"), "gre": ("anat", "acq-gre_T2starw"),
    "perfusion": ("anat", "acq-perf_T2starw"), "swi": ("anat", "acq-swi_T2starw"),
    "dwi": ("dwi", "acq-trace_dwi"), "adc": ("dwi", "acq-adc_dwi"),
    "ct": ("ct", "ct"), "ct_thick": ("ct", "acq-thick_ct"),
}
UNITS = {"ct": "HU", "adc": "1e-6 mm^2/s"}


def _json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if hasattr(o, "isoformat"):
        return o.isoformat()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _save(vol: vl.Volume, path: Path, dtype=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        vol = vol.new(vol.tensor.to(dtype))
    vl.save(vol, path)
    return path


def acquisition_filename(sub: str, ses: str, name: str) -> tuple[str, str]:
    """(datatype folder, file stem) of an acquisition (``name`` = type, or ``type_runN``)."""
    base, _, run = name.partition("_run")
    folder, suffix = BIDS_NAMES[base]
    ents = f"sub-{sub}_ses-{ses}"
    if run:
        parts = suffix.rsplit("_", 1)
        suffix = f"{parts[0]}_run-{run}_{parts[1]}" if len(parts) == 2 else f"run-{run}_{suffix}"
    return folder, f"{ents}_{suffix}"


def write_dataset_description(root) -> None:
    """Top-level and derivative ``dataset_description.json`` (idempotent)."""
    root = Path(root)
    _json(root / "dataset_description.json", {
        "Name": "VoxelPrompt synthetic subjects", "BIDSVersion": "1.9.0", "DatasetType": "raw",
        "GeneratedBy": [{"Name": "voxelprompt synth", "Description": "synth.subject.generate_subject"}]})
    _json(root / "derivatives" / "truth" / "dataset_description.json", {
        "Name": "Ground truth of the synthetic subjects", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "voxelprompt synth"}]})


def _participants(root: Path, subject) -> None:
    path = root / "participants.tsv"
    rows = path.read_text().splitlines()[1:] if path.exists() else []
    rows = [r for r in rows if not r.startswith(f"sub-{subject.id}\t")]
    rows.append(f"sub-{subject.id}\t{subject.seed}\t{subject.meta.get('anatomy')}\t"
                f"{'yes' if subject.meta.get('flip') else 'no'}\t{len(subject.sessions)}")
    path.write_text("participant_id\tseed\tanatomy\tflipped\tn_sessions\n" + "\n".join(sorted(rows)) + "\n")


def write_subject(subject, root) -> list[Path]:
    """Writes one subject (images, sidecars, sessions.tsv, ground truth); returns the files written."""
    root = Path(root)
    write_dataset_description(root)
    _participants(root, subject)
    sub = subject.id
    files: list[Path] = []
    sdir = root / f"sub-{sub}"
    sdir.mkdir(parents=True, exist_ok=True)
    lines = ["session_id\tacq_time"] + [f"ses-{s.label}\t{s.date.isoformat()}T00:00:00" for s in subject.sessions]
    (sdir / f"sub-{sub}_sessions.tsv").write_text("\n".join(lines) + "\n")
    files.append(sdir / f"sub-{sub}_sessions.tsv")
    tdir_sub = root / "derivatives" / "truth" / f"sub-{sub}"
    files.append(_json(tdir_sub / f"sub-{sub}_subject.json", {"id": sub, "seed": subject.seed, **subject.meta}))
    for ses in subject.sessions:
        for name, vol in ses.acquisitions.items():
            folder, stem = acquisition_filename(sub, ses.label, name)
            d = sdir / f"ses-{ses.label}" / folder
            files.append(_save(vol, d / f"{stem}.nii.gz"))
            meta = dict(ses.acquisition_meta.get(name, {}))
            meta.setdefault("Units", UNITS.get(meta.get("Contrast"), "a.u."))
            meta.update(Synthetic=True, SubjectSeed=subject.seed)
            if meta.get("Contrast") == "t1c":
                meta["ContrastBolusIngredient"] = "GADOLINIUM"
            files.append(_json(d / f"{stem}.json", meta))
        tdir = tdir_sub / f"ses-{ses.label}" / "anat"
        ents = f"sub-{sub}_ses-{ses.label}"
        for what, vol in ses.truth().items():
            files.append(_save(vol, tdir / f"{ents}_desc-{what}_dseg.nii.gz", torch.int16))
        for les in ses.lesions:
            lid = int(les.meta["id"])
            files.append(_save(ses.anatomy.labels.new(torch.from_numpy(les.mask.astype(np.uint8))),
                               tdir / f"{ents}_desc-lesion{lid}_mask.nii.gz"))
            for comp, m in les.components.items():
                files.append(_save(ses.anatomy.labels.new(torch.from_numpy(m.astype(np.uint8))),
                                   tdir / f"{ents}_desc-lesion{lid}{_alnum(comp)}_mask.nii.gz"))
        files.append(_json(tdir / f"{ents}_lesions.json", [_public(les.meta) for les in ses.lesions]))
        files.append(_json(tdir / f"{ents}_changes.json", ses.changes))
        files.append(_write_dseg_tsv(root, ses.anatomy))
    return files


def _alnum(s: str) -> str:
    return "".join(ch for ch in s if ch.isalnum())


def _public(meta: dict) -> dict:
    """Lesion metadata without private (underscore) keys."""
    return {k: v for k, v in meta.items() if not str(k).startswith("_")}


def _write_dseg_tsv(root: Path, anatomy) -> Path:
    """Label tables: ``dseg.tsv`` (anatomy ids, names, tissues) and those of the lobe, territory,
    hemisphere maps."""
    from .anatomy import HEMISPHERES, LOBES, TERRITORIES
    base = root / "derivatives" / "truth"
    for name, table in (("lobes", LOBES), ("territories", TERRITORIES), ("hemispheres", HEMISPHERES)):
        (base / f"desc-{name}_dseg.tsv").write_text("index\tname\n" + "".join(f"{k}\t{v}\n" for k, v in table.items()))
    path = base / "dseg.tsv"
    rows = "".join(f"{i}\t{n}\t{anatomy.tissue.get(i, '')}\n" for i, n in sorted(anatomy.names.items()))
    path.write_text("index\tname\ttissue\n" + rows)
    return path


# ---------------------------------------------------------------------------------- reading
def read_dataset(root) -> list[dict]:
    """Every acquisition of a dataset written by :func:`write_subject`, as records.

    Each record: ``{"subject", "session", "date", "path", "sidecar" (dict), "truth" (dict of
    truth-map paths), "lesions" (metadata list), "changes"}``. Volumes are not loaded.
    """
    root = Path(root)
    out = []
    for sdir in sorted(root.glob("sub-*")):
        sub = sdir.name[4:]
        dates = {}
        tsv = sdir / f"sub-{sub}_sessions.tsv"
        if tsv.exists():
            for line in tsv.read_text().splitlines()[1:]:
                sid, t = line.split("\t")[:2]
                dates[sid[4:]] = t[:10]
        for ses_dir in sorted(sdir.glob("ses-*")):
            ses = ses_dir.name[4:]
            tdir = root / "derivatives" / "truth" / f"sub-{sub}" / f"ses-{ses}" / "anat"
            ents = f"sub-{sub}_ses-{ses}"
            truth = {p.name[len(ents) + 6:].split("_")[0]: p for p in sorted(tdir.glob(f"{ents}_desc-*_dseg.nii.gz"))}
            lesions = json.loads((tdir / f"{ents}_lesions.json").read_text()) if (tdir / f"{ents}_lesions.json").exists() else []
            changes = json.loads((tdir / f"{ents}_changes.json").read_text()) if (tdir / f"{ents}_changes.json").exists() else {}
            for img in sorted(ses_dir.glob("*/*.nii.gz")):
                side = img.with_name(img.name[:-7] + ".json")
                out.append({"subject": sub, "session": ses, "date": dates.get(ses), "path": img,
                            "sidecar": json.loads(side.read_text()) if side.exists() else {},
                            "truth": truth, "lesions": lesions, "changes": changes})
    return out


# ----------------------------------------------------------------------------------- mosaic
def _display_window(img: np.ndarray, contrast: str) -> tuple[float, float]:
    if contrast == "ct":
        return 0.0, 80.0  # brain window
    v = img[img > 0]
    if v.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(v, [1, 99.5])
    return float(lo), float(hi if hi > lo else lo + 1)


def _plane_grid(center, size_mm: float, step: float, view: int):
    """A single-slice RAS grid through ``center``: view 0 axial, 1 coronal, 2 sagittal."""
    n = int(round(size_mm / step))
    shape = [n, n, n]
    shape[2 - view] = 1
    return tuple(shape), vl.ras_grid(tuple(shape), step, center=center)


def mosaic_png(subject, path, *, dpi: int = 80, step: float = 1.0, size_mm: float = 220.0) -> Path:
    """One PNG for a person to look at: a row per acquisition (axial, coronal, sagittal through the
    first lesion's centre, or the brain centre), lesion outlines in red, session dates in the titles."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(ses, name) for ses in subject.sessions for name in ses.acquisitions]
    fig, axes = plt.subplots(len(rows), 3, figsize=(6.3, 2.2 * len(rows)), squeeze=False)
    first = subject.sessions[0]
    if first.lesions:
        center = first.anatomy.labels.voxel_to_world(np.argwhere(first.lesions[0].mask).mean(0))
    else:
        b = np.argwhere(first.anatomy.brain_mask())
        center = first.anatomy.labels.voxel_to_world(b.mean(0))
    for r, (ses, name) in enumerate(rows):
        vol = ses.acquisitions[name]
        contrast = ses.acquisition_meta[name]["Contrast"]
        les = ses.lesion_map()
        for view in range(3):
            shape, aff = _plane_grid(center, size_mm, step, view)
            with warnings.catch_warnings():  # torch warns about one-voxel-thick affine grids; harmless here
                warnings.simplefilter("ignore", UserWarning)
                sl = vol.resample(shape=shape, affine=aff, mode="linear", antialias=False).tensor[0].numpy().squeeze()
                ml = les.resample(shape=shape, affine=aff, mode="nearest").tensor[0].numpy().squeeze()
            lo, hi = _display_window(sl, contrast)
            ax = axes[r, view]
            ax.imshow(np.rot90(sl), cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
            if (ml > 0).any():
                ax.contour(np.rot90(ml > 0), levels=[0.5], colors="r", linewidths=0.7)
            ax.axis("off")
            if view == 0:
                sp = "×".join(f"{s:.1f}" for s in vol.spacing)
                ax.set_title(f"{ses.date.isoformat()} {name} ({sp} mm)", fontsize=7, loc="left")
    fig.suptitle(f"sub-{subject.id} ({subject.meta.get('anatomy')}, seed {subject.seed})", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
