"""Learning curves from a training run's ``metrics.jsonl``.

``python -m voxelprompt.plots LOG OUT.png``: three panels against optimizer steps: code-token
cross-entropy (training, moving average, and validation), soft-Dice loss (same), and the
learning rate; the top axis is wall-clock hours.
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


def plot(log: str | Path, out: str | Path, title: str | None = None) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = read_log(log)
    if not train:
        raise ValueError(f"{log}: no training records")
    steps = np.array([r["step"] for r in train], float)
    ce = np.array([r["ce"] for r in train], float)
    dl = np.array([np.nan if r.get("dice_loss") is None else r["dice_loss"] for r in train], float)
    lr = np.array([r["lr"] for r in train], float)
    k = max(1, len(train) // 50)
    fig, ax = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    ax[0].plot(steps, ce, color="0.8", lw=0.6, label="train (per step)")
    ax[0].plot(steps, _smooth(ce, k), color="C0", label=f"train (mean of {k})")
    if val:
        ax[0].plot([v["step"] for v in val], [v["ce"] for v in val], "o-", color="C3", label="validation")
    ax[0].set_ylabel("code-token CE (nats)")
    ax[0].set_yscale("log")
    ax[0].legend()
    ok = ~np.isnan(dl)
    ax[1].plot(steps[ok], dl[ok], color="0.8", lw=0.6)
    ax[1].plot(steps[ok], _smooth(dl[ok], k), color="C0", label="train")
    if val:
        ax[1].plot([v["step"] for v in val], [v["dice_loss"] for v in val], "o-", color="C3", label="validation")
    ax[1].set_ylabel("soft-Dice loss (1 − Dice)")
    ax[1].set_ylim(0, 1.02)
    ax[1].legend()
    ax[2].plot(steps, lr, color="C2")
    ax[2].set_ylabel("learning rate")
    ax[2].set_yscale("log")
    ax[2].set_xlabel("optimizer step")
    hours = train[-1].get("wall_s", 0) / 3600
    ex = train[-1].get("examples", 0)
    fig.suptitle(title or f"{Path(log).parent.name}: {int(steps[-1])} steps, {ex} examples, {hours:.2f} h")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m voxelprompt.plots METRICS.jsonl OUT.png", file=sys.stderr)
        return 2
    print(plot(argv[0], argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
