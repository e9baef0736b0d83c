"""``voxelprompt eval threshold``: the mask threshold of a checkpoint, chosen on validation subjects.

The vision network outputs a probability per voxel; a mask is the voxels above
``VisionConfig.mask_threshold`` (0.5 until calibrated). A network trained with soft Dice + BCE on
sparse targets is not calibrated at 0.5, least of all early in training, so the threshold is
chosen the way nnU-Net-style pipelines choose post-processing: on held-out validation subjects
(the training validation seeds, never the evaluation ones), with the ground-truth programs
(teacher forcing: φ from the truth's ``<MOD>`` s), maximising the mean score over segment calls
where a present target scores its Dice and an absent target (a prompted lesion that is not
there) scores 1 if the mask is empty, else 0, so a lower threshold cannot buy Dice with
hallucinated masks. ``--write`` stores the threshold (and the table) in the checkpoint's JSON;
the agent, the kernel and every evaluation read it from there.

Usage::

    voxelprompt eval threshold --checkpoint RUN/ckpt/model.safetensors [--subjects 8] [--write] [--sources]

``--sources`` also scores each part of a mask alone (``VisionNet.mask_source``: the free channel,
the φ-selected anatomy classes), each at its own best threshold: which part a mask's Dice comes
from, and whether the other only adds false positives. It does not change what ``--write`` stores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

#: validation subjects for calibration: next to train.VAL_SEED_BASE's, not the evaluation seeds
CALIBRATION_SEED_BASE = 900_500_000
GRID = tuple(round(t, 2) for t in np.arange(0.05, 0.951, 0.05))


@torch.no_grad()
def collect(model, n_subjects: int = 8, examples_per_subject: int = 8, resolution: float | None = None):
    """``(probability map, truth, absent, kind)`` for every segment call of the validation examples.

    ``kind`` is ``"lesion"``, ``"anatomy"`` or ``"absent"`` (from the call's ROI).
    """
    from .datagen import DataConfig, examples_from_subject
    from .sequence import build_sequence
    from .tokenizer import Tokenizer

    tok = Tokenizer()
    res = resolution or model.config.vision.min_spacing or 2.0
    cfg = DataConfig(resolution=res, examples_per_subject=examples_per_subject, max_acquisitions=2,
                     rich_max_acquisitions=2)
    model.eval()
    out = []
    for i in range(n_subjects):
        for ex in examples_from_subject(CALIBRATION_SEED_BASE + i, cfg):
            seq = build_sequence(ex, tok)
            dev = model.vision.device
            h = model.lm(model.lm.embed(seq.ids.to(dev))[None])[0]
            for call, p, t in model.segment_predictions(seq, h, seq.mod_positions.to(dev)):
                absent = call.roi.startswith("absent:")
                kind = "absent" if absent else "lesion" if call.roi.startswith("lesion:") else "anatomy"
                out.append((p.float().cpu(), (t > 0.5).cpu(), absent, kind))
    return out


def score(calls, threshold: float) -> dict:
    """Mean score over calls (Dice of present targets, 1/0 for empty/non-empty on absent ones).

    ``volume_ratio``: the median over present targets of mask volume / truth volume (> 1: the masks
    over-segment, < 1: they under-segment; Dice alone does not say which)."""
    dices, empties, by_kind, ratios = [], [], {}, []
    for p, t, absent, *kind in calls:
        m = p > threshold
        if absent or not t.any():
            empties.append(float(not m.any()))
            continue
        d = float(2 * (m & t).sum() / (m.sum() + t.sum()))
        dices.append(d)
        ratios.append(float(m.sum() / t.sum()))
        by_kind.setdefault(kind[0] if kind else "present", []).append(d)
    all_ = dices + empties
    mean = lambda v: float(np.mean(v)) if v else None  # noqa: E731
    return {"threshold": threshold, "score": mean(all_) or 0.0, "dice": mean(dices),
            "empty_when_absent": mean(empties), "volume_ratio": float(np.median(ratios)) if ratios else None,
            "n_present": len(dices), "n_absent": len(empties),
            "dice_by_kind": {k: mean(v) for k, v in sorted(by_kind.items())}}


def calibrate(model, n_subjects: int = 8, grid=GRID, resolution: float | None = None,
              sources: bool = False) -> dict:
    """The threshold on ``grid`` with the best validation score, and the whole table.

    ``resolution``: the synthesis grid (default: the model's working-resolution floor).
    ``sources``: also each mask part alone at its best threshold (``result["sources"]``:
    ``{"free": row, "selection": row}``, rows as in the table; needs anatomy heads).
    """
    t0 = time.time()
    calls = collect(model, n_subjects, resolution=resolution)
    if not calls:
        raise ValueError("no segment calls in the calibration subjects")
    table = [score(calls, t) for t in grid]
    best = max(table, key=lambda r: (r["score"], -abs(r["threshold"] - 0.5)))   # ties: nearest 0.5
    out = {"threshold": best["threshold"], "best": best, "at_0.5": score(calls, 0.5), "table": table,
           "subjects": n_subjects, "seed_base": CALIBRATION_SEED_BASE, "calls": len(calls)}
    if sources:
        if model.vision.anatomy is None:
            raise ValueError("--sources needs a vision network with anatomy heads (a mask is the free channel alone)")
        out["sources"] = {}
        try:
            for src in ("free", "selection"):
                model.vision.mask_source = src
                part = collect(model, n_subjects, resolution=resolution)
                out["sources"][src] = max((score(part, t) for t in grid),
                                          key=lambda r: (r["score"], -abs(r["threshold"] - 0.5)))
        finally:
            model.vision.mask_source = "union"
    out["wall_s"] = round(time.time() - t0, 1)
    return out


def write_threshold(weights: str | Path, result: dict) -> Path:
    """Stores the threshold in the checkpoint's JSON config (``config.vision.mask_threshold``)."""
    import os

    from .checkpoint import config_path
    cj = config_path(weights)
    if not cj.exists():
        raise FileNotFoundError(f"{cj} not found: the threshold is stored in the checkpoint's JSON config")
    meta = json.loads(cj.read_text())
    meta["config"]["vision"]["mask_threshold"] = result["threshold"]
    meta["threshold_calibration"] = {k: v for k, v in result.items() if k != "table"}
    tmp = cj.with_name(cj.name + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, cj)
    return cj


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="voxelprompt eval threshold", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a .safetensors file (its .json is updated with --write)")
    p.add_argument("--subjects", type=int, default=8, help="validation subjects (8 examples each)")
    p.add_argument("--write", action="store_true", help="store the chosen threshold in the checkpoint's JSON")
    p.add_argument("--sources", action="store_true",
                   help="also score the free channel and the selected anatomy classes alone")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from .checkpoint import load_model
    try:
        model = load_model(args.checkpoint)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        res = calibrate(model, args.subjects, sources=args.sources)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.write:
        res["written_to"] = str(write_threshold(args.checkpoint, res))
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"calibration: {res['calls']} segment calls from {res['subjects']} validation subjects ({res['wall_s']} s)")
    kinds = sorted({k for r in res["table"] for k in r["dice_by_kind"]})
    f = lambda v, w: "n/a".rjust(w) if v is None else f"{v:{w}.3f}"  # noqa: E731
    print(f"  {'threshold':>9s} {'score':>6s} {'Dice':>6s} " + " ".join(f"{k:>8s}" for k in kinds)
          + f" {'empty|absent':>12s} {'vol×':>6s}")
    for r in res["table"]:
        mark = "  <- chosen" if r["threshold"] == res["threshold"] else ""
        print(f"  {r['threshold']:9.2f} {r['score']:6.3f} {f(r['dice'], 6)} "
              + " ".join(f(r["dice_by_kind"].get(k), 8) for k in kinds) + f" {f(r['empty_when_absent'], 12)} {f(r['volume_ratio'], 6)}{mark}")
    for src, r in res.get("sources", {}).items():
        print(f"  {src + ' alone':>15s}: score {r['score']:.3f} at threshold {r['threshold']:.2f} ("
              + ", ".join(f"{k} {f(v, 0)}" for k, v in r["dice_by_kind"].items())
              + f"; empty|absent {f(r['empty_when_absent'], 0)}; volume × {f(r['volume_ratio'], 0)})")
    if args.write:
        print(f"written to {res['written_to']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
