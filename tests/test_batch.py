"""Batch runs over a synthetic BIDS dataset: discovery, planning, the tidy CSV, interruption and resume.

The dataset: 6 subjects × 2 dated sessions of a 3 mm T1 with a spherical lesion that grows, its
truth mask in ``derivatives/truth``. The policy (``--policy test_batch:oracle_policy``) runs the
catalog's volume-change program with the truth masks as ``segment``'s result; sub-0004's second
T1 is corrupt, so that subject fails and the others go on.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import voxel_lib as vl
from voxel_lib import shapes
from voxelprompt.batch import bids_stem, discover, is_longitudinal, plan, read_manifest, run_batch
from voxelprompt.policy import ScriptedPolicy, Step

REPO = Path(__file__).resolve().parent.parent
GROWTH = "how much has the lesion grown?"
DATES = {1: ("2021-03-01", "2023-04-02"), 2: ("2019-11-20", "2020-05-02"), 3: ("2022-01-10", "2022-07-01"),
         4: ("2020-02-02", "2021-02-02"), 5: ("2018-06-15", "2019-06-15"), 6: ("2021-09-09", "2022-09-09")}
SHAPE, SPACING = (26, 30, 24), 3.0


def _radius(sub: int, ses: int) -> float:
    return 7.0 + sub * 0.5 + ses * (1.0 + 0.25 * sub)


def make_dataset(root: Path) -> Path:
    aff = vl.ras_grid(SHAPE, SPACING)
    g = torch.Generator().manual_seed(0)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "test", "BIDSVersion": "1.9.0"}))
    for s, (d0, d1) in DATES.items():
        sub = f"sub-{s:04d}"
        labels = []
        for k, date in enumerate((d0, d1)):
            ses = f"ses-{k + 1:02d}"            # labels are not dates: dates come from the tsv / sidecars
            labels.append((ses, date))
            ball = shapes.sphere(SHAPE, aff, (5.0, -4.0, 2.0), _radius(s, k))
            img = vl.Volume(0.2 * torch.rand(SHAPE, generator=g) + 0.7 * ball.tensor[0].float(), aff)
            anat = root / sub / ses / "anat"
            anat.mkdir(parents=True)
            t1 = anat / f"{sub}_{ses}_T1w.nii.gz"
            if s == 4 and k == 1:
                t1.write_bytes(b"corrupt")
            else:
                vl.save(img, t1)
            if s == 6:
                (anat / f"{sub}_{ses}_T1w.json").write_text(json.dumps({"AcquisitionDateTime": f"{date}T10:00:00"}))
            vl.save(img, anat / f"{sub}_{ses}_FLAIR.nii.gz")
            truth = root / "derivatives" / "truth" / sub / ses / "anat"
            truth.mkdir(parents=True)
            vl.save(ball, truth / f"{sub}_{ses}_desc-lesion1_mask.nii.gz")
        if s != 6:
            (root / sub / f"{sub}_sessions.tsv").write_text(
                "session_id\tacq_time\n" + "".join(f"{a}\t{b}T08:30:00\n" for a, b in labels))
    return root


def _truth_path(t1_path: str) -> Path:
    p = Path(t1_path)
    sub, ses = p.parent.parent.parent.name, p.parent.parent.name
    root = p.parent.parent.parent.parent
    return root / "derivatives" / "truth" / sub / ses / "anat" / f"{sub}_{ses}_desc-lesion1_mask.nii.gz"


def oracle_policy(inputs):
    """The volume-change program; segment() returns the truth masks of both sessions."""
    t1s = sorted((i for i in inputs if i.stem == "t1"), key=lambda i: i.session)
    masks = [vl.load(_truth_path(i.path)).resample_like(i.volume, mode="nearest") for i in t1s]
    d0, d1 = t1s[0].date, t1s[-1].date
    args = ", ".join(f"{i.name}<MOD>" for i in inputs)
    return ScriptedPolicy([[
        Step(f"lesion_1, lesion_2 = segment({args})\nbefore = vl.volume(lesion_1, \"mL\")\n"
             "after = vl.volume(lesion_2, \"mL\")\nprint(before, after)", masks=[masks]),
        Step(f"change = vl.change(before, after, \"{d0}\", \"{d1}\")\nprint(change)\n"
             "report(measurements={\"volume change\": change[\"absolute\"], \"percent change\": "
             "change[\"percent\"], \"change per year\": change[\"per_year\"]})"),
    ]], source="oracle")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("bids"))


def test_discovery_dates_and_plan(dataset, tmp_path):
    subs = discover(dataset)
    assert [s.id for s in subs] == [f"sub-{i:04d}" for i in range(1, 7)]
    for s in subs:
        n = int(s.id[4:])
        assert [x.date for x in s.sessions] == list(DATES[n])       # from sessions.tsv, or sidecars (sub-0006)
        assert all(set(x.volumes) == {"t1", "flair"} for x in s.sessions)
    assert [bids_stem(n) for n in ("sub-1_ses-2_T1w.nii.gz", "sub-1_ce-gadolinium_T1w.nii.gz", "sub-1_FLAIR.nii",
                                   "sub-1_acq-swi_T2starw.nii.gz", "sub-1_acq-adc_dwi.nii.gz", "sub-1_ct.nii.gz",
                                   "sub-1_bold.nii.gz")] == ["t1", "t1c", "flair", "swi", "adc", "ct", None]
    assert is_longitudinal(GROWTH) and is_longitudinal("has the mass progressed since the last scan?")
    assert not is_longitudinal("what is the volume of the left hippocampus?")
    units = plan(subs, [GROWTH, "what is the lesion volume?"])
    assert len(units) == 6 + 12
    longi = [u for u in units if u.prompt == GROWTH]
    assert longi[0].sessions_label == "ses-01;ses-02"
    assert longi[0].volumes() == {f"{m}@{d}": str(dataset / "sub-0001" / ses / "anat" / f"sub-0001_{ses}_{suf}.nii.gz")
                                  for ses, d in zip(("ses-01", "ses-02"), DATES[1])
                                  for m, suf in (("t1", "T1w"), ("flair", "FLAIR"))}
    # a CSV manifest (relative paths) gives the same subjects
    man = tmp_path / "manifest.csv"
    rows = ["subject,session,date,volume,path"] + [
        f"{s.id},{x.label},{x.date},{k},{os.path.relpath(p, tmp_path)}" for s in subs for x in s.sessions
        for k, p in x.volumes.items()]
    man.write_text("\n".join(rows) + "\n")
    got = read_manifest(man)
    assert [(s.id, [x.date for x in s.sessions]) for s in got] == [(s.id, [x.date for x in s.sessions]) for s in subs]
    assert Path(got[0].sessions[0].volumes["t1"]).resolve() == Path(subs[0].sessions[0].volumes["t1"]).resolve()


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _expected_change(s: int) -> float:
    aff = vl.ras_grid(SHAPE, SPACING)
    v = [float(vl.volume(shapes.sphere(SHAPE, aff, (5.0, -4.0, 2.0), _radius(s, k)), "mL")) for k in (0, 1)]
    return v[1] - v[0]


def test_batch_writes_a_tidy_csv_and_resumes_after_an_interruption(dataset, tmp_path):
    out = tmp_path / "results.csv"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "tests"), str(REPO)]))
    proc = subprocess.Popen([sys.executable, "-m", "voxelprompt.cli", "batch", str(dataset), "--prompt", GROWTH,
                             "--out", str(out), "--workers", "1", "--policy", "test_batch:oracle_policy",
                             "--no-progress"], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    t = time.perf_counter()
    try:     # interrupt (SIGKILL) once two subjects are in the CSV
        while time.perf_counter() - t < 240:
            if proc.poll() is not None:
                break
            if out.exists() and len({r["subject"] for r in _rows(out)}) >= 2:
                break
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, err
    first = {r["subject"] for r in _rows(out)}
    assert 2 <= len(first) < 6
    # resume: the done subjects are skipped, the rest run (two at a time)
    s = run_batch(dataset, [GROWTH], out, workers=2, policy_factory=oracle_policy, progress=False)
    assert s.units == 6 and s.skipped == len(first - {"sub-0004"}) and s.ran == 6 - s.skipped and s.failed == 1
    rows = _rows(out)
    assert list(rows[0]) == ["subject", "sessions", "prompt", "measurement", "value", "unit", "status", "transcript",
                             "message"]
    by = {}
    for r in rows:
        by.setdefault(r["subject"], []).append(r)
    assert sorted(by) == [f"sub-{i:04d}" for i in range(1, 7)]
    for sub, rs in by.items():
        if sub == "sub-0004":      # the corrupt scan: recorded, the others went on
            assert [(r["status"], r["measurement"]) for r in rs] == [("error", "")]
            assert "sub-0004_ses-02_T1w.nii.gz" in rs[0]["message"]
            continue
        assert [r["measurement"] for r in rs] == ["volume change", "percent change", "change per year"]
        assert {r["status"] for r in rs} == {"ok"} and rs[0]["sessions"] == "ses-01;ses-02" and rs[0]["unit"] == "mL"
        assert float(rs[0]["value"]) == pytest.approx(_expected_change(int(sub[4:])), rel=1e-6)
        assert Path(rs[0]["transcript"]).is_file()
        tr = json.loads(Path(rs[0]["transcript"]).read_text())
        assert tr["turns"][0]["header"].splitlines()[1:] == [
            f"t1_1: T1w, {DATES[int(sub[4:])][0]}", f"flair_1: FLAIR, {DATES[int(sub[4:])][0]}",
            f"t1_2: T1w, {DATES[int(sub[4:])][1]}", f"flair_2: FLAIR, {DATES[int(sub[4:])][1]}"]
    # a third run has nothing left but the failed subject
    s3 = run_batch(dataset, [GROWTH], out, workers=1, policy_factory=oracle_policy, progress=False)
    assert (s3.skipped, s3.ran, s3.failed) == (5, 1, 1)
    assert len(_rows(out)) == len(rows)
