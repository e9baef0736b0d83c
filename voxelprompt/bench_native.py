"""``voxelprompt bench native-vs-iso``: the native-resolution efficiency experiment (seeds/004 §4.2, C.4).

Sessions of n acquisitions (n in ``--inputs``, default 1 3 5) are drawn from the Table 2 geometry
distribution (``synth.geometry.ACQUISITIONS`` rows that cite Table 2; field of view
155 x 190 x 165 mm ± 15 mm, spacings per acquisition type, clamped at 0.8 mm, oblique grids
half the time) and filled with Gaussian noise. The vision network (random weights, no
working-resolution floor: ``min_spacing=None``) is run

- **native**: every volume on its own grid, as VoxelPrompt does;
- **iso**: every volume conformed to 1 mm isotropic first (same axes and field of view,
  ``round(extent / 1 mm)`` voxels per axis; the conforming itself is not timed).

For each sample and mode a fresh child process measures the inference time (``no_grad``
forward), the peak memory of inference and the peak memory of one training step (forward,
soft-Dice loss against a random mask, backward, Adam step). Each child first runs the network
once (inference and a training step) on 12³-voxel grids with the inputs' orientations, so that
one-time costs (kernel code paged in, thread pools, allocator set-up) are in neither the times
nor the peaks. On CPU, peak memory is the child's RSS high-water mark (``VmHWM``, reset before
each measurement; ``getrusage`` where it cannot be reset) above its RSS before the inputs were
made; on CUDA it is ``torch.cuda.max_memory_allocated`` above the weights.

Defaults are sized to finish in a few minutes on two busy CPU cores: the ``paper`` vision
network (six levels, 32/96 channels) with the field of view scaled by ``--fov-scale 0.3``
(voxel counts x 0.027 for both modes, so the native:iso voxel ratio, which drives the cost ratio,
is that of full-size heads; at ``--fov-scale 1`` one 1 mm head takes ~45 s and 7 GB on one core,
and five take more memory than this machine has). Training-step memory is skipped when its
estimate (from the measured bytes per voxel) exceeds ``--mem-budget-gb``, and reported as such,
as the paper reports out-of-memory batches.

Example::

    voxelprompt bench native-vs-iso --samples 3 --inputs 1 3 5 --json native.json
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time

import numpy as np


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="voxelprompt bench native-vs-iso", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="paper", help="model config whose vision network is measured "
                   "(default paper; its min_spacing floor is removed)")
    p.add_argument("--samples", type=int, default=2, help="sessions per number of inputs (default 2)")
    p.add_argument("--inputs", type=int, nargs="+", default=[1, 3, 5], help="numbers of inputs (default 1 3 5)")
    p.add_argument("--fov-scale", type=float, default=0.3,
                   help="scale of the field of view and its deviation (default 0.3; 1 = real heads)")
    p.add_argument("--no-train", action="store_true", help="skip the training-step measurement")
    p.add_argument("--mem-budget-gb", type=float, default=8.0,
                   help="skip a training step whose estimated peak exceeds this (default 8)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads in each child (default 1: on a small shared machine more threads "
                   "oversubscribe the cores; 0 = torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_path", default=None, help="also write the results as JSON here")
    return p


def table2_acquisitions() -> list[str]:
    from synth.geometry import ACQUISITIONS
    return [k for k, s in ACQUISITIONS.items() if s.table2]


def sample_session(n: int, rng: np.random.Generator, fov_scale: float = 1.0) -> list[dict]:
    """n acquisition grids ``{"acquisition", "shape", "affine", "spacing"}`` of one session.

    The field of view, its deviation and the random shift of its centre all scale with
    ``fov_scale``, so a scaled session is a scaled copy of a full-size one.
    """
    from synth.geometry import FOV_DEVIATION_MM, FOV_MM, sample_geometry
    acqs = table2_acquisitions()
    shift = inspect.signature(sample_geometry).parameters["shift_mm"].default * fov_scale
    out = []
    for _ in range(n):
        a = acqs[int(rng.integers(len(acqs)))]
        g = sample_geometry(a, rng, fov_mm=tuple(f * fov_scale for f in FOV_MM),
                            fov_deviation=FOV_DEVIATION_MM * fov_scale, shift_mm=shift)
        out.append({"acquisition": a, "shape": list(g.shape), "affine": np.asarray(g.affine).tolist(),
                    "spacing": list(g.spacing)})
    return out


def iso_grid(shape, affine, spacing: float = 1.0):
    """The 1 mm isotropic grid conforming a volume: same axes, same field of view."""
    a = np.asarray(affine, dtype=np.float64)
    sp = np.linalg.norm(a[:3, :3], axis=0)
    new_shape = [max(1, int(round(n * s / spacing))) for n, s in zip(shape, sp)]
    out = a.copy()
    out[:3, :3] = a[:3, :3] / sp * spacing
    # keep the field of view's first corner: old voxel -0.5 edge == new voxel -0.5 edge
    out[:3, 3] = a[:3, 3] + a[:3, :3] @ np.full(3, -0.5) - out[:3, :3] @ np.full(3, -0.5)
    return new_shape, out.tolist()


def _rss_now_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    """The RSS high-water mark: ``VmHWM`` (resettable, see :func:`_reset_peak_rss`), else ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) * (1 if sys.platform == "darwin" else 1024)


def _reset_peak_rss() -> bool:
    """Resets the RSS high-water mark to the current RSS (Linux ≥ 4.0); False where impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _warm_up(net, grids, phi_dim: int, device, train: bool) -> None:
    """One inference (and training step) on 12³-voxel grids with the inputs' orientations, so that
    the code and one-time state of every kernel the measurement uses are in memory before it."""
    import torch

    from voxel_lib import Volume

    vols = []
    for _, aff in grids:
        a = torch.tensor(aff, dtype=torch.float64)
        vols.append(Volume(torch.rand(1, 12, 12, 12, device=device), a, "image"))
    phi = torch.randn(len(vols), phi_dim, device=device)
    with torch.no_grad():
        net(vols, phi)
    if train:
        net.train()
        sum(m.mean() for m in net(vols, phi)).backward()
        net.zero_grad(set_to_none=True)
        net.eval()
    del vols, phi
    try:                      # hand the warm-up's freed heap back, so that it is not reused unseen
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _measure(job: dict) -> dict:
    """Child: builds the vision net, makes the inputs, times inference, then one training step."""
    import torch

    from voxel_lib import Volume

    from .configs import get_config
    from .model import VisionNet, soft_dice_loss
    from dataclasses import replace

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    dev = torch.device(job["device"])
    cuda = dev.type == "cuda"
    cfg = get_config(job["config"])
    torch.manual_seed(job["seed"])
    net = VisionNet(replace(cfg.vision, min_spacing=None), cfg.lm.hidden, cfg.lm.phi_dim).to(dev).eval()
    _warm_up(net, job["grids"], cfg.lm.phi_dim, dev, job["train"])
    g = torch.Generator().manual_seed(job["seed"])
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_now_bytes()
        _reset_peak_rss()
    vols = []
    for shp, aff in job["grids"]:
        x = torch.randn(1, *shp, generator=g)
        vols.append(Volume(x.to(dev), torch.tensor(aff, dtype=torch.float64), "image"))
    voxels = sum(math.prod(v.shape) for v in vols)
    phi = torch.randn(len(vols), cfg.lm.phi_dim, generator=g).to(dev)
    res = {"voxels": voxels}
    # where the work is: voxels convolved per level (all inputs) and voxels of the shared grids
    # on which the inputs interact (levels below the top), from the network's own plan
    plan = net._plan([tuple(v.shape) for v in vols], [v.affine.to(torch.float64) for v in vols])
    res["conv_voxels"] = sum(math.prod(s) for lv in plan for s in lv.shapes)
    res["shared_voxels"] = sum(math.prod(lv.shared_shape) * len(vols) for lv in plan[1:])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    with torch.no_grad():
        out = net(vols, phi)
    if cuda:
        torch.cuda.synchronize()
    res["infer_s"] = time.perf_counter() - t
    del out
    res["infer_peak_bytes"] = (torch.cuda.max_memory_allocated() if cuda else _peak_rss_bytes()) - base
    if job["train"]:
        net.train()
        opt = torch.optim.Adam(net.parameters(), lr=1e-4)
        targets = [(torch.rand(v.shape, generator=g) > 0.9).float().to(dev) for v in vols]
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            _reset_peak_rss()     # where supported, the training peak is measured on its own
        t = time.perf_counter()
        masks = net(vols, phi)
        loss = torch.stack([soft_dice_loss(m, tg) for m, tg in zip(masks, targets)]).mean()
        loss.backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        res["train_s"] = time.perf_counter() - t
        res["train_peak_bytes"] = (torch.cuda.max_memory_allocated() if cuda else _peak_rss_bytes()) - base
    return res


def _child(job, conn):
    try:
        conn.send(("ok", _measure(job)))
    except BaseException as exc:  # noqa: BLE001 - reported as a result (e.g. out of memory)
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


_CTX = None


def _context():
    """A forkserver context whose server has imported torch and the model once: each child is a
    fresh fork of a process that has run no torch computation (no inherited peaks or thread pools)."""
    global _CTX
    if _CTX is None:
        try:
            _CTX = mp.get_context("forkserver")
            _CTX.set_forkserver_preload(["torch", "voxel_lib", "voxelprompt.model"])
        except ValueError:
            _CTX = mp.get_context("spawn")
    return _CTX


def measure(job: dict) -> dict:
    """Runs one measurement in a fresh process so peaks do not contaminate each other."""
    ctx = _context()
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(job, send))
    p.start()
    send.close()
    try:
        status, payload = recv.recv()
    except EOFError:
        status, payload = "error", "child died (out of memory?)"
    p.join()
    if status != "ok":
        return {"error": payload}
    return payload


def _ratio(a, b):
    return a / b if a and b else None


def run(config: str = "paper", samples: int = 2, inputs=(1, 3, 5), fov_scale: float = 0.3,
        train: bool = True, mem_budget_gb: float = 8.0, device: str = "cpu", threads: int = 1,
        seed: int = 0, progress: bool = True) -> dict:
    """Runs the experiment; returns per-sample measurements and per-n summaries."""
    rng = np.random.default_rng(seed)
    budget = mem_budget_gb * 2**30
    per_voxel = {"native": [], "iso": []}     # training bytes per input voxel, for the skip estimate
    rows = []
    t0 = time.perf_counter()
    for n in inputs:
        for s in range(samples):
            sess = sample_session(n, rng, fov_scale)
            grids = {"native": [(g["shape"], g["affine"]) for g in sess],
                     "iso": [iso_grid(g["shape"], g["affine"]) for g in sess]}
            row = {"n": n, "sample": s, "acquisitions": [g["acquisition"] for g in sess],
                   "native_shapes": [g["shape"] for g in sess],
                   "native_spacings": [[round(x, 3) for x in g["spacing"]] for g in sess]}
            for mode in ("native", "iso"):
                vox = sum(math.prod(sh) for sh, _ in grids[mode])
                do_train = train
                if train and per_voxel[mode]:
                    est = max(per_voxel[mode]) * vox
                    if est > budget:
                        do_train = False
                        row[f"{mode}_train_skipped"] = f"estimated {est / 2**30:.1f} GB > budget {mem_budget_gb:g} GB"
                r = measure({"config": config, "grids": grids[mode], "train": do_train, "device": device,
                             "threads": threads, "seed": seed * 1000 + n * 10 + s})
                for k, v in r.items():
                    row[f"{mode}_{k}"] = v
                if "train_peak_bytes" in r:
                    per_voxel[mode].append(r["train_peak_bytes"] / max(1, r["voxels"]))
            rows.append(row)
            if progress:
                print(f"  n={n} sample {s}: native {row.get('native_infer_s', float('nan')):.2f} s, "
                      f"iso {row.get('iso_infer_s', float('nan')):.2f} s "
                      f"({time.perf_counter() - t0:.0f} s elapsed)", file=sys.stderr, flush=True)
    return {"config": config, "fov_scale": fov_scale, "device": device, "samples": samples, "threads": threads,
            "inputs": list(inputs), "seed": seed, "rows": rows, "summary": summarize(rows, inputs),
            "wall_s": time.perf_counter() - t0, "machine": machine()}


def _mean(v):
    v = [x for x in v if x is not None]
    return statistics.fmean(v) if v else None


def summarize(rows: list[dict], inputs) -> dict:
    """Per n: means over samples of each quantity and the iso/native ratios (ratio of means, and
    the mean of per-sample ratios), plus the same over all n ("all")."""
    keys = ("voxels", "conv_voxels", "shared_voxels", "infer_s", "infer_peak_bytes", "train_s", "train_peak_bytes")
    out = {}
    groups = {str(n): [r for r in rows if r["n"] == n] for n in inputs}
    groups["all"] = rows
    for name, rs in groups.items():
        d = {"samples": len(rs)}
        for k in keys:
            for mode in ("native", "iso"):
                d[f"{mode}_{k}"] = _mean([r.get(f"{mode}_{k}") for r in rs])
            d[f"ratio_{k}"] = _ratio(d[f"iso_{k}"], d[f"native_{k}"])
            per = [_ratio(r.get(f"iso_{k}"), r.get(f"native_{k}")) for r in rs]
            d[f"mean_sample_ratio_{k}"] = _mean(per)
            d[f"n_{k}"] = sum(1 for r in rs if r.get(f"iso_{k}") is not None and r.get(f"native_{k}") is not None)
        d["errors"] = [r[k] for r in rs for k in r if k.endswith("_error")]
        d["train_skipped"] = sum(1 for r in rs for k in r if k.endswith("_train_skipped"))
        out[name] = d
    return out


def write_json(path, res: dict, default=float) -> None:
    """Writes a command's results as indented JSON (``default`` converts what json cannot) and says so."""
    from pathlib import Path
    Path(path).write_text(json.dumps(res, indent=2, default=default) + "\n")
    print(f"wrote {path}")


def machine() -> dict:
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(mem, 1) if mem else None,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None}


def _gb(b):
    return "-" if b is None else f"{b / 2**30:.2f}"


def _x(r):
    return "-" if r is None else f"{r:.2f}x"


def print_table(res: dict) -> None:
    print(f"native vs 1 mm isotropic: vision network of config {res['config']!r} (random weights, no floor), "
          f"field of view x{res['fov_scale']:g}, {res['samples']} samples per n, {res['device']}")
    print(f"{'n':>4} {'Mvox nat':>8} {'Mvox iso':>8} | {'infer nat':>9} {'iso':>7} {'ratio':>6} | "
          f"{'peak GB nat':>11} {'iso':>6} {'ratio':>6} | {'train GB nat':>12} {'iso':>6} {'ratio':>6}")
    for name, d in res["summary"].items():
        mv = lambda v: "-" if v is None else f"{v / 1e6:.2f}"  # noqa: E731
        ts = lambda v: "-" if v is None else f"{v:.2f}s"  # noqa: E731
        print(f"{name:>4} {mv(d['native_voxels']):>8} {mv(d['iso_voxels']):>8} | {ts(d['native_infer_s']):>9} "
              f"{ts(d['iso_infer_s']):>7} {_x(d['ratio_infer_s']):>6} | {_gb(d['native_infer_peak_bytes']):>11} "
              f"{_gb(d['iso_infer_peak_bytes']):>6} {_x(d['ratio_infer_peak_bytes']):>6} | "
              f"{_gb(d['native_train_peak_bytes']):>12} {_gb(d['iso_train_peak_bytes']):>6} "
              f"{_x(d['ratio_train_peak_bytes']):>6}")
        print(f"     voxels convolved (all levels) nat/iso {mv(d['native_conv_voxels'])}/{mv(d['iso_conv_voxels'])} M, "
              f"interaction-grid voxels x n nat/iso {mv(d['native_shared_voxels'])}/{mv(d['iso_shared_voxels'])} M")
        if d["train_skipped"]:
            print(f"     ({d['train_skipped']} training steps skipped: estimated peak over the memory budget)")
        for e in d["errors"][:3]:
            print(f"     error: {e}")
    print("ratios are iso / native of the means (time, peak memory above the pre-input baseline)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.samples < 1 or any(n < 1 for n in args.inputs):
        print("error: --samples and --inputs must be >= 1", file=sys.stderr)
        return 2
    if args.device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            print("error: --device cuda but CUDA is not available", file=sys.stderr)
            return 2
    from .configs import CONFIGS
    if args.config not in CONFIGS:
        print(f"error: unknown config {args.config!r}; known: {', '.join(CONFIGS)}", file=sys.stderr)
        return 2
    res = run(args.config, args.samples, args.inputs, args.fov_scale, not args.no_train, args.mem_budget_gb,
              args.device, args.threads, args.seed)
    print_table(res)
    if args.json_path:
        write_json(args.json_path, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
