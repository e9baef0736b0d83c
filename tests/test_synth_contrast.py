"""synth.contrast, synth.artifacts, synth.noise: tissue orderings per contrast, artifacts, noise, determinism."""

from types import SimpleNamespace

import numpy as np
import pytest
import scipy.ndimage as ndi

import voxel_lib as vl

from synth import artifacts, contrast, noise
from synth.phantom import phantom

SEEDS = range(4)


@pytest.fixture(scope="module")
def anat():
    return phantom(3.0)


# A block phantom: one 8-voxel cube per tissue class, so cube interiors are free of partial volume.
_BLOCK_LABELS = {"wm": (2, "Left-Cerebral-White-Matter"), "gm": (3, "Left-Cerebral-Cortex"),
                 "deep_gm": (10, "Left-Thalamus-Proper"), "pallidum": (13, "Left-Pallidum"),
                 "csf": (4, "Left-Lateral-Ventricle"), "cerebellum_wm": (7, "Left-Cerebellum-White-Matter"),
                 "cerebellum_gm": (8, "Left-Cerebellum-Cortex"), "brainstem": (16, "Brain-Stem"),
                 "choroid": (31, "Left-choroid-plexus"), "vessel": (262, "Sinus"), "dura": (98, "Dura"),
                 "skull": (165, "Skull"), "scalp": (258, "Head-ExtraCerebral"), "fat": (125, "Adipose")}


@pytest.fixture(scope="module")
def blocks():
    lab = np.zeros((8 * 5, 8 * 3, 8), np.int32)
    interiors = {}
    for k, (key, (i, _)) in enumerate(_BLOCK_LABELS.items()):
        x, y = 8 * (k % 5), 8 * (k // 5)
        lab[x:x + 8, y:y + 8] = i
        m = np.zeros(lab.shape, bool)
        m[x + 3:x + 5, y + 3:y + 5, 3:5] = True
        interiors[key] = m
    interiors["background"] = np.zeros(lab.shape, bool)
    interiors["background"][35:37, 19:21, 3:5] = True  # the empty cell of the last row
    tissue = {i: ("deep_gm" if key == "pallidum" else key) for key, (i, _) in _BLOCK_LABELS.items()}
    names = {i: n for i, n in _BLOCK_LABELS.values()}
    tissue[0], names[0] = "background", "Unknown"
    a = SimpleNamespace(labels=vl.Volume(lab, vl.ras_grid(lab.shape, 2.0), kind="label"), names=names, tissue=tissue)
    return a, interiors


@pytest.fixture(scope="module")
def medians(blocks):
    a, interiors = blocks
    return {(c, s): _medians(contrast.synthesize(a, c, np.random.default_rng(s)), interiors)
            for c in contrast.CONTRASTS for s in SEEDS}


def _medians(img, masks):
    return {k: float(np.median(img[m])) for k, m in masks.items() if m.any()}


@pytest.mark.parametrize("seed", SEEDS)
def test_mr_tissue_ordering(medians, seed):
    m = {c: medians[c, seed] for c in contrast.CONTRASTS}
    t1, t2, fl, pd, dwi, adc, gre, swi = (m[c] for c in ("t1w", "t2w", "flair", "pd", "dwi", "adc", "gre", "swi"))
    # T1: WM > deep GM > GM > CSF, fat bright, skull dark
    assert t1["wm"] > t1["deep_gm"] > t1["gm"] > t1["csf"] > t1["skull"] and t1["fat"] > t1["wm"]
    # T2: CSF > GM > WM, flow voids dark
    assert t2["csf"] > t2["gm"] > t2["wm"] > t2["vessel"]
    # FLAIR: CSF suppressed, GM > WM
    assert fl["gm"] > fl["wm"] > fl["csf"] and fl["csf"] < 0.5 * fl["wm"]
    # PD: CSF ≳ GM > WM with low contrast
    assert pd["csf"] > pd["gm"] > pd["wm"] and (pd["gm"] - pd["wm"]) / pd["gm"] < 0.35
    # DWI b1000: brain moderate, CSF dark; ADC: CSF bright
    assert dwi["gm"] > dwi["wm"] > dwi["csf"] and dwi["csf"] < 0.5 * dwi["wm"]
    assert adc["csf"] > 2 * adc["gm"] and adc["gm"] > adc["wm"]
    assert 500 < adc["wm"] < 1000  # ADC in 1e-6 mm²/s
    # T2*: veins and iron-rich pallidum dark
    assert gre["csf"] > gre["gm"] > gre["wm"] > gre["vessel"] and gre["pallidum"] < gre["wm"]
    assert swi["vessel"] < swi["wm"] and swi["pallidum"] < swi["gm"] < swi["wm"]
    # no signal outside the head on MR
    assert all(m[c]["background"] == 0 for c in contrast.CONTRASTS if c != "ct")


@pytest.mark.parametrize("seed", SEEDS)
def test_post_contrast_enhances_vessels_and_choroid(medians, seed):
    t1, t1c = medians["t1w", seed], medians["t1c", seed]
    assert t1c["choroid"] / t1c["wm"] > 1.0 > t1["choroid"] / t1["wm"]
    assert t1c["vessel"] / t1c["wm"] > 1.0 > t1["vessel"] / t1["wm"]
    assert t1c["wm"] > t1c["gm"] > t1c["csf"]


@pytest.mark.parametrize("seed", SEEDS)
def test_ct_hounsfield_units(medians, seed):
    ct = medians["ct", seed]
    assert 0 <= ct["csf"] <= 15
    assert 20 <= ct["wm"] <= 34 and 30 <= ct["gm"] <= 45 and ct["gm"] > ct["wm"] + 3
    assert ct["skull"] > 600 and ct["fat"] < -50 and ct["background"] == -1000


@pytest.mark.parametrize("seed", SEEDS)
def test_ordering_on_the_phantom_brain(anat, seed):
    lab = anat.labels.numpy()[0]
    vent = np.isin(lab, [i for i, n in anat.names.items() if n.endswith("Lateral-Ventricle")])
    wm, gm = anat.mask("wm"), anat.mask("gm")
    img = {c: contrast.synthesize(anat, c, np.random.default_rng(seed)) for c in ("t1w", "t2w", "flair")}
    med = {c: [np.median(i[m]) for m in (wm, gm, vent)] for c, i in img.items()}
    assert med["t1w"][0] > med["t1w"][1] > med["t1w"][2]
    assert med["t2w"][2] > med["t2w"][1] > med["t2w"][0]
    assert med["flair"][1] > med["flair"][0] > med["flair"][2]


def test_pre_post_pair_differs_only_in_enhancing_tissue(anat):
    t1 = contrast.synthesize(anat, "t1w", np.random.default_rng(11))
    t1c = contrast.synthesize(anat, "t1c", np.random.default_rng(11))
    enh = ndi.binary_dilation(anat.mask("vessel", "choroid", "dura"), np.ones((3, 3, 3)), iterations=2)  # + PV
    assert np.allclose(t1[~enh], t1c[~enh]) and (t1c[anat.mask("choroid")] > t1[anat.mask("choroid")]).mean() > 0.9


def test_randomised_means_keep_every_ordering():
    rng = np.random.default_rng(0)
    for c in contrast.CONTRASTS:
        seen = set()
        for _ in range(100):
            m = contrast.sample_means(c, rng)
            for a, b in contrast.ORDERINGS[c]:
                assert m[a] > m[b], (c, a, b)
            seen.add(round(m["wm"], 3))
        assert len(seen) > 50  # actually randomised


def test_nominal_and_gmm_spread(anat):
    wm = ndi.binary_erosion(anat.mask("wm"), iterations=2)
    flat = contrast.synthesize(anat, "t1w", np.random.default_rng(0), randomize=False)
    assert np.median(flat[wm]) == pytest.approx(contrast.NOMINAL["t1w"]["wm"], rel=0.01)
    assert np.std(flat[wm]) < 1.0
    noisy = contrast.synthesize(anat, "t1w", np.random.default_rng(0))
    assert np.std(noisy[wm]) > 0.005 * np.median(noisy[wm])
    # partial volume: boundary voxels between WM and CSF take intermediate values
    assert flat.dtype == np.float32 and flat.min() >= 0


def test_same_seed_same_image(anat):
    for c in ("t1w", "ct"):
        a = contrast.synthesize(anat, c, np.random.default_rng(7))
        b = contrast.synthesize(anat, c, np.random.default_rng(7))
        d = contrast.synthesize(anat, c, np.random.default_rng(8))
        assert np.array_equal(a, b) and not np.array_equal(a, d)
        ca = artifacts.corrupt(a, c, np.random.default_rng(1), anat.labels.spacing)
        cb = artifacts.corrupt(b, c, np.random.default_rng(1), anat.labels.spacing)
        assert np.array_equal(ca, cb)
        na = artifacts.add_noise(ca, np.random.default_rng(2), 0.03)
        nb = artifacts.add_noise(cb, np.random.default_rng(2), 0.03)
        assert np.array_equal(na, nb)


def test_unknown_contrast_rejected(anat):
    with pytest.raises(ValueError, match="unknown contrast"):
        contrast.synthesize(anat, "t3w", np.random.default_rng(0))


# --------------------------------------------------------------------------- artifacts
@pytest.fixture(scope="module")
def t1(anat):
    return contrast.synthesize(anat, "t1w", np.random.default_rng(0))


def test_corrupt_strength_zero_is_identity(t1):
    assert np.array_equal(artifacts.corrupt(t1, "t1w", np.random.default_rng(0), 3.0, strength=0), t1)


def test_corrupt_mr_keeps_image_recognisable(t1):
    for s in range(6):
        out = artifacts.corrupt(t1, "t1w", np.random.default_rng(s), 3.0)
        assert out.shape == t1.shape and out.dtype == np.float32
        assert np.isfinite(out).all() and out.min() >= 0
        assert np.corrcoef(out.ravel(), t1.ravel())[0, 1] > 0.8


def test_corrupt_ct_keeps_hounsfield_units(anat):
    ct = contrast.synthesize(anat, "ct", np.random.default_rng(0))
    wm = ndi.binary_erosion(anat.mask("wm"), iterations=2)
    for s in range(4):
        out = artifacts.corrupt(ct, "ct", np.random.default_rng(s), 3.0)
        assert abs(np.median(out[wm]) - np.median(ct[wm])) < 2.0


def test_bias_field_is_smooth_and_multiplicative():
    f = artifacts.bias_field((40, 40, 40), np.random.default_rng(0), 3.0, strength=0.3)
    assert f.min() > 0 and abs(np.log(f).mean()) < 0.1 and np.log(f).std() == pytest.approx(0.3, rel=0.05)
    assert np.abs(np.diff(np.log(f), axis=0)).mean() < 0.05  # slowly varying


def test_ghosting_moves_signal_into_background(anat, t1):
    bg = anat.labels.numpy()[0] == 0
    out = artifacts.ghosting(t1, np.random.default_rng(0), axis=1, amplitude=0.08)
    assert out[bg].mean() > t1[bg].mean() + 0.01 * t1.max()


def test_spike_adds_a_k_space_peak():
    img = np.full((32, 32, 32), 10.0, np.float32)
    out = artifacts.spikes(img, np.random.default_rng(3), n=1, amplitude=2.0)
    k = np.abs(np.fft.fftn(out - out.mean()))
    top = np.sort(k.ravel())[::-1]
    assert top[1] > 20 * np.median(k)  # a pair of conjugate peaks: herringbone stripes
    assert out.std() > 0.01


def test_add_noise_levels(anat, t1):
    bg = ndi.binary_erosion(anat.labels.numpy()[0] == 0, iterations=2)
    level = 0.04
    out = artifacts.add_noise(t1, np.random.default_rng(0), level)
    sigma = level * np.percentile(t1[::2, ::2, ::2], 99)
    # Rician noise in a zero-signal region is Rayleigh: mean sigma * sqrt(pi / 2)
    assert out[bg].mean() == pytest.approx(sigma * np.sqrt(np.pi / 2), rel=0.1)
    assert out.min() >= 0
    ct = contrast.synthesize(anat, "ct", np.random.default_rng(0))
    out = artifacts.add_noise(ct, np.random.default_rng(0), 0.05)  # detected as CT (air at -1000 HU)
    assert np.std(out[bg] - ct[bg]) == pytest.approx(5.0, rel=0.05)


# --------------------------------------------------------------------------- noise helpers
def test_brownian_is_normalised_deterministic_and_multiscale():
    a = noise.brownian((32, 40, 36), np.random.default_rng(0), spacing=2.0)
    b = noise.brownian((32, 40, 36), np.random.default_rng(0), spacing=2.0)
    assert np.array_equal(a, b) and abs(a.mean()) < 1e-4 and a.std() == pytest.approx(1, abs=1e-4)
    coarse = noise.brownian((32, 40, 36), np.random.default_rng(1), spacing=2.0, scales_mm=(32.0,))
    fine = noise.brownian((32, 40, 36), np.random.default_rng(1), spacing=2.0, scales_mm=(4.0,))
    grad = lambda x: np.abs(np.diff(x, axis=0)).mean()  # noqa: E731
    assert grad(coarse) < grad(a) < grad(fine)


def test_perlin_points_match_grid_and_are_smooth():
    g = noise.perlin((20, 24, 16), np.random.default_rng(3), spacing=2.0, scale_mm=16.0, octaves=2)
    pts = np.argwhere(np.ones((20, 24, 16)))[::7]
    p = noise.perlin_at(pts, (20, 24, 16), np.random.default_rng(3), spacing=2.0, scale_mm=16.0, octaves=2)
    assert np.allclose(g[tuple(pts.T)], p, atol=1e-5)
    assert 0.8 < g.std() < 1.2
    assert np.abs(np.diff(g, axis=2)).mean() < 0.5 * g.std()  # correlated over the cell size


def test_random_label_map_for_corrupted_images():
    lab = noise.random_label_map((30, 30, 30), np.random.default_rng(0), spacing=3.0)
    n = len(np.unique(lab))
    assert 8 <= n <= 20 and lab.min() >= 1
    same = (lab[1:] == lab[:-1]).mean()
    assert same > 0.7  # blobs, not salt-and-pepper


# --------------------------------------------------------------------------- docs
def test_contrast_gallery_writes_pngs(anat, tmp_path):
    paths = contrast.example_gallery(anat, tmp_path, contrasts=("t1w", "flair", "ct"))
    assert set(paths) == {"t1w", "flair", "ct", "montage"}
    for p in paths.values():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 2000
