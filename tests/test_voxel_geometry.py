"""Geometry of Volume: analytic shapes on many grids, orientations, left/right, resampling."""

import itertools
import math

import numpy as np
import pytest
import torch

import voxel_lib as vl
from voxel_lib import shapes

SPACINGS = [(0.8, 0.8, 0.8), (1.0, 1.0, 1.0), (2.0, 2.0, 2.0), (1.0, 1.0, 3.0), (0.9, 0.9, 5.0), (6.0, 6.0, 6.0)]
ROTATIONS = [(0, 0, 0), (15, -25, 40), (90, 0, 0), (-7, 63, 12)]
CENTER = np.array([12.3, -20.7, 8.1])


def grid(spacing, rotation, fov=60.0):
    shape = tuple(int(math.ceil(fov / s)) + 3 for s in spacing)
    aff = vl.rotation_affine(rotation) @ vl.ras_grid(shape, spacing, center=(0, 0, 0))
    aff[:3, 3] += CENTER + (1.37, -0.71, 0.53)  # rotate about the grid centre, place it off-centre
    return shape, aff


def proj_voxel(aff):
    """Width of one voxel projected on each world axis."""
    return np.abs(np.asarray(aff)[:3, :3]).sum(1)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("rotation", ROTATIONS)
def test_sphere_partial_volume(spacing, rotation):
    """Radius 10 mm on every grid: volume within 1 %, centre within 0.5 mm."""
    shape, aff = grid(spacing, rotation, fov=30.0)
    s = shapes.sphere(shape, aff, CENTER, 10.0, supersample=6)
    exact = 4 / 3 * math.pi * 10**3
    assert abs(float(vl.volume(s)) - exact) / exact < 0.01
    assert np.linalg.norm(np.array(vl.center_of_mass(s), float) - CENTER) < 0.5


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("rotation", ROTATIONS[:3])
def test_shapes_volume_com_extent(spacing, rotation):
    """Sphere, ellipsoid and box (≥ 8 voxels across each semi-axis, ≥ 10 mm) on many grids.

    Partial-volume rasterisations give volumes within 1 %; binary ones give centres within
    0.5 mm and world extents within one (projected) voxel.
    """
    r = max(10.0, 8.0 * max(spacing))
    shape, aff = grid(spacing, rotation, fov=2 * 1.8 * r)
    rot = vl.rotation_affine((30, 10, -20))
    size = np.array([1.6 * r, 1.2 * r, 1.4 * r])
    cases = [
        (lambda k: shapes.sphere(shape, aff, CENTER, r, supersample=k), 4 / 3 * math.pi * r**3, np.full(3, 2 * r)),
        (lambda k: shapes.ellipsoid(shape, aff, CENTER, (r * 1.4, r, r * 0.8), supersample=k),
         4 / 3 * math.pi * r**3 * 1.4 * 0.8, 2 * np.array([r * 1.4, r, r * 0.8])),
        (lambda k: shapes.box(shape, aff, CENTER, size, supersample=k), float(np.prod(size)), size),
        (lambda k: shapes.box(shape, aff, CENTER, size, rotation=rot, supersample=k), float(np.prod(size)), None),
    ]
    tol_vox = proj_voxel(aff)
    for make, exact, ext in cases:
        soft, mask = make(6), make(1)
        assert mask.is_label and not soft.is_label
        assert abs(float(vl.volume(soft)) - exact) / exact < 0.01, (soft, float(vl.volume(soft)), exact)
        assert np.linalg.norm(np.array(vl.center_of_mass(soft), float) - CENTER) < 0.5
        # binary: the voxel lattice can shift a flat face by up to half a voxel per axis
        assert (np.abs(np.array(vl.center_of_mass(mask), float) - CENTER) <= np.maximum(0.5, tol_vox / 2)).all()
        if ext is not None:
            e = vl.extent(mask)
            got = np.array([e["lr"], e["ap"], e["si"]], float)
            assert (np.abs(got - ext) <= tol_vox + 1e-6).all(), (got, ext, tol_vox)
    # binary (voxel-centre) sphere volume: within 2 % at ≥ 8 voxels radius
    assert abs(float(vl.volume(cases[0][0](1))) - cases[0][1]) / cases[0][1] < 0.02
    # a rotated box's world extents are those of its rotated corners; a sharp corner can fall
    # between voxel centres (and slices), so allow two of the largest voxel dimension there
    corners = np.array(list(itertools.product(*[(-h, h) for h in size / 2])))
    w = corners @ rot[:3, :3].T
    ext = w.max(0) - w.min(0)
    e = vl.extent(cases[3][0](1))
    got = np.array([e["lr"], e["ap"], e["si"]], float)
    assert (np.abs(got - ext) <= 2 * max(spacing) + 1e-6).all()


def _all_orientations(vol):
    """The same data in all 48 voxel-axis orderings/directions, with matching affines."""
    for perm in itertools.permutations(range(3)):
        for flips in itertools.product((False, True), repeat=3):
            t = vol.tensor
            a = vol.affine.numpy().copy()
            for ax, f in enumerate(flips):
                if f:
                    t = torch.flip(t, dims=(ax + 1,))
                    n = vol.shape[ax]
                    a[:3, 3] = a[:3, 3] + a[:3, ax] * (n - 1)
                    a[:3, ax] = -a[:3, ax]
            t = t.permute(0, *[p + 1 for p in perm])
            a[:3, :3] = a[:3, list(perm)]
            yield vl.Volume(t.contiguous(), a, vol.kind)


def test_48_orientations_identical_world_measurements():
    shape, aff = grid((1.0, 1.5, 2.0), (0, 0, 0), fov=50)
    mask = shapes.ellipsoid(shape, aff, CENTER, (14, 9, 6), rotation=vl.rotation_affine((20, 0, 35)))
    img = mask.new(mask.tensor.float() * 3 + torch.from_numpy(np.random.default_rng(0).random(mask.tensor.shape).astype(np.float32)), kind="image")
    ref = (float(vl.volume(mask)), np.array(vl.center_of_mass(mask), float),
           np.array(list(vl.extent(mask).values()), float), float(vl.mean_intensity(img, mask)))
    codes = set()
    for m, im in zip(_all_orientations(mask), _all_orientations(img)):
        codes.add(m.orientation)
        assert float(vl.volume(m)) == pytest.approx(ref[0], rel=1e-12)
        assert np.allclose(np.array(vl.center_of_mass(m), float), ref[1], atol=1e-6)
        assert np.allclose(np.array(list(vl.extent(m).values()), float), ref[2], atol=1e-6)
        assert float(vl.mean_intensity(im, m)) == pytest.approx(ref[3], rel=1e-6)
        back = m.reorient("RAS")
        assert back.same_grid(mask, atol=1e-9) and torch.equal(back.tensor, mask.tensor)
    assert len(codes) == 48


def test_flipping_x_of_affine_moves_side():
    shape, aff = grid((1.0, 1.0, 1.0), (0, 0, 0), fov=120)
    aff = vl.ras_grid(shape, 1.0, center=(0, 0, 0))
    s = shapes.sphere(shape, aff, (30, 0, 0), 10)
    assert vl.side(s) == "right"
    assert float(vl.center_of_mass(s)[0]) > 0
    flipped = aff.copy()
    flipped[0, :] = -flipped[0, :]  # same array, world x mirrored: now declared LAS
    f = vl.Volume(s.tensor, flipped)
    assert f.orientation == "LAS"
    assert vl.side(f) == "left"
    assert float(vl.center_of_mass(f)[0]) == pytest.approx(-30, abs=0.5)
    both = s.new(s.tensor | shapes.sphere(shape, aff, (-30, 0, 0), 10).tensor)
    assert vl.side(both) == "bilateral"
    assert vl.volume(both.hemisphere("left")) == pytest.approx(float(vl.volume(s)))
    assert vl.side(both.hemisphere("left")) == "left" and vl.side(both.hemisphere("right")) == "right"


def _phantom_labels(shape, aff):
    lab = torch.zeros(shape, dtype=torch.int32)
    for i, (c, r) in enumerate([((0, 0, 0), (40, 48, 38)), ((-12, 5, 3), (9, 14, 8)), ((12, 5, 3), (9, 14, 8)),
                                ((0, -20, -10), (12, 10, 10))], start=1):
        e = shapes.ellipsoid(shape, aff, c, r).tensor[0].bool()
        lab[e] = i
    return vl.Volume(lab, aff, "label")


def test_label_resample_there_and_back_keeps_dice():
    aff = vl.ras_grid((90, 110, 90), 1.0)
    lab = _phantom_labels((90, 110, 90), aff)
    target = vl.rotation_affine((12, -8, 20)) @ vl.ras_grid((120, 140, 120), 0.9)
    there = lab.resample(shape=(120, 140, 120), affine=target)
    assert there.is_label and there.tensor.dtype == lab.tensor.dtype
    assert set(there.labels()) == {1, 2, 3, 4}
    back = there.resample_like(lab)
    for k in range(1, 5):
        assert vl.dice(back, lab, label=k) >= 0.98
    # volumes survive too
    for k in (2, 3):
        assert float(vl.volume(there.select(k))) == pytest.approx(float(vl.volume(lab.select(k))), rel=0.02)


def test_resample_image_world_space_and_antialias():
    aff = vl.ras_grid((64, 64, 64), 1.0)
    # a linear ramp along world x is reproduced exactly by linear interpolation on any grid
    x = vl.Volume(torch.zeros(1), torch.eye(4)) if False else None
    w = vl.Volume(torch.zeros(64, 64, 64), aff).world_coordinates()[0]
    ramp = vl.Volume(w.clone(), aff)
    target = vl.rotation_affine((0, 0, 30)) @ vl.ras_grid((30, 30, 30), 1.3)
    r = ramp.resample(shape=(30, 30, 30), affine=target, antialias=False)
    expect = r.world_coordinates()[0]
    assert torch.allclose(r.tensor[0], expect, atol=1e-3)
    # downsampling a checkerboard: antialiasing removes the aliasing pattern
    ii = np.indices((64, 64, 64)).sum(0) % 2
    board = vl.Volume(torch.from_numpy(ii.astype(np.float32)), aff)
    down = board.resample(4.0)
    assert down.shape == (16, 16, 16) and down.spacing == pytest.approx((4.0, 4.0, 4.0))
    assert float(down.tensor[:, 2:-2, 2:-2, 2:-2].std()) < 0.05
    assert float(down.tensor[:, 2:-2, 2:-2, 2:-2].mean()) == pytest.approx(0.5, abs=0.05)
    # the field of view stays centred
    assert np.allclose(down.center, board.center, atol=1e-6)
    del x


def test_crop_pad_mask_normalize():
    aff = vl.rotation_affine((0, 10, 0)) @ vl.ras_grid((60, 70, 50), (1.0, 1.0, 2.0))
    s = shapes.sphere((60, 70, 50), aff, (5, 0, 0), 8)
    img = vl.Volume(torch.arange(60 * 70 * 50, dtype=torch.float32).reshape(60, 70, 50), aff)
    c = img.crop(s, margin=5)
    # the crop contains the mask's box plus ~5 mm, and voxels keep their world positions
    box = vl.bounding_box(s)
    cbox = vl.bounding_box(vl.Volume(torch.ones(c.shape, dtype=torch.uint8), c.affine))
    assert all(cb <= b - 4.0 for cb, b in zip(cbox.min, box.min))
    assert all(cb >= b + 4.0 for cb, b in zip(cbox.max, box.max))
    ijk = np.array([3, 4, 2])
    src = np.rint(img.world_to_voxel(c.voxel_to_world(ijk))).astype(int)
    assert float(c.tensor[0][tuple(ijk)]) == float(img.tensor[0][tuple(src)])
    # crop to a world box
    cb = img.crop(box=((-10, -10, -10), (10, 10, 10)))
    assert max(cb.fov) < 25
    # pad by mm keeps world positions
    p = img.pad(4, unit="mm")
    assert p.shape == (68, 78, 54)
    assert np.allclose(p.voxel_to_world([4, 4, 2]), img.voxel_to_world([0, 0, 0]))
    # keep / remove inside an ROI
    inside = img.masked(s)
    outside = img.masked(s, invert=True)
    assert torch.equal(inside.tensor + outside.tensor, img.tensor)
    assert float(inside.tensor[s.tensor == 0].abs().max()) == 0
    # normalisation to [0, 1]
    n = img.normalize()
    assert float(n.tensor.min()) == 0.0 and float(n.tensor.max()) == 1.0
    with pytest.raises(vl.GeometryError):
        img.crop(vl.Volume(torch.zeros(60, 70, 50, dtype=torch.uint8), aff))


def test_volume_properties_and_immutability():
    aff = np.array([[0, 0, 2.0, -10], [-1.5, 0, 0, 20], [0, 3.0, 0, -5], [0, 0, 0, 1]])
    v = vl.Volume(np.zeros((4, 5, 6), np.float32), aff)
    assert v.shape == (4, 5, 6) and v.channels == 1
    assert v.spacing == pytest.approx((1.5, 3.0, 2.0))
    assert v.orientation == "PSR"
    assert v.voxel_volume == pytest.approx(9.0)
    assert v.origin == (-10.0, 20.0, -5.0)
    assert v.fov == pytest.approx((6.0, 15.0, 12.0))
    assert np.allclose(v.center, v.voxel_to_world([1.5, 2, 2.5]))
    r = v.reorient()
    assert r.orientation == "RAS" and r.shape == (6, 4, 5)
    assert v.orientation == "PSR"  # the original is untouched
    m = vl.Volume(np.zeros((4, 5, 6), np.uint8), aff)
    assert m.is_label and not v.is_label
    assert v.to(dtype=torch.float64).dtype == torch.float64
    with pytest.raises(vl.AffineError):
        vl.Volume(np.zeros((3, 3, 3)), np.zeros((4, 4)))
    with pytest.raises(vl.DimensionError):
        vl.Volume(np.zeros((3, 3)))
