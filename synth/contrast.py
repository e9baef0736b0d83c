"""Images from label maps: per-contrast tissue intensities with SynthSeg-style randomisation.

Each contrast has a table of nominal per-tissue means with the realistic relative ordering
(MR in arbitrary units >= 0, ADC in 1e-6 mm²/s, CT in Hounsfield units). :func:`synthesize`
perturbs the means (keeping every documented ordering, see ``ORDERINGS``), gives every label its
own mean (left/right and per-structure differences; deep grey matter sits between GM and WM;
iron darkens the pallidum and putamen on T2*/SWI), draws each voxel from its label's Gaussian
(a GMM, as in SynthSeg), and blurs the mean image slightly for partial volume.

Pipeline (done by ``synth.subject``): ``synthesize`` → ``synth.lesions.render`` →
``synth.artifacts.corrupt`` → resample to the acquisition grid → ``synth.artifacts.add_noise``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .artifacts import gaussian_blur
from .noise import normal

__all__ = ["CONTRASTS", "TISSUES", "NOMINAL", "ORDERINGS", "CT_RANGES", "synthesize", "sample_means", "tissue_index",
           "example_gallery"]

CONTRASTS = ("t1w", "t2w", "flair", "pd", "dwi", "adc", "gre", "swi", "t1c", "ct")

#: Tissue classes, as ``synth.anatomy.TISSUES`` (CONTRACT.md).
TISSUES = ("background", "wm", "gm", "deep_gm", "csf", "cerebellum_wm", "cerebellum_gm", "brainstem",
      "choroid", "vessel", "dura", "skull", "scalp", "fat")


def _table(*values) -> dict[str, float]:
    return dict(zip(TISSUES, (float(v) for v in values)))


#: Nominal per-tissue means. Columns follow ``synth.anatomy.TISSUES``:
#: background, wm, gm, deep_gm, csf, cerebellum_wm, cerebellum_gm, brainstem, choroid, vessel,
#: dura, skull, scalp, fat.
NOMINAL: dict[str, dict[str, float]] = {
    #                 bg   wm   gm  dgm  csf  cbw  cbg   bs  cho  ves  dur  sku  sca  fat
    "t1w":   _table(0, 110, 70, 85, 25, 105, 72, 95, 60, 65, 45, 12, 75, 150),
    "t2w":   _table(0, 55, 80, 70, 190, 58, 82, 62, 120, 15, 35, 10, 65, 120),
    "flair": _table(0, 75, 100, 88, 12, 78, 98, 82, 55, 15, 45, 8, 60, 110),
    "pd":    _table(0, 80, 100, 92, 112, 82, 100, 85, 100, 30, 50, 12, 85, 115),
    "dwi":   _table(0, 62, 72, 66, 14, 62, 72, 64, 25, 8, 12, 4, 10, 6),
    "adc":   _table(0, 720, 830, 760, 3000, 720, 820, 760, 2200, 1600, 600, 150, 900, 150),
    "gre":   _table(0, 72, 88, 72, 150, 74, 88, 74, 90, 20, 40, 6, 65, 85),
    "swi":   _table(0, 95, 82, 75, 125, 92, 82, 88, 75, 12, 45, 6, 60, 70),
    "t1c":   _table(0, 110, 70, 85, 25, 105, 72, 95, 150, 165, 85, 12, 75, 150),
    "ct":    _table(-1000, 28, 38, 36, 6, 30, 40, 32, 45, 45, 45, 1100, 40, -95),
}

#: Orderings kept under randomisation: (brighter, darker) tissue pairs per contrast.
ORDERINGS: dict[str, tuple[tuple[str, str], ...]] = {
    "t1w": (("fat", "wm"), ("wm", "gm"), ("gm", "csf"), ("wm", "deep_gm"), ("deep_gm", "gm"),
            ("scalp", "skull"), ("csf", "skull")),
    "t2w": (("csf", "gm"), ("gm", "wm"), ("gm", "deep_gm"), ("deep_gm", "wm"), ("wm", "vessel")),
    "flair": (("gm", "wm"), ("wm", "csf"), ("gm", "deep_gm"), ("deep_gm", "wm")),
    "pd": (("csf", "gm"), ("gm", "wm"), ("gm", "deep_gm"), ("deep_gm", "wm")),
    "dwi": (("gm", "wm"), ("wm", "csf")),
    "adc": (("csf", "gm"), ("gm", "wm")),
    "gre": (("csf", "gm"), ("gm", "wm"), ("wm", "vessel")),
    "swi": (("csf", "wm"), ("wm", "gm"), ("gm", "deep_gm"), ("deep_gm", "vessel")),
    "t1c": (("vessel", "wm"), ("choroid", "wm"), ("wm", "gm"), ("gm", "csf"), ("fat", "wm"),
            ("wm", "deep_gm"), ("deep_gm", "gm")),
    "ct": (("skull", "gm"), ("gm", "wm"), ("wm", "csf"), ("csf", "fat"), ("fat", "background")),
}

# Deep grey matter: position between GM (0) and WM (1) on the T1/T2-like contrasts, by name.
_WM_LIKENESS = {"Thalamus": 0.55, "Pallidum": 0.8, "Putamen": 0.2, "Caudate": 0.1, "Accumbens": 0.15,
                "VentralDC": 0.75, "Hippocampus": 0.0, "Amygdala": 0.05}
# Iron: extra darkening on T2-weighted / T2* contrasts, by name.
_IRON = {"t2w": {"Pallidum": 0.85},
         "gre": {"Pallidum": 0.6, "Putamen": 0.85},
         "swi": {"Pallidum": 0.5, "Putamen": 0.75, "Caudate": 0.85, "Thalamus": 0.92}}

_ENHANCING = ("vessel", "choroid", "dura")  # tissues that differ between T1w and T1c
_MIN_GAP = 0.05     # relative gap kept between ordered MR tissues
_MIN_GAP_HU = 3.0   # HU gap kept between ordered CT tissues


def _check_contrast(contrast: str) -> None:
    if contrast not in CONTRASTS:
        raise ValueError(f"unknown contrast {contrast!r}; choose one of {CONTRASTS}")


def _ordered(means: dict[str, float], contrast: str) -> bool:
    for a, b in ORDERINGS[contrast]:
        if contrast == "ct":
            if means[a] - means[b] < _MIN_GAP_HU:
                return False
        elif means[a] < means[b] * (1 + _MIN_GAP):
            return False
    return True


#: Realistic CT densities (HU) per tissue; randomised CT means are drawn uniformly from these.
CT_RANGES: dict[str, tuple[float, float]] = {
    "background": (-1000, -1000), "wm": (22, 32), "gm": (32, 44), "deep_gm": (30, 42), "csf": (2, 12),
    "cerebellum_wm": (24, 33), "cerebellum_gm": (33, 44), "brainstem": (26, 36), "choroid": (30, 60),
    "vessel": (38, 55), "dura": (35, 50), "skull": (700, 1500), "scalp": (30, 50), "fat": (-120, -80)}


def sample_means(contrast: str, rng: np.random.Generator | None = None) -> dict[str, float]:
    """Per-tissue means for one image: the nominal table perturbed, orderings kept.

    MR tissues are scaled by independent log-normal factors (sd 0.1, at most ±25 %); CT tissues
    are drawn uniformly from ``CT_RANGES``. Draws that break an ordering of ``ORDERINGS`` are
    redrawn. T1c takes exactly the T1w draws and sets vessels, choroid plexus and dura at their
    nominal ratio to WM, so T1w and T1c synthesized from generators in the same state differ only
    in enhancing tissue (a pre/post pair). With ``rng=None`` the nominal table is returned.
    """
    _check_contrast(contrast)
    nominal = NOMINAL[contrast]
    if rng is None:
        return dict(nominal)
    if contrast == "t1c":  # the T1w draws (a pre/post pair from one state matches), plus enhancement
        m = sample_means("t1w", rng)
        for t in _ENHANCING:
            m[t] = m["wm"] * nominal[t] / nominal["wm"]
        return m
    for _ in range(50):
        if contrast == "ct":
            m = {t: float(rng.uniform(*CT_RANGES[t])) for t in nominal}
        else:
            f = np.exp(np.clip(rng.normal(0, 0.1, len(nominal)), -0.25, 0.25))
            m = {t: v * float(k) for (t, v), k in zip(nominal.items(), f)}
        if _ordered(m, contrast):
            return m
    return dict(nominal)


def tissue_index(anatomy) -> tuple[np.ndarray, np.ndarray]:
    """The label array and a lookup table label id -> index into ``TISSUES`` (-1 if unknown)."""
    lab = np.asarray(anatomy.labels.numpy()[0])
    top = int(max(lab.max(initial=0), max(anatomy.tissue, default=0))) + 1
    lut = np.full(top, -1, dtype=np.int16)
    for i, t in anatomy.tissue.items():
        if t in TISSUES and 0 <= i < top:
            lut[i] = TISSUES.index(t)
    return lab, lut


def _label_means(anatomy, contrast: str, means: dict[str, float], rng, randomize: bool) -> dict[int, float]:
    """Mean of every label id: its tissue's mean, structure rules, small per-label jitter."""
    out = {}
    for i, t in anatomy.tissue.items():
        v = means.get(t, means["background"])
        name = anatomy.names.get(i, "")
        if t == "deep_gm":
            w = next((w for k, w in _WM_LIKENESS.items() if k in name), None)
            if w is not None and contrast not in ("swi",):
                v = means["gm"] + w * (means["wm"] - means["gm"])
            iron = next((f for k, f in _IRON.get(contrast, {}).items() if k in name), None)
            if iron is not None:
                v *= iron
        if randomize and t not in ("background",):
            if contrast == "ct":
                v += float(rng.normal(0, 0.5))
            else:
                v *= float(np.exp(rng.normal(0, 0.02)))
        out[int(i)] = v
    return out


def synthesize(anatomy, contrast: str, rng: np.random.Generator, *, randomize: bool = True) -> np.ndarray:
    """Synthesizes one image of ``contrast`` from the anatomy's label map (labels grid, float32).

    Args:
        anatomy: a ``synth.anatomy.Anatomy`` (labels, names, tissue).
        contrast: one of ``CONTRASTS``.
        rng: random generator.
        randomize: perturb tissue means, give each label its own mean and within-label spread
            (GMM), a random global gain (MR, not ADC) and partial-volume blur. ``False`` gives the
            nominal means and a fixed partial-volume blur, without noise.

    Returns:
        float32 array on the labels grid: MR in arbitrary units >= 0 (ADC in 1e-6 mm²/s), CT in HU.
    """
    _check_contrast(contrast)
    lab, lut = tissue_index(anatomy)
    means = sample_means(contrast, rng if randomize else None)
    lm = _label_means(anatomy, contrast, means, rng, randomize)
    top = lut.shape[0]
    mean_lut = np.full(top, means["background"], dtype=np.float32)
    for i, v in lm.items():
        if 0 <= i < top:
            mean_lut[i] = v
    img = mean_lut[lab]
    pv = float(rng.uniform(0.35, 0.75)) if randomize else 0.5
    img = gaussian_blur(img, pv)  # partial volume at tissue boundaries
    if randomize:
        sd_lut = np.zeros(top, dtype=np.float32)
        for i, t in anatomy.tissue.items():
            if not 0 <= i < top or t == "background":
                continue
            if contrast == "ct":
                sd_lut[i] = rng.uniform(80, 200) if t == "skull" else rng.uniform(1.0, 3.0)
            else:
                sd_lut[i] = abs(lm[int(i)]) * rng.uniform(0.01, 0.06)
        img += sd_lut[lab] * normal(lab.shape, rng)
        if contrast not in ("ct", "adc"):
            img *= np.float32(rng.uniform(0.6, 1.6))
    if contrast != "ct":
        np.clip(img, 0, None, out=img)
    return img.astype(np.float32, copy=False)


# ----------------------------------------------------------------------------- docs gallery
def _display_window(img: np.ndarray, contrast: str) -> tuple[float, float]:
    if contrast == "ct":
        return 0.0, 80.0  # brain window
    return 0.0, float(np.percentile(img, 99.5)) or 1.0


def example_gallery(anatomy, out_dir, *, seed: int = 0, contrasts: Sequence[str] = CONTRASTS,
                    corrupt: bool = True, lesions=None) -> dict[str, Path]:
    """Writes one PNG per contrast (axial, coronal, sagittal through the grid centre) and a montage.

    Args:
        anatomy: a ``synth.anatomy.Anatomy``.
        out_dir: output folder (created).
        seed: random seed (same seed, same pictures).
        contrasts: contrasts to draw.
        corrupt: apply ``synth.artifacts.corrupt`` and mild noise.
        lesions: optional ``synth.lesions.Lesion`` list painted into every contrast.

    Returns:
        ``{contrast: path}`` plus ``"montage": path`` (``contrast_<name>.png``, ``contrasts.png``).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import artifacts
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spacing = anatomy.labels.spacing
    images = {}
    for k, c in enumerate(contrasts):
        rng = np.random.default_rng([seed, k])
        img = synthesize(anatomy, c, rng)
        if lesions:
            from .lesions import render
            img = render(img, c, lesions, anatomy, rng)
        if corrupt:
            img = artifacts.corrupt(img, c, rng, spacing, strength=0.6)
            img = artifacts.add_noise(img, rng, 0.02, contrast=c)
        images[c] = img
    paths: dict[str, Path] = {}
    cx, cy, cz = (s // 2 for s in next(iter(images.values())).shape)

    def views(img):
        return [np.rot90(img[:, :, cz]), np.rot90(img[:, cy, :]), np.rot90(img[cx, :, :])]

    for c, img in images.items():
        lo, hi = _display_window(img, c)
        fig, axs = plt.subplots(1, 3, figsize=(9, 3.3))
        for ax, v in zip(axs, views(img)):
            ax.imshow(v, cmap="gray", vmin=lo, vmax=hi, aspect="equal")
            ax.axis("off")
        fig.suptitle(c.upper() + (" (HU, window 0-80)" if c == "ct" else ""), fontsize=11)
        fig.tight_layout()
        p = out_dir / f"contrast_{c}.png"
        fig.savefig(p, dpi=80)
        plt.close(fig)
        paths[c] = p
    n = len(images)
    fig, axs = plt.subplots(2, n, figsize=(1.9 * n, 4.2))
    axs = np.asarray(axs).reshape(2, n)
    for j, (c, img) in enumerate(images.items()):
        lo, hi = _display_window(img, c)
        v = views(img)
        for i in range(2):
            axs[i, j].imshow(v[i], cmap="gray", vmin=lo, vmax=hi)
            axs[i, j].axis("off")
        axs[0, j].set_title(c, fontsize=10)
    fig.tight_layout()
    p = out_dir / "contrasts.png"
    fig.savefig(p, dpi=80)
    plt.close(fig)
    paths["montage"] = p
    return paths
