"""``voxelprompt bench voxel-lib``: throughput of resampling and morphometry on a 256³ volume."""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch

import voxel_lib as vl
from voxel_lib import shapes


def _time(fn, repeat: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="voxelprompt bench voxel-lib", description=__doc__)
    p.add_argument("--size", type=int, default=256, help="cube edge in voxels (default 256)")
    p.add_argument("--repeat", type=int, default=3, help="timed repetitions; the best is reported")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)

    n = args.size
    rng = np.random.default_rng(0)
    aff = vl.ras_grid((n, n, n), 1.0)
    img = vl.Volume(torch.from_numpy(rng.random((n, n, n), dtype=np.float32)), aff)
    mask = shapes.ellipsoid((n, n, n), aff, (5, -3, 2), (60, 45, 35))
    lesion = shapes.sphere((n, n, n), aff, (20, 10, 0), 25)
    obl_aff = vl.rotation_affine((10, 5, 15)) @ vl.ras_grid((n, n, n), 1.0)
    nvox = n**3
    cases = [
        ("reorient RAS->LIA", lambda: img.reorient("LIA")),
        ("resample image 1->1.5 mm (linear, antialias)", lambda: img.resample(1.5)),
        ("resample image 1->0.8 mm (linear)", lambda: img.resample(0.8)),
        ("resample image to oblique grid (linear)", lambda: img.resample(shape=(n, n, n), affine=obl_aff)),
        ("resample labels to oblique grid (nearest)", lambda: mask.resample(shape=(n, n, n), affine=obl_aff)),
        ("crop to mask + 10 mm", lambda: img.crop(mask, margin=10)),
        ("normalize (robust percentiles)", lambda: img.normalize()),
        ("volume", lambda: vl.volume(mask)),
        ("center_of_mass", lambda: vl.center_of_mass(mask)),
        ("extent / bounding box", lambda: vl.extent(mask)),
        ("max_diameter", lambda: vl.max_diameter(mask)),
        ("components (26-connected)", lambda: vl.components(mask)),
        ("intensity_stats", lambda: vl.intensity_stats(img, mask)),
        ("dice", lambda: vl.dice(mask, lesion)),
        ("hd95", lambda: vl.hd95(mask, lesion)),
        ("nsd @1 mm", lambda: vl.nsd(mask, lesion, 1.0)),
    ]
    rows = []
    print(f"voxel_lib on a {n}³ volume ({nvox / 1e6:.1f} M voxels), torch threads={torch.get_num_threads()}, "
          f"{platform.processor() or platform.machine()}")
    print(f"{'operation':<46} {'seconds':>9} {'Mvoxel/s':>10}")
    for name, fn in cases:
        t = _time(fn, args.repeat)
        rows.append({"operation": name, "seconds": t, "mvoxel_per_s": nvox / t / 1e6})
        print(f"{name:<46} {t:9.3f} {nvox / t / 1e6:10.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size": n, "threads": torch.get_num_threads(), "results": rows}, f, indent=2)
    return 0
