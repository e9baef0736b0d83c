"""The ``voxelprompt`` command line.

Subcommands: ``measure`` and ``metrics`` (voxel_lib on NIfTI files), ``synth`` (synthetic
datasets), ``bench`` (benchmarks). Bad input prints one clear error line (no traceback) and
exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import warnings


def _fmt3(v) -> str:
    return "(" + ", ".join(f"{float(x):.2f}" for x in v) + ")"


def _load_mask(path: str, label: int | None):
    import voxel_lib as vl
    vol = vl.load(path)
    if label is not None:
        if label not in vol.labels():
            raise vl.VolumeError(f"label {label} is not present (labels present: "
                                 f"{vol.labels()[:20]}{' ...' if len(vol.labels()) > 20 else ''})", path)
        return vol.select(label)
    return vol


def cmd_measure(args) -> int:
    """Morphometry of a mask (and intensity statistics in an image)."""
    import voxel_lib as vl
    mask = _load_mask(args.mask, args.label)
    if not mask.is_label and float(mask.tensor.max()) > 1.0:
        raise vl.VolumeError("this looks like an intensity image, not a mask (values above 1)", args.mask,
                             "pass a segmentation/label map, or use --label N")
    if float(vl.volume(mask)) == 0:
        raise vl.VolumeError("the mask is empty" + (f" for label {args.label}" if args.label is not None else ""),
                             args.mask)
    vol = vl.volume(mask)
    com = vl.center_of_mass(mask)
    box = vl.bounding_box(mask)
    out = {
        "mask": args.mask, "label": args.label,
        "volume": {"mm3": float(vol), "mL": float(vol.to("mL"))},
        "center_of_mass_ras_mm": [float(c) for c in com],
        "extent_mm": {k: float(v) for k, v in vl.extent(mask).items()},
        "bounding_box": box.as_dict(),
        "max_diameter_mm": float(vl.max_diameter(mask)),
        "components": vl.count_components(mask),
        "grid": {"shape": list(mask.shape), "spacing_mm": list(mask.spacing), "orientation": mask.orientation},
    }
    if args.image:
        img = vl.load(args.image)
        stats = vl.intensity_stats(img, mask, unit=args.unit)
        out["intensity"] = {k: (float(v) if k != "n_voxels" else v) for k, v in stats.items()}
        out["intensity"]["unit"] = args.unit
        out["image"] = args.image
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    lab = f" (label {args.label})" if args.label is not None else ""
    print(f"{args.mask}{lab}")
    print(f"  grid              {mask.shape} voxels, {_fmt3(mask.spacing)} mm, {mask.orientation}")
    print(f"  volume            {float(vol):.1f} mm³ = {float(vol.to('mL')):.3f} mL")
    print(f"  centre of mass    {_fmt3(com)} mm (world RAS)")
    e = out["extent_mm"]
    print(f"  extent            L-R {e['lr']:.1f} mm, A-P {e['ap']:.1f} mm, S-I {e['si']:.1f} mm")
    print(f"  bounding box      {_fmt3(box.min)} to {_fmt3(box.max)} mm (world RAS)")
    print(f"  max diameter      {out['max_diameter_mm']:.1f} mm")
    print(f"  components        {out['components']}")
    if args.image:
        s = out["intensity"]
        print(f"  intensity in {args.image} ({s['n_voxels']} voxels, {args.unit}):")
        print(f"    mean {s['mean']:.4g}  median {s['median']:.4g}  std {s['std']:.4g}  "
              f"p5 {s['p5']:.4g}  p95 {s['p95']:.4g}  min {s['min']:.4g}  max {s['max']:.4g}")
    return 0


def cmd_metrics(args) -> int:
    """Dice, IoU, HD95 and NSD between a prediction and a truth mask (grids may differ)."""
    import voxel_lib as vl
    pred = vl.load(args.pred)
    truth = vl.load(args.truth)
    if args.label is not None:
        if args.label not in truth.labels():
            raise vl.VolumeError(f"label {args.label} is not present in the truth", args.truth)
        pred, truth = pred.select(args.label), truth.select(args.label)
    res = vl.evaluate(pred, truth, tolerance=args.tolerance)
    per_label = not {"dice", "iou"} <= set(res)
    out = {"pred": args.pred, "truth": args.truth, "label": args.label, "tolerance_mm": args.tolerance,
           "resampled": not pred.same_grid(truth), ("per_label" if per_label else "scores"): res}
    if args.json:
        print(json.dumps(out, indent=2, default=float))
        return 0
    if out["resampled"]:
        print("note: the prediction was resampled onto the truth's grid (nearest neighbour, world space)")
    rows = res.items() if per_label else [("mask" if args.label is None else args.label, res)]
    print(f"{'label':>8} {'Dice':>7} {'IoU':>7} {'HD95 (mm)':>10} {f'NSD@{args.tolerance:g}mm':>11}")
    for k, r in rows:
        print(f"{str(k):>8} {r['dice']:7.4f} {r['iou']:7.4f} {r['hd95_mm']:10.2f} {r['nsd']:11.4f}")
    return 0


_BENCHES = {
    "voxel-lib": "voxel_lib.bench",
    "sandbox": "sandbox.bench",
    "synth": "synth.bench",
    "native-vs-iso": "voxelprompt.bench_native",
    "decode": "voxelprompt.bench_decode",
    "e2e": "voxelprompt.bench_e2e",
}


def cmd_bench(args) -> int:
    """Dispatches to a benchmark module's ``main(argv)``."""
    mod = importlib.import_module(_BENCHES[args.name])
    return int(mod.main(args.rest) or 0)


def cmd_synth(args) -> int:
    """Writes a synthetic BIDS dataset (see ``voxelprompt synth --help``)."""
    from synth.cli import main as synth_main
    return int(synth_main(args.rest) or 0)


def cmd_tasks(args) -> int:
    """The task catalog: sample, stats, check, corpus (see ``voxelprompt tasks --help``)."""
    from task_templates.cli import main as tasks_main
    return int(tasks_main(args.rest) or 0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="voxelprompt", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    m = sub.add_parser("measure", help="volume, centre of mass, extents, bounding box, components of a mask")
    m.add_argument("mask", help="mask or label map (NIfTI)")
    m.add_argument("--label", type=int, help="measure only this label of a label map")
    m.add_argument("--image", help="also report intensity statistics of this image inside the mask")
    m.add_argument("--unit", default="a.u.", help="intensity unit for --image (e.g. HU for CT)")
    m.add_argument("--json", action="store_true", help="print JSON")
    m.set_defaults(func=cmd_measure)

    q = sub.add_parser("metrics", help="Dice, IoU, HD95, NSD between two masks (grids may differ)")
    q.add_argument("pred", help="predicted mask or label map (NIfTI)")
    q.add_argument("truth", help="reference mask or label map (NIfTI)")
    q.add_argument("--label", type=int, help="score only this label")
    q.add_argument("--tolerance", type=float, default=1.0, help="NSD tolerance in mm (default 1)")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(func=cmd_metrics)

    s = sub.add_parser("synth", help="write a synthetic BIDS dataset", add_help=False)
    s.add_argument("rest", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_synth)

    t = sub.add_parser("tasks", help="the task catalog: sample, stats, check, corpus", add_help=False)
    t.add_argument("rest", nargs=argparse.REMAINDER)
    t.set_defaults(func=cmd_tasks)

    for name, helptext in (("train", "train the model (see voxelprompt train --help)"),
                           ("eval", "evaluate a checkpoint: synthetic | real (see voxelprompt eval --help)")):
        e = sub.add_parser(name, help=helptext, add_help=False)
        e.add_argument("rest", nargs=argparse.REMAINDER)
        e.set_defaults(func=lambda a, _m=_PASSTHROUGH[name]: int(importlib.import_module(_m).main(a.rest) or 0))

    b = sub.add_parser("bench", help="benchmarks: " + ", ".join(_BENCHES))
    b.add_argument("name", choices=sorted(_BENCHES))
    b.add_argument("rest", nargs=argparse.REMAINDER, help="options of that benchmark")
    b.set_defaults(func=cmd_bench)

    from .cli_agent import register   # ask, replay, serve, batch, demo
    register(sub)
    return p


#: subcommands with their own argument parsers: everything after the name goes to them
_PASSTHROUGH = {"synth": "synth.cli", "tasks": "task_templates.cli", "train": "voxelprompt.train",
                "eval": "voxelprompt.evaluate"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in _PASSTHROUGH:
        sub = argv[1:]
        if sub[:1] == ["--"]:
            sub = sub[1:]
        return int(importlib.import_module(_PASSTHROUGH[argv[0]]).main(sub) or 0)
    args = build_parser().parse_args(argv)
    from voxel_lib.errors import VolumeError
    warnings.simplefilter("default")
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"
    try:
        return int(args.func(args) or 0)
    except VolumeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
