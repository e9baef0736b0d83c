"""NIfTI I/O: round trips, header handling and every malformed-file case (library and CLI)."""

import gzip
import subprocess
import sys
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch

import voxel_lib as vl

OBLIQUE = np.array([[0.98, -0.17, 0.05, -90.3], [0.17, 0.97, -0.2, -120.1], [-0.02, 0.2, 2.9, -60.7], [0, 0, 0, 1]])


@pytest.mark.parametrize("ext", [".nii", ".nii.gz"])
def test_round_trip_image_label_4d(tmp_path, ext):
    rng = np.random.default_rng(0)
    img = vl.Volume(torch.from_numpy(rng.normal(size=(17, 19, 11)).astype(np.float32)), OBLIQUE)
    lab = vl.Volume(torch.from_numpy(rng.integers(0, 3000, size=(17, 19, 11)).astype(np.int32)), OBLIQUE)
    four = vl.Volume(torch.from_numpy(rng.random((3, 17, 19, 11)).astype(np.float32)), OBLIQUE)
    for v in (img, lab, four):
        p = vl.save(v, tmp_path / f"v{ext}")
        back = vl.load(p)
        assert back.kind == v.kind
        assert back.tensor.shape == v.tensor.shape
        assert torch.equal(back.tensor.to(v.tensor.dtype), v.tensor)  # data exactly
        assert np.allclose(back.affine.numpy(), v.affine.numpy(), atol=1e-6)
    assert vl.load(tmp_path / f"v{ext}").channels == 3


def test_header_kept_and_sform_qform_choice(tmp_path):
    data = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    sform = np.diag([2.0, 2.0, 2.0, 1.0])
    qform = np.diag([-1.0, 1.0, 1.0, 1.0])
    img = nib.Nifti1Image(data, sform)
    img.set_sform(sform, code=2)
    img.set_qform(qform, code=1)
    img.header["descrip"] = b"scanner XYZ protocol 7"
    img.header.set_xyzt_units("mm", "sec")
    p = tmp_path / "h.nii.gz"
    nib.save(img, p)
    v = vl.load(p)
    assert v.spacing == (2.0, 2.0, 2.0) and v.is_label
    assert vl.load(p, prefer="qform").orientation == "LAS"
    out = vl.save(v.reorient("LPS"), tmp_path / "h2.nii.gz")
    h2 = nib.load(out).header
    assert h2["descrip"].tobytes().startswith(b"scanner XYZ protocol 7")
    assert int(h2["sform_code"]) == 2
    assert vl.load(out).orientation == "LPS"


def test_scaled_integers_load_as_image(tmp_path):
    data = np.arange(60, dtype=np.int16).reshape(3, 4, 5)
    img = nib.Nifti1Image(data, np.eye(4))
    img.header.set_slope_inter(0.5, -10)
    p = tmp_path / "ct.nii.gz"
    nib.save(img, p)
    v = vl.load(p)
    assert v.kind == "image"
    assert float(v.tensor[0, 0, 0, 1]) == pytest.approx(0.5 * 1 - 10)


def test_nifti2(tmp_path):
    data = np.random.default_rng(1).random((5, 6, 7)).astype(np.float32)
    p = tmp_path / "n2.nii"
    nib.save(nib.Nifti2Image(data, OBLIQUE), p)
    v = vl.load(p)
    assert np.array_equal(v.numpy()[0], data) and np.allclose(v.affine.numpy(), OBLIQUE, atol=1e-6)


def _write(tmp_path, name, data, affine=np.eye(4)):
    p = tmp_path / name
    ok = np.isfinite(affine).all() and abs(np.linalg.det(affine[:3, :3])) > 0
    if ok:
        img = nib.Nifti1Image(data, affine)
    else:  # write a broken sform by hand, as a faulty converter would
        hdr = nib.Nifti1Header()
        hdr.set_data_shape(data.shape)
        hdr.set_data_dtype(data.dtype)
        for i, row in enumerate(("srow_x", "srow_y", "srow_z")):
            hdr[row] = affine[i]
        hdr["sform_code"] = 1
        hdr["qform_code"] = 0
        img = nib.Nifti1Image(data, None, header=hdr)
    nib.save(img, p)
    return p


def malformed_cases(tmp_path):
    cases = {}
    cases["missing"] = (tmp_path / "nope.nii.gz", vl.UnreadableFileError)
    good = _write(tmp_path, "good.nii.gz", np.ones((20, 20, 20), np.float32))
    raw = good.read_bytes()
    trunc = tmp_path / "trunc.nii.gz"
    trunc.write_bytes(raw[: len(raw) // 2])
    cases["truncated"] = (trunc, vl.UnreadableFileError)
    notgz = tmp_path / "text.nii.gz"
    notgz.write_bytes(b"hello, this is not gzip")
    cases["not gzip"] = (notgz, vl.NotAnImageError)
    txt = tmp_path / "notes.nii"
    txt.write_bytes(b"x" * 400)
    cases["not nifti"] = (txt, vl.NotAnImageError)
    png = tmp_path / "slice.png"
    png.write_bytes(b"\x89PNG....")
    cases["wrong extension"] = (png, vl.NotAnImageError)
    cases["2d"] = (_write(tmp_path, "flat.nii.gz", np.ones((10, 10), np.float32)), vl.DimensionError)
    cases["5d"] = (_write(tmp_path, "five.nii.gz", np.ones((3, 3, 3, 2, 2), np.float32)), vl.DimensionError)
    cases["zero axis"] = (_write(tmp_path, "empty.nii.gz", np.ones((4, 0, 4), np.float32)), vl.EmptyAxisError)
    sing = np.eye(4)
    sing[2, 2] = 0
    cases["singular affine"] = (_write(tmp_path, "sing.nii.gz", np.ones((3, 3, 3), np.float32), sing), vl.AffineError)
    nan_aff = np.eye(4)
    nan_aff[0, 3] = np.nan
    cases["non-finite affine"] = (_write(tmp_path, "nanaff.nii.gz", np.ones((3, 3, 3), np.float32), nan_aff),
                                  vl.AffineError)
    return cases


def test_each_malformed_file_raises_its_error(tmp_path):
    for name, (path, err) in malformed_cases(tmp_path).items():
        with pytest.raises(err) as info:
            vl.load(path)
        assert str(path) in str(info.value), name  # the message names the file
        assert isinstance(info.value, vl.VolumeError)


def test_nonfinite_policy_and_limits(tmp_path):
    d = np.ones((6, 6, 6), np.float32)
    d[1, 2, 3] = np.nan
    d[2, 2, 2] = np.inf
    p = _write(tmp_path, "nan.nii.gz", d)
    with pytest.warns(vl.NonFiniteWarning, match="2 NaN/Inf"):
        v = vl.load(p)
    assert torch.isfinite(v.tensor).all() and float(v.tensor[0, 1, 2, 3]) == 0
    with pytest.raises(vl.NonFiniteError):
        vl.load(p, nonfinite="error")
    assert torch.isnan(vl.load(p, nonfinite="keep").tensor).any()
    with pytest.raises(vl.TooLargeError):
        vl.load(p, max_voxels=100)
    aniso = _write(tmp_path, "aniso.nii.gz", np.ones((8, 8, 8), np.float32), np.diag([0.5, 0.5, 8.0, 1]))
    with pytest.warns(vl.AnisotropyWarning):
        vl.load(aniso)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vl.load(_write(tmp_path, "fine.nii.gz", np.ones((8, 8, 8), np.float32), np.diag([1, 1, 3.0, 1])))


def test_cli_prints_errors_without_traceback(tmp_path):
    for name, (path, err) in malformed_cases(tmp_path).items():
        r = subprocess.run([sys.executable, "-m", "voxelprompt.cli", "measure", str(path)],
                           capture_output=True, text=True)
        assert r.returncode == 2, (name, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr, (name, r.stderr)
        assert r.stderr.startswith("error: ") and str(path) in r.stderr, (name, r.stderr)
    # metrics too
    good = _write(tmp_path, "m.nii.gz", np.ones((4, 4, 4), np.uint8))
    r = subprocess.run([sys.executable, "-m", "voxelprompt.cli", "metrics", str(good), str(tmp_path / "gone.nii")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "gone.nii" in r.stderr


def test_gzip_module_round_trip_sanity(tmp_path):
    # a .nii.gz written by us is a real gzip stream readable by other tools
    p = vl.save(vl.Volume(np.ones((3, 3, 3), np.float32)), tmp_path / "a.nii.gz")
    with gzip.open(p) as f:
        assert len(f.read()) > 348
