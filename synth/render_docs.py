"""Renders the pictures of ``docs/synth.md`` into ``docs/img/synth/`` (deterministic).

- ``anatomy.png``: the anatomy maps of one subject (labels, lobes, territories, hemispheres);
- ``variability.png``: one template under several random warps, flips and atrophy;
- ``geometry.png``: one subject's acquisitions on their own clinical grids;
- ``subject.png``: the mosaic ``voxelprompt synth`` writes for a two-session subject;
- ``contrast_<c>.png`` / ``contrasts.png`` (``synth.contrast.example_gallery``) and
  ``lesion_<cls>.png`` / ``lesions.png`` (``synth.lesions.example_gallery``).

Usage::

    python -m synth.render_docs [--out docs/img/synth] [--anatomy atlas|phantom] [--resolution 1.5]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "img" / "synth"


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _views(arr: np.ndarray, center) -> list[np.ndarray]:
    i, j, k = (int(c) for c in center)
    return [np.rot90(arr[:, :, k]), np.rot90(arr[:, j, :]), np.rot90(arr[i, :, :])]


def _label_colors(ids: np.ndarray, seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lut = rng.uniform(0.15, 1.0, size=(int(ids.max()) + 1, 3))
    lut[0] = 0
    return lut[ids]


def anatomy_figure(anat, path: Path) -> Path:
    """Labels, lobes, territories and hemispheres in three views."""
    from .anatomy import LOBES, TERRITORIES
    plt = _plt()
    brain = np.argwhere(anat.brain_mask())
    c = (brain.min(0) + brain.max(0)) // 2
    c[2] += 6  # an axial cut through the lateral ventricles
    maps = [("labels (FreeSurfer ids)", _label_colors(anat.array)), ("lobes", anat.lobes.tensor[0].numpy()),
            ("territories (approx.)", anat.territories.tensor[0].numpy()),
            ("hemispheres", anat.hemispheres.tensor[0].numpy())]
    fig, axes = plt.subplots(3, 4, figsize=(10, 7.2))
    for col, (title, m) in enumerate(maps):
        for row, sl in enumerate(_views(m, c)):
            ax = axes[row, col]
            if m.ndim == 4 or (sl.ndim == 3):
                ax.imshow(sl, interpolation="nearest")
            else:
                ax.imshow(sl, cmap="tab10", vmin=0, vmax=9, interpolation="nearest")
            ax.axis("off")
        axes[0, col].set_title(title, fontsize=9)
    fig.text(0.5, 0.01, "lobes: " + ", ".join(f"{k} {v}" for k, v in LOBES.items()) + "   territories: "
             + ", ".join(f"{k} {v}" for k, v in TERRITORIES.items()) + "   hemispheres: 1 left, 2 right",
             ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=70)
    plt.close(fig)
    return path


def variability_figure(source: str, resolution: float, path: Path) -> Path:
    """Axial slices of the same template under six random transforms (some flipped, some atrophied)."""
    from . import deform
    from .anatomy import template
    plt = _plt()
    tpl = template(source)
    fig, axes = plt.subplots(1, 6, figsize=(12, 2.6))
    for k, ax in enumerate(axes):
        rng = np.random.default_rng(100 + k)
        tf = deform.random_transform(rng, midline_x=tpl.midline_x, flip_prob=0.5)
        a = deform.warp(tpl, tf, resolution, thickness={"csf": rng.uniform(1, 4), "dura": 1.5,
                                                        "skull": rng.uniform(4, 9), "fat": 3.0, "scalp": 4.0})
        a, rec = deform.apply_structure_changes(a, {"ventricles": float(rng.uniform(0.8, 2.0))}, rng)
        brain = np.argwhere(a.brain_mask())
        z = int((brain[:, 2].min() + brain[:, 2].max()) // 2) + int(round(6 / resolution))
        ax.imshow(np.rot90(_label_colors(a.array)[:, :, z]), interpolation="nearest")
        ax.set_title(f"{'flipped, ' if tf.flip else ''}ventricles ×{rec[0]['achieved']:.2f}", fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)
    return path


def geometry_figure(source: str, resolution: float, path: Path) -> Path:
    """Native-grid slices (voxel axes as stored, not RAS) of one session's acquisitions."""
    from .subject import generate_subject
    plt = _plt()
    s = generate_subject(7, anatomy=source, resolution=resolution, floor_spacing=False, n_lesions=1,
                         lesion_classes=["glioma"], protocols=[["t1w", "t2w", "flair", "dwi", "swi", "ct_thick"]])
    ses = s.sessions[0]
    fig, axes = plt.subplots(1, len(ses.acquisitions), figsize=(2.2 * len(ses.acquisitions), 2.8))
    for ax, (name, vol) in zip(axes, ses.acquisitions.items()):
        meta = ses.acquisition_meta[name]
        arr = vol.numpy()[0]
        ax_slice = meta["SliceAxis"] if meta["SliceAxis"] is not None else 2
        sl = np.take(arr, arr.shape[ax_slice] // 2, axis=ax_slice)
        sp = [vol.spacing[j] for j in range(3) if j != ax_slice]
        lo, hi = (0, 80) if meta["Contrast"] == "ct" else np.percentile(sl[sl > 0], [1, 99.5]) if (sl > 0).any() else (0, 1)
        ax.imshow(sl.T, cmap="gray", vmin=lo, vmax=hi, origin="lower", aspect=sp[1] / sp[0], interpolation="nearest")
        ax.set_title(f"{name} {meta['Orientation']}\n" + "×".join(f"{v:.1f}" for v in vol.spacing) + " mm",
                     fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)
    return path


def docs_anatomy(source: str, resolution: float):
    """The subject anatomy the galleries are drawn on (fixed seed, no flip)."""
    from . import deform
    from .anatomy import DEFAULT_THICKNESS, template
    tpl = template(source)
    tf = deform.random_transform(np.random.default_rng(0), midline_x=tpl.midline_x, flip_prob=0.0,
                                 rotation=3.0, nonlinear_mm=1.5)
    return deform.warp(tpl, tf, resolution, thickness=DEFAULT_THICKNESS)


def main(argv: list[str] | None = None) -> int:
    """Writes every picture; prints their paths."""
    from .anatomy import atlas_available
    p = argparse.ArgumentParser(prog="python -m synth.render_docs", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default docs/img/synth)")
    p.add_argument("--anatomy", choices=("atlas", "phantom", "auto"), default="auto")
    p.add_argument("--resolution", type=float, default=1.5, help="working grid of the pictures (mm)")
    p.add_argument("--only", choices=("anatomy", "variability", "geometry", "subject", "contrasts", "lesions"),
                   nargs="*", help="render only these pictures")
    args = p.parse_args(argv)
    source = args.anatomy if args.anatomy != "auto" else ("atlas" if atlas_available() else "phantom")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    todo = set(args.only or ("anatomy", "variability", "geometry", "subject", "contrasts", "lesions"))
    anat = docs_anatomy(source, args.resolution) if todo & {"anatomy", "contrasts", "lesions"} else None
    written = []
    if "anatomy" in todo:
        written.append(anatomy_figure(anat, out / "anatomy.png"))
    if "variability" in todo:
        written.append(variability_figure(source, 2.0, out / "variability.png"))
    if "geometry" in todo:
        written.append(geometry_figure(source, 2.0, out / "geometry.png"))
    if "subject" in todo:
        from .subject import generate_subject
        s = generate_subject(4, anatomy=source, resolution=2.0, n_lesions=2, lesion_classes=["glioma", "infarct"],
                             protocols=[["t1w", "flair", "t1c"], ["flair", "dwi", "adc"]], lesion_factors={1: 1.6, 2: 0.6})
        written.append(s.mosaic_png(out / "subject.png", dpi=60))
    if "contrasts" in todo:
        from . import contrast
        written += list(contrast.example_gallery(anat, out, seed=0).values())
    if "lesions" in todo:
        from . import lesions
        written += list(lesions.example_gallery(anat, out, seed=0).values())
    for w in written:
        print(w)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
