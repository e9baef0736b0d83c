"""Segmentation metrics in world units, and the statistics to compare them.

Dice, IoU, HD95 (mm) and normalised surface Dice (NSD, tolerance in mm) for binary masks and
label maps. When the prediction and the truth are on different grids, the prediction is
resampled onto the truth's grid in world space (nearest neighbour) first.

Conventions for empty masks: two empty masks agree perfectly (Dice = IoU = NSD = 1,
HD95 = 0); one empty and one not gives Dice = IoU = NSD = 0 and HD95 = inf.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np
import scipy.ndimage as ndi
import scipy.stats as st

from .quantity import Quantity
from .volume import Volume


def _pair(pred: Volume, truth: Volume, label: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not pred.same_grid(truth):
        pred = pred.resample_like(truth, mode="nearest")
    p = pred.tensor[0].detach().cpu().numpy()
    t = truth.tensor[0].detach().cpu().numpy()
    if label is None:
        pb = p > 0.5 if p.dtype.kind == "f" else p != 0
        tb = t > 0.5 if t.dtype.kind == "f" else t != 0
    else:
        pb, tb = p == label, t == label
    return pb, tb, np.asarray(truth.spacing)


def _dice(pb, tb) -> float:
    s = pb.sum() + tb.sum()
    return 1.0 if s == 0 else float(2.0 * (pb & tb).sum() / s)


def _iou(pb, tb) -> float:
    u = (pb | tb).sum()
    return 1.0 if u == 0 else float((pb & tb).sum() / u)


def _surface(m: np.ndarray) -> np.ndarray:
    if not m.any():
        return m
    return m & ~ndi.binary_erosion(m, structure=ndi.generate_binary_structure(3, 1), border_value=0)


def _surface_distances(pb, tb, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each surface voxel of one mask to the other mask's surface, both ways."""
    # Work inside the union's bounding box (+1 voxel): every surface voxel lies in it, so the
    # distance transforms there are exact, and much cheaper than on the full grid.
    idx = np.argwhere(pb | tb)
    lo, hi = np.maximum(idx.min(0) - 1, 0), idx.max(0) + 2
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    pb, tb = pb[sl], tb[sl]
    sp_, st_ = _surface(pb), _surface(tb)
    d_to_t = ndi.distance_transform_edt(~st_, sampling=spacing)
    d_to_p = ndi.distance_transform_edt(~sp_, sampling=spacing)
    return d_to_t[sp_], d_to_p[st_]


def dice(pred: Volume, truth: Volume, label: int | None = None) -> float:
    """Dice overlap ``2|P∩T| / (|P| + |T|)`` of two masks (or of one label in two label maps)."""
    return _dice(*_pair(pred, truth, label)[:2])


def iou(pred: Volume, truth: Volume, label: int | None = None) -> float:
    """Intersection over union (Jaccard) ``|P∩T| / |P∪T|``."""
    return _iou(*_pair(pred, truth, label)[:2])


def hd95(pred: Volume, truth: Volume, label: int | None = None) -> Quantity:
    """95th percentile of the symmetric surface distances, in mm (inf if exactly one mask is empty)."""
    pb, tb, sp = _pair(pred, truth, label)
    if not pb.any() and not tb.any():
        return Quantity(0.0, "mm", "hd95")
    if not pb.any() or not tb.any():
        return Quantity(float("inf"), "mm", "hd95")
    a, b = _surface_distances(pb, tb, sp)
    return Quantity(float(np.percentile(np.concatenate([a, b]), 95)), "mm", "hd95")


def nsd(pred: Volume, truth: Volume, tolerance: float = 1.0, label: int | None = None) -> float:
    """Normalised surface Dice at ``tolerance`` mm: the share of both surfaces within tolerance of the other."""
    pb, tb, sp = _pair(pred, truth, label)
    if not pb.any() and not tb.any():
        return 1.0
    if not pb.any() or not tb.any():
        return 0.0
    a, b = _surface_distances(pb, tb, sp)
    return float(((a <= tolerance).sum() + (b <= tolerance).sum()) / (a.size + b.size))


def evaluate(pred: Volume, truth: Volume, labels: Iterable[int] | None = None, tolerance: float = 1.0) -> dict:
    """Dice, IoU, HD95 and NSD for a binary pair, or per label for label maps.

    Args:
        labels: labels to score; ``None`` scores a binary pair (non-zero = inside) when both
            maps hold at most one label, otherwise every label present in either map.

    Returns:
        ``{"dice", "iou", "hd95_mm", "nsd"}`` for a binary pair, or ``{label: {...}}``.
    """
    if not pred.same_grid(truth):
        pred = pred.resample_like(truth, mode="nearest")
    if labels is None:
        present = sorted(set(truth.labels()) | set(pred.labels())) if (truth.is_label and pred.is_label) else []
        if len(present) <= 1:
            return _scores(pred, truth, None, tolerance)
        labels = present
    return {int(lab): _scores(pred, truth, int(lab), tolerance) for lab in labels}


def _scores(pred, truth, label, tolerance) -> dict:
    return {"dice": dice(pred, truth, label), "iou": iou(pred, truth, label),
            "hd95_mm": float(hd95(pred, truth, label)), "nsd": nsd(pred, truth, tolerance, label)}


# ---------------------------------------------------------------- statistics
def bootstrap_ci(values: Sequence[float], statistic: Callable = np.mean, n: int = 2000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float, float]:
    """Percentile bootstrap confidence interval: ``(estimate, low, high)``."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n, x.size))
    stats = np.apply_along_axis(statistic, 1, x[idx])
    a = (1 - level) / 2
    return float(statistic(x)), float(np.quantile(stats, a)), float(np.quantile(stats, 1 - a))


def benjamini_hochberg(pvalues: Sequence[float]) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values), via ``scipy.stats.false_discovery_control``."""
    p = np.asarray(pvalues, dtype=np.float64)
    if p.size == 0:
        return p
    return st.false_discovery_control(p, method="bh")


def paired_wilcoxon(comparisons: dict[str, tuple[Sequence[float], Sequence[float]]]) -> dict:
    """Paired two-sided Wilcoxon signed-rank tests with Benjamini-Hochberg correction.

    Args:
        comparisons: ``{name: (a, b)}`` with paired samples ``a`` and ``b``.

    Returns:
        ``{name: {"n", "median_difference", "statistic", "p", "q"}}``; a pair whose differences
        are all zero gets p = 1.
    """
    rows, ps = {}, []
    for name, (a, b) in comparisons.items():
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        if a.shape != b.shape:
            raise ValueError(f"{name}: paired samples differ in length ({a.size} vs {b.size})")
        d = a - b
        if np.all(d == 0):
            stat, p = 0.0, 1.0
        else:
            res = st.wilcoxon(a, b, zero_method="wilcox", alternative="two-sided")
            stat, p = float(res.statistic), float(res.pvalue)
        rows[name] = {"n": int(a.size), "median_difference": float(np.median(d)), "statistic": stat, "p": p}
        ps.append(p)
    for (name, row), q in zip(rows.items(), benjamini_hochberg(ps)):
        row["q"] = float(q)
    return rows
