"""Learning curves from a training run's ``metrics.jsonl``.

``python -m voxelprompt.plots LOG [LOG ...] OUT.png``: three panels against training examples
seen: code-token cross-entropy (training, moving average, and validation; for a vision stage,
which has none, the anatomy heads' training CE), soft-Dice loss (same),
and the learning rate. Several logs are stages of one model (e.g. a ``joint`` run, then an ``lm``
stage started from its weights with ``--init``, then ``joint`` again): they are laid end to end on
the examples axis, with a dashed line at each stage boundary.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def read_log(path: str | Path) -> tuple[list[dict], list[dict]]:
    """``(train records, validation records)`` of a metrics log (later lines win on repeated steps)."""
    train, val = {}, {}
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        (val if r.get("kind") == "val" else train)[r["step"]] = r
    return [train[k] for k in sorted(train)], [val[k] for k in sorted(val)]


def _smooth(y: np.ndarray, k: int) -> np.ndarray:
    if len(y) < 2 or k <= 1:
        return y
    k = min(k, len(y))
    c = np.cumsum(np.insert(y, 0, 0.0))
    out = np.empty_like(y)
    for i in range(len(y)):
        lo = max(0, i - k + 1)
        out[i] = (c[i + 1] - c[lo]) / (i + 1 - lo)
    return out


def _stages(logs):
    """Train and validation records of each log, with ``x`` = examples seen over all stages so far."""
    stages, offset = [], 0
    for log in logs:
        train, val = read_log(log)
        if not train:
            raise ValueError(f"{log}: no training records")
        base = offset - (train[0]["examples"] - _per_step(train))   # an --init stage restarts its counter
        for r in train + val:
            r["x"] = base + r.get("examples", 0)
        stages.append((Path(log), train, val))
        offset = train[-1]["x"]
    return stages


def stage_name(log: Path) -> str:
    """``run`` for ``run/metrics.jsonl``, ``2-lm-v2`` for ``2-lm-v2.metrics.jsonl``."""
    return log.parent.name if log.name == "metrics.jsonl" else log.name.split(".")[0]


def _per_step(train: list[dict]) -> int:
    return train[0]["examples"] if train[0]["step"] == 1 else 0


def plot(logs, out: str | Path, title: str | None = None) -> Path:
    """Renders the learning curves of one log (a path) or of consecutive stages (a list of paths)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = [logs] if isinstance(logs, (str, Path)) else list(logs)
    stages = _stages(logs)
    fig, ax = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    hours, anat_labelled, adice_labelled = 0.0, False, False
    for si, (log, train, val) in enumerate(stages):
        x = np.array([r["x"] for r in train], float)
        # a vision stage (the language model frozen) has no code-token CE: tokens == 0
        ce = np.array([np.nan if r.get("tokens", 1) == 0 else r["ce"] for r in train], float)
        ac = np.array([np.nan if r.get("anatomy_ce") is None else r["anatomy_ce"] for r in train], float)
        dl = np.array([np.nan if r.get("dice_loss") is None else r["dice_loss"] for r in train], float)
        ad = np.array([np.nan if r.get("anatomy_dice") is None else r["anatomy_dice"] for r in train], float)
        lr = np.array([r["lr"] for r in train], float)
        k = max(1, len(train) // 50)
        first = si == 0
        if (~np.isnan(ce)).any():
            ax[0].plot(x, ce, color="0.8", lw=0.6, label="train (per step)" if first else None)
            ax[0].plot(x, _smooth(ce, k), color="C0", label="train (moving mean)" if first else None)
        if (~np.isnan(ac)).any():
            ax[0].plot(x[~np.isnan(ac)], _smooth(ac[~np.isnan(ac)], k), color="C1",
                       label="anatomy-head CE (train)" if not anat_labelled else None)
            anat_labelled = True
        vx = [v["x"] for v in val]
        if val:
            ax[0].plot(vx, [v["ce"] for v in val], "o-", color="C3", ms=3, label="validation" if first else None)
        ok = ~np.isnan(dl)
        if ok.any():
            ax[1].plot(x[ok], dl[ok], color="0.8", lw=0.6)
            ax[1].plot(x[ok], _smooth(dl[ok], k), color="C0", label="train" if first else None)
        if (~np.isnan(ad)).any():
            ax[1].plot(x[~np.isnan(ad)], _smooth(ad[~np.isnan(ad)], k), color="C1",
                       label="anatomy-head soft Dice (train)" if not adice_labelled else None)
            adice_labelled = True
        vd = [(a, v["dice_loss"]) for a, v in zip(vx, val) if v.get("dice_loss") is not None
              and np.isfinite(v["dice_loss"])]
        if vd:
            ax[1].plot(*zip(*vd), "o-", color="C3", ms=3, label="validation" if first else None)
        ax[2].plot(x, lr, color="C2")
        if si > 0:
            for a in ax:
                a.axvline(x[0], color="0.5", ls="--", lw=0.8)
        ax[0].text(x[0], 1.0 - 0.06 * (si % 2), f" {stage_name(log)}", transform=ax[0].get_xaxis_transform(), va="top",
                   fontsize=8, color="0.3")
        hours += train[-1].get("wall_s", 0) / 3600
    ax[0].set_ylabel("cross-entropy (nats)")
    ax[0].set_yscale("log")
    ax[0].legend(loc="lower left")
    ax[1].set_ylabel("soft-Dice loss (1 − Dice)")
    ax[1].set_ylim(0, 1.02)
    if ax[1].get_legend_handles_labels()[0]:
        ax[1].legend(loc="lower left")
    ax[2].set_ylabel("learning rate")
    ax[2].set_yscale("log")
    ax[2].set_xlabel("training examples seen")
    ex = int(stages[-1][1][-1]["x"])
    names = [stage_name(log) for log, _, _ in stages]
    name = " + ".join(names) if len(names) <= 3 else f"{names[0]} … {names[-1]} ({len(names)} stages)"
    fig.suptitle(title or f"{name}: {ex} examples, {hours:.2f} h")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        print("usage: python -m voxelprompt.plots METRICS.jsonl [METRICS.jsonl ...] OUT.png", file=sys.stderr)
        return 2
    print(plot(argv[:-1], argv[-1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
