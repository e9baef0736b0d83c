"""Batch runs: prompts over a BIDS dataset or a CSV manifest, into one tidy CSV.

``voxelprompt batch DATASET --prompt "..." [--prompt ...] --out results.csv [--workers N]``

* **Discovery**: BIDS ``sub-*/ses-*/{anat,dwi,ct}/*.nii[.gz]`` (the acquisition from the file
  name's suffix and entities: ``T1w`` → t1, ``ce-*_T1w`` → t1c, ``FLAIR`` → flair, ...); session
  dates from ``sub-*_sessions.tsv`` (``acq_time``), else the image sidecars (``AcquisitionDate``
  / ``AcquisitionDateTime``), else a ``YYYYMMDD`` session label. Or a CSV manifest with columns
  ``subject, session, date, volume, path`` (paths relative to the manifest).
* **Plan**: a *longitudinal* prompt (growth, change, progression, ... — or ``--mode
  longitudinal``) runs once per subject with all its sessions in date order (``t1_1``,
  ``t1_2``); any other prompt runs once per session.
* **Output**: one row per measurement — ``subject, sessions, prompt, measurement, value, unit,
  status, transcript, message`` — an answer in words is the measurement ``answer``; vectors and
  dicts are spelled out per component (``centre of mass [x]``). Each run's transcript folder is
  under ``<results>_transcripts/sub-<id>/``.
* **Resumable**: rows are appended and synced as each run ends; a rerun skips every run that
  has rows (other than ``error``) and retries the failed ones. A failing subject is recorded
  (``status=error``, the message) and the others go on.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .agent import AgentLimits, Conversation, make_pool, parse_date, prepare_inputs
from .transcript import atomic_write_text

COLUMNS = ["subject", "sessions", "prompt", "measurement", "value", "unit", "status", "transcript", "message"]

LONGITUDINAL = re.compile(
    r"\b(grow|grew|grown|growing|growth|shrink\w*|shrank|shrunk|progress\w*|regress\w*|chang\w*|evol\w*|"
    r"increas\w*|decreas\w*|enlarg\w*|expan\w*|since|over time|longitudinal\w*|follow[- ]?up|baseline|"
    r"previous|prior|earlier|between (?:the )?(?:two |)(?:scans|sessions|visits|exams|time ?points))\b", re.I)

_SUFFIX = {"t1w": "t1", "t2w": "t2", "flair": "flair", "pdw": "pd", "pd": "pd", "swi": "swi", "ct": "ct",
           "dwi": "dwi", "adc": "adc", "t2starw": "gre", "gre": "gre"}


#: order of the volumes of a session (the model's metadata lines)
STEM_ORDER = ["t1", "t1c", "t2", "flair", "pd", "dwi", "adc", "gre", "swi", "ct"]


def is_longitudinal(prompt: str) -> bool:
    """Whether a prompt compares sessions (growth, change, progression, ...)."""
    return bool(LONGITUDINAL.search(prompt))


@dataclass
class SessionSpec:
    label: str                        # "ses-20210301" (BIDS) or the manifest's session
    date: str | None
    volumes: dict[str, str] = field(default_factory=dict)   # stem -> path


@dataclass
class SubjectSpec:
    id: str                           # "sub-0001"
    sessions: list[SessionSpec] = field(default_factory=list)


@dataclass
class Unit:
    """One agent run: a prompt on one subject's sessions."""

    subject: SubjectSpec
    sessions: list[SessionSpec]
    prompt: str

    @property
    def sessions_label(self) -> str:
        return ";".join(s.label for s in self.sessions)

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.subject.id, self.sessions_label, self.prompt)

    def volumes(self) -> dict[str, str]:
        """``{key: path}`` for :func:`voxelprompt.agent.prepare_inputs` (dates when there are several sessions)."""
        if len(self.sessions) > 1 and any(s.date is None for s in self.sessions):
            raise ValueError(f"{self.subject.id}: the session dates are unknown (no sessions.tsv, sidecar date or "
                             "YYYYMMDD session label), so the sessions cannot be ordered for a longitudinal prompt")
        out = {}
        for s in self.sessions:
            for stem, path in s.volumes.items():
                out[f"{stem}@{s.date}" if s.date else stem] = path
        return out

    def folder(self, root: Path) -> Path:
        h = hashlib.sha1(self.prompt.encode()).hexdigest()[:8]
        ses = "_".join(s.label for s in self.sessions) or "session"
        return root / self.subject.id / re.sub(r"[^A-Za-z0-9_.-]", "_", f"{ses}_{h}")


# =================================================================================== discovery
def bids_stem(filename: str) -> str | None:
    """The acquisition of a BIDS image file name (``sub-1_ses-2_ce-gad_T1w.nii.gz`` → ``t1c``), or None."""
    name = re.sub(r"\.nii(\.gz)?$", "", filename)
    parts = name.split("_")
    suffix = parts[-1].lower()
    ents = dict(p.split("-", 1) for p in parts[:-1] if "-" in p)
    acq = ents.get("acq", "").lower()
    if suffix == "t1w":
        return "t1c" if "ce" in ents else "t1"
    if suffix == "t2starw":
        return "swi" if "swi" in acq else "gre"
    if suffix == "dwi":
        return "adc" if "adc" in acq else "dwi"
    return _SUFFIX.get(suffix)


def _sidecar_date(path: Path) -> str | None:
    side = Path(re.sub(r"\.nii(\.gz)?$", ".json", str(path)))
    if not side.is_file():
        return None
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError):
        return None
    for k in ("AcquisitionDate", "AcquisitionDateTime", "AcquisitionTime"):
        v = meta.get(k)
        if isinstance(v, str) and re.match(r"\d{4}-?\d{2}-?\d{2}", v):
            try:
                return parse_date(v[:10] if "-" in v[:10] else v[:8])
            except ValueError:
                continue
    return None


def _sessions_tsv(sub: Path) -> dict[str, str]:
    p = sub / f"{sub.name}_sessions.tsv"
    if not p.is_file():
        return {}
    out = {}
    with open(p, newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            sid, t = row.get("session_id"), row.get("acq_time") or row.get("date")
            if sid and t and t.lower() != "n/a":
                try:
                    out[sid] = parse_date(t[:10] if "-" in t[:10] else t[:8])
                except ValueError:
                    pass
    return out


def discover_bids(root: str | Path) -> list[SubjectSpec]:
    """Subjects, sessions (date order) and volumes of a BIDS dataset."""
    root = Path(root)
    subjects = []
    for sub in sorted(p for p in root.glob("sub-*") if p.is_dir()):
        dates = _sessions_tsv(sub)
        ses_dirs = sorted(p for p in sub.glob("ses-*") if p.is_dir()) or [sub]
        sessions = []
        for sd in ses_dirs:
            label = sd.name if sd != sub else "ses-1"
            vols: dict[str, str] = {}
            date = dates.get(sd.name)
            for folder in ("anat", "dwi", "ct"):
                for img in sorted((sd / folder).glob("*.nii*")):
                    stem = bids_stem(img.name)
                    if stem and stem not in vols:
                        vols[stem] = str(img)
                        date = date or _sidecar_date(img)
            if date is None and re.fullmatch(r"ses-\d{8}", sd.name):
                try:
                    date = parse_date(sd.name[4:])
                except ValueError:
                    pass
            if vols:
                vols = dict(sorted(vols.items(), key=lambda kv: STEM_ORDER.index(kv[0])))
                sessions.append(SessionSpec(label, date, vols))
        if sessions:
            sessions.sort(key=lambda s: (s.date or "", s.label))
            subjects.append(SubjectSpec(sub.name, sessions))
    return subjects


def read_manifest(path: str | Path) -> list[SubjectSpec]:
    """Subjects from a CSV manifest: ``subject, session, date, volume, path`` (session, date optional)."""
    path = Path(path)
    subs: dict[str, dict[str, SessionSpec]] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"subject", "volume", "path"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: the manifest needs the columns subject, volume, path (missing {sorted(missing)})")
        for row in reader:
            sub = row["subject"].strip()
            ses = (row.get("session") or "").strip() or "ses-1"
            date = (row.get("date") or "").strip() or None
            spec = subs.setdefault(sub, {}).setdefault(ses, SessionSpec(ses, parse_date(date) if date else None))
            if date and spec.date is None:
                spec.date = parse_date(date)
            p = Path(row["path"].strip())
            spec.volumes[row["volume"].strip().lower()] = str(p if p.is_absolute() else path.parent / p)
    out = []
    for sub, sess in subs.items():
        out.append(SubjectSpec(sub, sorted(sess.values(), key=lambda s: (s.date or "", s.label))))
    return out


def discover(dataset: str | Path) -> list[SubjectSpec]:
    """A BIDS folder or a ``.csv`` manifest."""
    p = Path(dataset)
    if p.is_file() and p.suffix.lower() == ".csv":
        return read_manifest(p)
    if p.is_dir():
        return discover_bids(p)
    raise FileNotFoundError(f"{dataset}: not a BIDS folder or a .csv manifest")


def plan(subjects: list[SubjectSpec], prompts: list[str], mode: str = "auto") -> list[Unit]:
    """The runs: longitudinal prompts once per subject (all sessions), others once per session."""
    if mode not in ("auto", "longitudinal", "cross-sectional"):
        raise ValueError("mode must be auto, longitudinal or cross-sectional")
    units = []
    for sub in subjects:
        for prompt in prompts:
            longi = mode == "longitudinal" or (mode == "auto" and is_longitudinal(prompt))
            if longi:
                units.append(Unit(sub, list(sub.sessions), prompt))
            else:
                units += [Unit(sub, [s], prompt) for s in sub.sessions]
    return units


# ========================================================================================= rows
def _flatten(name: str, value, unit) -> list[tuple[str, object, str]]:
    if isinstance(value, dict):
        return [(f"{name} [{k}]", v, unit or "") for k, v in value.items()]
    if isinstance(value, (list, tuple)):
        axes = ["x", "y", "z"] if len(value) == 3 else [str(i) for i in range(len(value))]
        return [(f"{name} [{a}]", v, unit or "") for a, v in zip(axes, value)]
    return [(name, value, unit or "")]


def rows_for(unit: Unit, answer, transcript: str) -> list[dict]:
    status = "ok" if answer.status == "done" else answer.status
    base = {"subject": unit.subject.id, "sessions": unit.sessions_label, "prompt": unit.prompt, "status": status,
            "transcript": transcript, "message": answer.message or ""}
    rows = []
    for m in answer.measurements:
        for n, v, u in _flatten(m.name, m.value, m.unit):
            rows.append(base | {"measurement": n, "value": v, "unit": u})
    if not answer.measurements or (answer.text and answer.text != _spelled(answer)):
        rows.append(base | {"measurement": "answer", "value": answer.text or "", "unit": ""})
    for name, o in answer.outputs.items():
        rows.append(base | {"measurement": f"output {name}", "value": str(o.path), "unit": ""})
    return rows


def _spelled(answer) -> str:
    return "; ".join(str(m) for m in answer.measurements)


def _read_done(path: Path) -> tuple[set, list[dict]]:
    """Keys of finished runs and the rows to keep (error rows dropped, a torn last line ignored)."""
    if not path.exists():
        return set(), []
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        text = text[:text.rfind("\n") + 1]          # a line cut by an interruption
    rows = list(csv.DictReader(text.splitlines()))
    keep = [r for r in rows if r.get("status") != "error" and all(c in r for c in COLUMNS)]
    return {(r["subject"], r["sessions"], r["prompt"]) for r in keep}, keep


@dataclass
class BatchSummary:
    units: int
    skipped: int
    ran: int
    failed: int
    rows: int
    seconds: float
    csv: Path

    def __str__(self) -> str:
        return (f"{self.units} run(s): {self.skipped} already done, {self.ran} ran ({self.failed} failed); "
                f"{self.rows} row(s) written to {self.csv} in {self.seconds:.1f} s")


def run_batch(dataset: str | Path, prompts: list[str], out_csv: str | Path, *, workers: int = 1,
              mode: str = "auto", policy_factory: Callable | None = None, policy: str | None = None,
              checkpoint: str | Path | None = None, limits: AgentLimits | None = None, progress: bool = True,
              sandbox_config=None) -> BatchSummary:
    """Runs ``prompts`` over a dataset into ``out_csv`` (resumable; see the module docstring)."""
    from .policy import policy_factory as make_factory
    t0 = time.perf_counter()
    if not prompts:
        raise ValueError("give at least one --prompt")
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    tdir = out_csv.with_name(out_csv.stem + "_transcripts")
    subjects = discover(dataset)
    if not subjects:
        raise FileNotFoundError(f"{dataset}: no subjects with NIfTI images found")
    units = plan(subjects, prompts, mode)
    done, keep = _read_done(out_csv)
    import io
    s = io.StringIO()
    w = csv.DictWriter(s, COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows({c: r.get(c, "") for c in COLUMNS} for r in keep)
    atomic_write_text(out_csv, s.getvalue())
    todo = [u for u in units if u.key not in done]
    if policy_factory is None:
        policy_factory, checkpoint = make_factory(policy, checkpoint=checkpoint)
    elif checkpoint is None:
        checkpoint = getattr(policy_factory, "checkpoint", None)
    limits = limits or AgentLimits()
    lock = threading.Lock()
    written = [0, 0]   # rows, failures
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(units), initial=len(units) - len(todo), desc="batch", unit="run", file=sys.stderr,
                   dynamic_ncols=True)
    workers = max(1, int(workers))
    pool = make_pool(min(workers, len(todo)), checkpoint, sandbox_config) if todo else None

    def write(rows: list[dict], failed: bool) -> None:
        with lock:
            with open(out_csv, "a", newline="", encoding="utf-8") as f:
                cw = csv.DictWriter(f, COLUMNS, lineterminator="\n")
                cw.writerows({c: r.get(c, "") for c in COLUMNS} for r in rows)
                f.flush()
                os.fsync(f.fileno())
            written[0] += len(rows)
            written[1] += int(failed)
            if bar is not None:
                bar.update(1)

    def run(unit: Unit) -> None:
        folder = unit.folder(tdir)
        base = {"subject": unit.subject.id, "sessions": unit.sessions_label, "prompt": unit.prompt}
        try:
            if folder.exists():
                shutil.rmtree(folder)      # a run cut by an earlier interruption
            folder.mkdir(parents=True)
            inputs = prepare_inputs(unit.volumes(), copy_dir=folder)
            pol = policy_factory(inputs)
            with Conversation(inputs, pol, out_dir=folder, limits=limits, pool=pool,
                              vision_source=getattr(pol, "source", None)) as conv:
                ans = conv.ask(unit.prompt)
            rows = rows_for(unit, ans, str(ans.transcript.path))
            write(rows, ans.status == "error")
        except Exception as exc:
            msg = f"{type(exc).__name__}: {exc}"
            tp = folder / "transcript.json"
            write([base | {"measurement": "", "value": "", "unit": "", "status": "error",
                           "transcript": str(tp) if tp.exists() else "", "message": msg}], True)

    try:
        if workers == 1:
            for u in todo:
                run(u)
        else:
            with ThreadPoolExecutor(workers) as ex:
                for f in as_completed([ex.submit(run, u) for u in todo]):
                    f.result()
    finally:
        if bar is not None:
            bar.close()
        if pool is not None:
            pool.close()
    return BatchSummary(len(units), len(units) - len(todo), len(todo), written[1], written[0],
                        time.perf_counter() - t0, out_csv)
