"""synth.lesions: anatomy constraints, metadata measured from masks, signal classes, change(), determinism."""

import json
from collections import Counter

import numpy as np
import pytest
import scipy.ndimage as ndi

import voxel_lib as vl
from synth import contrast, lesions
from synth.lesions import LESION_CLASSES, ONTOLOGY, Lesion
from synth.phantom import phantom

LOBES = {1: "frontal", 2: "parietal", 3: "temporal", 4: "occipital", 5: "insula", 6: "cingulate"}
TERRITORIES = {1: "ACA", 2: "MCA", 3: "PCA"}
PARENCHYMA = ("wm", "gm", "deep_gm", "cerebellum_wm", "cerebellum_gm", "brainstem")
SEEDS = range(3)


@pytest.fixture(scope="module")
def anat():
    return phantom(3.0)


@pytest.fixture(scope="module")
def per_class(anat):
    """Three lesions of every class (different seeds)."""
    return {(cls, s): lesions.sample_lesions(anat, np.random.default_rng([s, k]), 1, [cls])[0]
            for k, cls in enumerate(LESION_CLASSES) for s in SEEDS}


def _arr(v):
    return v.numpy()[0]


def _ventricles(anat):
    lab = _arr(anat.labels)
    return np.isin(lab, [i for i, n in anat.names.items() if "vent" in n.lower() and anat.tissue[i] == "csf"])


def _majority(values):
    u, c = np.unique(values, return_counts=True)
    return int(u[np.argmax(c)])


# --------------------------------------------------------------------------- metadata vs mask
def test_metadata_agrees_with_mask(anat, per_class):
    hemi, lobes, terr = _arr(anat.hemispheres), _arr(anat.lobes), _arr(anat.territories)
    paren, vent = anat.mask(*PARENCHYMA), _ventricles(anat)
    voxvol = anat.labels.voxel_volume
    for (cls, _), les in per_class.items():
        m, meta = les.mask, les.meta
        assert m.dtype == bool and m.shape == anat.labels.shape and m.any()
        assert meta["cls"] == cls and meta["ontology"] == ONTOLOGY[cls] and meta["ontology"][-1] == "lesion"
        # volume to 1 %
        assert meta["volume_ml"] == pytest.approx(m.sum() * voxvol / 1000, rel=0.01)
        assert meta["diameter_mm"] == pytest.approx((6 * meta["volume_ml"] * 1000 / np.pi) ** (1 / 3), rel=0.01)
        # hemisphere by majority overlap ("bilateral" when the minor side holds >= 10 %)
        h = hemi[m]
        left = (h == 1).sum() / max(1, (h > 0).sum())
        expect = "left" if left >= 0.9 else "right" if left <= 0.1 else "bilateral"
        assert meta["hemisphere"] == expect, (cls, left)
        # lobe by majority overlap when the lesion lies mostly in lobes
        lv = lobes[m]
        if (lv > 0).mean() >= 0.3:
            assert meta["lobe"] == LOBES[_majority(lv[lv > 0])], cls
        elif paren[m].mean() >= 0.5 or vent[m].mean() >= 0.5:  # deep or intraventricular: no lobe
            assert meta["lobe"] is None
        else:  # extra-axial: the lobe of the parenchyma it abuts
            assert meta["location"] == "extra-axial" and meta["lobe"] in LOBES.values()
        # territory by majority when covered
        tv = terr[m]
        if (tv > 0).mean() >= 0.5:
            assert meta["territory"] == TERRITORIES[_majority(tv[tv > 0])]
        else:
            assert meta["territory"] is None
        # components: disjoint, union = mask
        if les.components:
            acc = np.zeros_like(m, dtype=int)
            for c in les.components.values():
                acc += c
            assert acc.max() == 1 and np.array_equal(acc > 0, m)
            assert sorted(les.components) == meta["components"]
        # metadata is JSON-serialisable
        json.dumps(meta)
        assert set(meta["signal"]) == set(contrast.CONTRASTS)
        assert meta["restriction"] == (meta["signal"]["dwi"] == "hyper" and meta["signal"]["adc"] == "hypo")


def test_deep_structure_and_intraventricular_location(anat):
    # a hand-made mask in the left thalamus and one in the right lateral ventricle
    lab = _arr(anat.labels)
    th = np.isin(lab, [i for i, n in anat.names.items() if n.startswith("Left-Thalamus")])
    meta = lesions.measure_meta(th, anat)
    assert meta["deep_structure"].startswith("Left-Thalamus") and meta["lobe"] is None
    assert meta["hemisphere"] == "left" and meta["territory"] == "PCA"
    vent = lab == next(i for i, n in anat.names.items() if n == "Right-Lateral-Ventricle")
    meta = lesions.measure_meta(vent, anat)
    assert meta["deep_structure"] == "Right-Lateral-Ventricle" and meta["lobe"] is None
    assert meta["hemisphere"] == "right"
    both = th | vent
    assert lesions.measure_meta(both, anat)["hemisphere"] == "bilateral"
    with pytest.raises(ValueError):
        lesions.measure_meta(np.zeros_like(th), anat)


def test_anatomical_constraints(anat, per_class):
    wm = anat.mask("wm")
    paren = anat.mask(*PARENCHYMA)
    vent = _ventricles(anat)
    terr, hemi = _arr(anat.territories), _arr(anat.hemispheres)
    extra = anat.mask("csf", "dura") & ~vent
    for (cls, _), les in per_class.items():
        m, loc = les.mask, les.meta["location"]
        if loc == "intraventricular":
            assert (vent | anat.mask("choroid"))[m].all(), cls
        elif loc == "extra-axial":
            assert cls in ("meningioma", "cyst")
            assert extra[m].mean() > 0.2 and anat.mask("csf", "dura", "gm")[m].all()
        elif cls == "resection_cavity":
            assert (paren | extra)[m].all()
        else:
            assert paren[m].all(), cls
        if cls == "wmh":
            assert wm[m].all()
            assert ndi.label(m, np.ones((3, 3, 3)))[1] >= 2 or les.meta["n_foci"] >= 3  # multiple foci
        if cls == "infarct":  # one territory of one hemisphere
            assert len(np.unique(terr[m])) == 1 and len(np.unique(hemi[m])) == 1
            assert les.meta["territory"] in ("ACA", "MCA", "PCA") and les.meta["acuity"] in ("acute", "subacute", "chronic")
        if cls == "metastasis" or (cls == "glioma" and les.meta["grade"] == "high"):
            assert "enhancing" in les.components and les.meta["enhancement"]


def test_classes_cover_locations(anat):
    # meningioma: mostly extra-axial; hemorrhage: deep, lobar or intraventricular
    locs = Counter(lesions.sample_lesions(anat, np.random.default_rng(s), 1, ["meningioma"])[0].meta["location"]
                   for s in range(12))
    assert locs["extra-axial"] >= 6


# --------------------------------------------------------------------------- rendering
def _ring(anat, les, union):
    """Surrounding tissue: voxel_lib's 3 mm shell within parenchyma outside every lesion (wider if tiny)."""
    ring = lesions.reference_ring(les.mask, anat, union)
    shell = vl.surrounding(vl.Volume(les.mask.astype(np.uint8), anat.labels.affine, kind="label"), 3.0).numpy()[0] > 0
    own = shell & anat.mask(*PARENCHYMA) & ~union
    if own.sum() >= 20:  # independent of reference_ring for every lesion with a parenchymal shell
        assert np.array_equal(own, ring)
    return ring


def _vl_signal(img, anat, mask, ring):
    aff = anat.labels.affine
    s = vl.signal_class(vl.Volume(img, aff), vl.Volume(mask.astype(np.uint8), aff, kind="label"),
                        vl.Volume(ring.astype(np.uint8), aff, kind="label"))
    return {"hyperintense": "hyper", "hypointense": "hypo", "isointense": "iso"}[s]


@pytest.fixture(scope="module")
def rendered(anat):
    """Three subjects with three lesions each, every contrast rendered."""
    out = []
    for s in SEEDS:
        rng = np.random.default_rng(100 + s)
        les = lesions.sample_lesions(anat, rng, 3)
        imgs = {c: lesions.render(contrast.synthesize(anat, c, rng), c, les, anat, rng) for c in contrast.CONTRASTS}
        out.append((les, imgs))
    return out


def test_rendered_signal_matches_metadata(anat, rendered):
    n = 0
    for les, imgs in rendered:
        union = np.any([le.mask for le in les], axis=0)
        for le in les:
            ring = _ring(anat, le, union)
            for c, img in imgs.items():
                assert _vl_signal(img, anat, le.mask, ring) == le.meta["signal"][c], (le.cls, c)
                n += 1
    assert n == 3 * 3 * len(contrast.CONTRASTS)


def test_per_class_signal_on_every_class(anat, per_class):
    for (cls, s), les in per_class.items():
        rng = np.random.default_rng(s)
        for c in ("t1w", "flair", "dwi", "adc", "t1c", "ct"):
            img = lesions.render(contrast.synthesize(anat, c, rng), c, [les], anat, rng)
            ring = lesions.reference_ring(les.mask, anat, les.mask)
            assert _vl_signal(img, anat, les.mask, ring) == les.meta["signal"][c], (cls, c)


def _rel(img, mask, ring):
    return lesions.relative_signal(img, mask, ring)


def _render_one(anat, les, c, seed=0):
    rng = np.random.default_rng(seed)
    return lesions.render(contrast.synthesize(anat, c, rng), c, [les], anat, rng)


def test_clinical_signal_rules(anat, per_class):
    for (cls, s), les in per_class.items():
        sig, meta = les.meta["signal"], les.meta
        if cls == "hemorrhage":  # acute/subacute blood: hyperdense on CT, dark on GRE/SWI
            assert sig["ct"] == "hyper" and sig["gre"] == "hypo" and sig["swi"] == "hypo"
            ct = _render_one(anat, les, "ct", s)
            assert np.mean(ct[les.mask]) > 40  # HU
        if cls == "infarct" and meta["acuity"] == "acute":
            assert sig["dwi"] == "hyper" and sig["adc"] == "hypo" and meta["restriction"]
        if cls == "infarct" and meta["acuity"] == "chronic":
            assert sig["flair"] == "hypo" and sig["adc"] == "hyper" and not meta["restriction"]
        if cls in ("cyst", "resection_cavity"):  # CSF-like
            assert (sig["t1w"], sig["t2w"], sig["flair"], sig["dwi"], sig["adc"]) == ("hypo", "hyper", "hypo", "hypo", "hyper")
        if cls == "cyst":
            assert not meta["enhancement"] and not meta["restriction"]
        if cls in ("wmh", "edema"):
            assert sig["flair"] == "hyper" and sig["t2w"] == "hyper" and not meta["enhancement"]
        if cls == "glioma":
            assert sig["t2w"] == "hyper" and sig["flair"] == "hyper" and sig["t1w"] == "hypo"
        if cls == "meningioma":
            assert sig["t1w"] == "iso" and meta["enhancement"] and sig["t1c"] == "hyper"


def test_enhancement_brighter_on_t1c_than_t1w(anat, per_class):
    # a pre/post pair: both synthesized from generators in the same state share tissue contrast
    seen = Counter()
    for (cls, s), les in per_class.items():
        t1 = _render_one(anat, les, "t1w", s)
        t1c = _render_one(anat, les, "t1c", s)
        ring = lesions.reference_ring(les.mask, anat, les.mask)
        enh = lesions.enhancing_mask(les)
        assert enh.any() == les.meta["enhancement"] and les.mask[enh].all()
        part = enh if les.meta["enhancement"] else les.mask
        gain = _rel(t1c, part, ring) - _rel(t1, part, ring)
        if les.meta["enhancement"]:
            assert gain > 0.3, (cls, gain)
            assert t1c[part].mean() / t1c[ring].mean() > t1[part].mean() / t1[ring].mean()
        else:
            assert abs(gain) < 0.05, (cls, gain)
        seen[les.meta["enhancement"]] += 1
    assert seen[True] >= 5 and seen[False] >= 5


def test_restricted_infarct_bright_dwi_dark_adc(anat):
    found = 0
    wm = anat.mask("wm")
    for s in range(30):
        les = lesions.sample_lesions(anat, np.random.default_rng([7, s]), 1, ["infarct"])[0]
        if les.meta["acuity"] != "acute":
            continue
        ring = lesions.reference_ring(les.mask, anat, les.mask)
        dwi = _render_one(anat, les, "dwi", s)
        adc = _render_one(anat, les, "adc", s)
        assert _rel(dwi, les.mask, ring) > 0.2 and _rel(adc, les.mask, ring) < -0.2
        assert np.mean(adc[les.mask]) < np.median(adc[wm & ~les.mask])  # below normal white matter
        found += 1
        if found == 2:
            break
    assert found == 2


def test_heterogeneous_components(anat):
    les = next(le for s in range(40)
               for le in [lesions.sample_lesions(anat, np.random.default_rng([3, s]), 1, ["glioma"])[0]]
               if le.meta["grade"] == "high")
    comp = les.components
    assert set(comp) == {"edema", "enhancing", "necrotic"}
    # concentric: necrosis is deepest inside the lesion, edema outermost
    depth = ndi.distance_transform_edt(les.mask)
    d = {k: depth[v].mean() for k, v in comp.items()}
    assert d["necrotic"] > d["enhancing"] > d["edema"]
    t1c = _render_one(anat, les, "t1c")
    t2 = _render_one(anat, les, "t2w")
    assert t1c[comp["enhancing"]].mean() > t1c[comp["necrotic"]].mean()
    assert t1c[comp["enhancing"]].mean() > t1c[comp["edema"]].mean()
    assert t2[comp["necrotic"]].mean() > t2[comp["enhancing"]].mean()  # fluid-like core


def test_render_leaves_healthy_tissue_alone(anat, per_class):
    les = per_class["cyst", 0]
    rng = np.random.default_rng(0)
    img = contrast.synthesize(anat, "t2w", rng)
    out = lesions.render(img, "t2w", [les], anat, rng)
    assert np.array_equal(out[~les.mask], img[~les.mask]) and not np.array_equal(out[les.mask], img[les.mask])
    assert out.dtype == np.float32 and lesions.render(img, "t2w", [], anat, rng) is not img


# --------------------------------------------------------------------------- several lesions, change, determinism
def test_several_lesions_distinct_and_disjoint(anat):
    for s in SEEDS:
        les = lesions.sample_lesions(anat, np.random.default_rng(s), 4)
        assert [le.meta["id"] for le in les] == [1, 2, 3, 4]
        keys = {(le.cls, le.meta["hemisphere"], le.meta["lobe"], le.meta["deep_structure"]) for le in les}
        assert len(keys) == 4
        acc = np.sum([le.mask for le in les], axis=0)
        assert acc.max() == 1
    # a pool with repeats: two metastases at distinct places
    les = lesions.sample_lesions(anat, np.random.default_rng(9), 2, ["metastasis", "metastasis"])
    assert les[0].cls == les[1].cls == "metastasis"
    assert (les[0].meta["hemisphere"], les[0].meta["lobe"], les[0].meta["deep_structure"]) != \
        (les[1].meta["hemisphere"], les[1].meta["lobe"], les[1].meta["deep_structure"])


@pytest.mark.parametrize("factor", [0.5, 0.8, 1.3, 2.0])
def test_change_gives_requested_volume(anat, per_class, factor):
    for cls in ("glioma", "infarct", "metastasis", "wmh"):
        les = per_class[cls, 0]
        new = lesions.change(les, anat, factor, np.random.default_rng(1))
        ratio = new.mask.sum() / les.mask.sum()
        assert ratio == pytest.approx(factor, rel=0.02, abs=1.0 / les.mask.sum()), cls
        assert new.meta["volume_ml"] / les.meta["volume_ml"] == pytest.approx(ratio, rel=1e-3)
        assert new.meta["id"] == les.meta["id"] and new.meta["cls"] == cls and new.meta["signal"] == les.meta["signal"]
        if factor > 1:
            assert new.mask[les.mask].all()  # grows outward
        else:
            assert les.mask[new.mask].all()  # shrinks inward
        if les.components:
            for k, v in les.components.items():
                assert new.components[k].sum() / new.mask.sum() == pytest.approx(v.sum() / les.mask.sum(), abs=0.05)
        assert not np.array_equal(les.mask, new.mask)


def test_change_chains_and_respects_limits(anat, per_class):
    les = per_class["glioma", 1]
    a = lesions.change(les, anat, 1.5, np.random.default_rng(0))
    b = lesions.change(a, anat, 0.5, np.random.default_rng(1))
    assert b.mask.sum() / les.mask.sum() == pytest.approx(0.75, rel=0.02)
    with pytest.raises(ValueError):
        lesions.change(les, anat, 1e4, np.random.default_rng(0))
    with pytest.raises(ValueError):
        lesions.change(les, anat, 0.0, np.random.default_rng(0))
    # the original is untouched and a grown lesion renders with its metadata's signal
    assert les.mask.sum() == round(les.meta["volume_ml"] * 1000 / anat.labels.voxel_volume)
    img = _render_one(anat, a, "flair")
    ring = lesions.reference_ring(a.mask, anat, a.mask)
    assert _vl_signal(img, anat, a.mask, ring) == a.meta["signal"]["flair"]


def test_same_seed_same_lesions_and_images(anat):
    def run(seed):
        rng = np.random.default_rng(seed)
        les = lesions.sample_lesions(anat, rng, 2)
        img = lesions.render(contrast.synthesize(anat, "flair", rng), "flair", les, anat, rng)
        return les, img

    (l1, i1), (l2, i2), (_, i3) = run(4), run(4), run(5)
    assert np.array_equal(i1, i2) and not np.array_equal(i1, i3)
    for a, b in zip(l1, l2):
        assert np.array_equal(a.mask, b.mask) and a.meta == b.meta
        assert a.components.keys() == b.components.keys()


def test_unknown_class_rejected(anat):
    with pytest.raises(ValueError, match="unknown lesion class"):
        lesions.sample_lesions(anat, np.random.default_rng(0), 1, ["tumour"])
    assert isinstance(lesions.sample_lesions(anat, np.random.default_rng(0), 1)[0], Lesion)


# --------------------------------------------------------------------------- docs
def test_lesion_gallery_writes_pngs(anat, tmp_path):
    paths = lesions.example_gallery(anat, tmp_path, classes=("glioma", "hemorrhage"), contrasts=("t1w", "ct"))
    assert set(paths) == {"glioma", "hemorrhage", "montage"}
    for p in paths.values():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 2000
