"""``voxelprompt bench synth``: how fast synthetic subjects are generated at the training resolution.

Prints a table: template load (once per process), then per subject (mean over ``--n``) the
anatomy warp, lesion sampling and per-acquisition image time, and the throughput in subjects and
acquisitions per second. Subjects are drawn as training draws them (random sessions, protocols and
lesions). One torch thread by default, as in a ``DataLoader`` worker (one worker per spare core);
``--threads 0`` keeps torch's default. ``--json PATH`` also writes the numbers.

Example::

    voxelprompt bench synth --n 8 --anatomy atlas --resolution 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="voxelprompt bench synth", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=8, help="subjects to generate (default 8)")
    p.add_argument("--anatomy", choices=("atlas", "phantom", "auto"), default="auto",
                   help="anatomy source (default: atlas when installed, else phantom)")
    p.add_argument("--resolution", type=float, default=2.0, help="working resolution in mm (default 2, training)")
    p.add_argument("--sessions", type=int, default=None, help="sessions per subject (default random 1-3)")
    p.add_argument("--seed", type=int, default=0, help="base seed")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1, as in a DataLoader worker; 0 = torch's default)")
    p.add_argument("--json", dest="json_path", default=None, help="also write the results as JSON here")
    return p


def _timed(fn, *a, **k):
    t = time.perf_counter()
    out = fn(*a, **k)
    return out, time.perf_counter() - t


def run(n: int = 8, anatomy: str = "auto", resolution: float = 2.0, sessions: int | None = None,
        seed: int = 0) -> dict:
    """Runs the benchmark; returns the results (seconds, rates, sizes)."""
    from . import deform, geometry
    from . import lesions as les_mod
    from .anatomy import atlas_available, template
    from .subject import generate_subject, render_acquisition
    if anatomy == "auto":
        anatomy = "atlas" if atlas_available() else "phantom"
    tpl, t_load = _timed(template, anatomy)
    # warm-up: first call builds caches (packed template, centroids)
    generate_subject(seed + 10_000, anatomy=anatomy, resolution=resolution, n_sessions=1)
    times, cpu, n_acq, voxels = [], [], 0, []
    for i in range(n):
        c0 = time.process_time()
        s, t = _timed(generate_subject, seed + i, anatomy=anatomy, resolution=resolution, n_sessions=sessions)
        cpu.append(time.process_time() - c0)
        times.append(t)
        n_acq += sum(len(x.acquisitions) for x in s.sessions)
        voxels.append(int(np.prod(s.sessions[0].anatomy.shape)))
    # stage breakdown on fresh draws
    rng = np.random.default_rng(seed)
    t_warp, t_les, t_img = [], [], {}
    for i in range(max(2, min(n, 4))):
        tf = deform.random_transform(rng, midline_x=tpl.midline_x)
        anat, t = _timed(deform.warp, tpl, tf, resolution, thickness={})
        t_warp.append(t)
        les, t = _timed(les_mod.sample_lesions, anat, rng, 2)
        t_les.append(t)
        for acq in ("t1w", "flair", "dwi", "ct"):
            g = geometry.sample_geometry(acq, rng, min_spacing=resolution)
            _, t = _timed(render_acquisition, anat, les, geometry.ACQUISITIONS[acq].contrast, g, rng)
            t_img.setdefault(acq, []).append(t)
    total = float(np.sum(times))
    return {
        "anatomy": anatomy, "resolution_mm": resolution, "subjects": n, "acquisitions": n_acq,
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
        "template_load_s": t_load, "working_grid_voxels_mean": float(np.mean(voxels)),
        "subject_s_mean": total / n, "subject_s_max": float(np.max(times)),
        "subject_cpu_s_mean": float(np.mean(cpu)), "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "subjects_per_s": n / total, "acquisitions_per_s": n_acq / total, "acquisitions_per_subject": n_acq / n,
        "warp_s_mean": float(np.mean(t_warp)), "lesions2_s_mean": float(np.mean(t_les)),
        "image_s_mean": {k: float(np.mean(v)) for k, v in t_img.items()},
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``voxelprompt bench synth``; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    r = run(args.n, args.anatomy, args.resolution, args.sessions, args.seed)
    rows = [
        ("anatomy", r["anatomy"]), ("working resolution", f"{r['resolution_mm']:g} mm"),
        ("working grid (mean voxels)", f"{r['working_grid_voxels_mean'] / 1e6:.2f} M"),
        ("torch threads / CPUs", f"{r['torch_threads']} / {r['cpu_count']}"),
        ("template load (once)", f"{r['template_load_s']:.2f} s"),
        ("anatomy warp", f"{r['warp_s_mean'] * 1000:.0f} ms"),
        ("2 lesions", f"{r['lesions2_s_mean'] * 1000:.0f} ms"),
        *[(f"image {k}", f"{v * 1000:.0f} ms") for k, v in r["image_s_mean"].items()],
        ("acquisitions / subject", f"{r['acquisitions_per_subject']:.1f}"),
        ("subject (mean / max)", f"{r['subject_s_mean']:.2f} / {r['subject_s_max']:.2f} s"),
        ("subject CPU time (mean)", f"{r['subject_cpu_s_mean']:.2f} s"),
        ("load average (1 min)", f"{r['load_average']:.1f}" if r["load_average"] is not None else "n/a"),
        ("subjects / s", f"{r['subjects_per_s']:.2f}"),
        ("acquisitions / s", f"{r['acquisitions_per_s']:.2f}"),
    ]
    w = max(len(k) for k, _ in rows)
    print(f"synth benchmark ({r['subjects']} subjects)")
    for k, v in rows:
        print(f"  {k:<{w}}  {v}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
