"""Lesion classes: where each class goes in the anatomy and how each of its parts looks.

A *plan* (one function per class) samples the lesion's foci (centre voxel, diameter in mm), the
anatomy it may occupy, its parts (outermost first, with volume fractions) and, per part, a
signal spec for each base contrast. Specs are ``(lo, hi)`` relative to the surrounding parenchyma
(MR ``ring × (1 + r)``; CT ``ring + r`` HU), ``("csf", lo, hi)`` for a CSF-like mix, or
``("hu", lo, hi)`` for an absolute CT density; a value is drawn uniformly. PD derives from T2
(× 0.45), SWI from GRE (dark × 1.2, bright × 0.8), T1c = T1 + the part's enhancement.

Per class (where it may go → its parts and signal):

- glioma: centre in cerebral WM; WM/GM/deep GM, same hemisphere (90 %) → high grade (55 %):
  edema, enhancing rim (T1c +0.8..1.5), CSF-like necrotic core; low grade: T2/FLAIR hyper,
  T1 hypo tumour (+ edema 40 %).
- meningioma: extra-axial (85 %: extra-cerebral CSF, dura, adjacent cortex) or intraventricular
  → iso T1/T2/FLAIR, CT +10..20 HU, homogeneous enhancement +1.0..1.6.
- metastasis: GM-WM junction (cerebellar 15 %) → enhancing nodule, or ring with necrotic core
  from 12 mm; edema (80 %).
- edema: cerebral WM (+ deep GM) → T2/FLAIR hyper, T1 hypo, ADC hyper.
- infarct: one ACA/MCA/PCA territory of one hemisphere (cortical, or lacunar 20 %) → acute:
  DWI hyper, ADC hypo; subacute: T2/FLAIR hyper, DWI hyper, ADC low (50 %) or pseudo-normal,
  gyral enhancement (30 %); chronic: CSF-like cavity + gliotic rim.
- wmh: 3-12 foci of 3-12 mm, periventricular (60 %) or deep WM → FLAIR/T2 hyper, T1 iso to hypo.
- hemorrhage: deep GM (45 %), lobar (40 %) or intraventricular (15 %) → acute: CT 60-80 HU,
  T2/GRE/SWI hypo (+ blooming); subacute: CT 45-60 HU, T1 hyper, GRE/SWI hypo.
- cyst: parenchymal or extra-axial (arachnoid) → CSF-like everywhere, no enhancement, no
  restriction.
- resection_cavity: from the cortex into WM → CSF-like cavity + rim (FLAIR hyper, enhancing 40 %).
"""

from __future__ import annotations

import numpy as np

LESION_CLASSES = ("glioma", "meningioma", "metastasis", "edema", "infarct", "wmh", "hemorrhage", "cyst",
                  "resection_cavity")

#: Parents of each class, most specific first.
ONTOLOGY = {
    "glioma": ["neoplasm", "mass", "lesion"],
    "meningioma": ["neoplasm", "mass", "lesion"],
    "metastasis": ["neoplasm", "mass", "lesion"],
    "edema": ["lesion"],
    "infarct": ["stroke", "lesion"],
    "wmh": ["hyperintensity", "lesion"],
    "hemorrhage": ["bleed", "lesion"],
    "cyst": ["lesion"],
    "resection_cavity": ["cavity", "lesion"],
}

_BASE_CONTRASTS = ("t1w", "t2w", "flair", "dwi", "adc", "gre", "ct")


def uniform(rng, a: float, b: float) -> float:
    """One uniform draw as a Python float."""
    return float(rng.uniform(a, b))


def pick_voxel(cand: np.ndarray, rng) -> np.ndarray | None:
    """A random voxel index (3,) of a boolean mask, or None if it is empty."""
    idx = np.flatnonzero(cand)
    if idx.size == 0:
        return None
    return np.array(np.unravel_index(int(idx[rng.integers(idx.size)]), cand.shape))


# ----------------------------------------------------------------------------- appearance
def _spec(rng, v):
    if v is None:
        return ("rel", 0.0)
    if isinstance(v, tuple) and isinstance(v[0], str):
        return (v[0], float(rng.uniform(v[1], v[2])))
    return ("rel", float(rng.uniform(v[0], v[1])))


def _appearance(rng, *, t1w, t2w, flair, dwi, adc, gre, ct, enh=0.0) -> dict:
    """Per-contrast signal specs of one lesion part (derived: pd, swi, t1c)."""
    s = {c: _spec(rng, v) for c, v in zip(_BASE_CONTRASTS, (t1w, t2w, flair, dwi, adc, gre, ct))}
    e = float(rng.uniform(*enh)) if isinstance(enh, tuple) else float(enh)
    k, r = s["t2w"]
    s["pd"] = (k, 0.45 * r) if k == "rel" else (k, r)
    k, r = s["gre"]
    s["swi"] = (k, max(-0.92, 1.2 * r) if r < 0 else 0.8 * r) if k == "rel" else (k, r)
    k, r = s["t1w"]
    s["t1c"] = (k, r + e) if k == "rel" else (k, r)
    s["_enh"] = e if k == "rel" else 0.0
    return s


def _edema(rng):
    return _appearance(rng, t1w=(-0.25, -0.1), t2w=(0.4, 0.8), flair=(0.3, 0.7), dwi=(0.0, 0.12),
                       adc=(0.3, 0.7), gre=(0.2, 0.4), ct=(-12, -6))


def _necrotic(rng):
    return _appearance(rng, t1w=("csf", 0.5, 0.85), t2w=("csf", 0.5, 0.85), flair=(-0.3, 0.3),
                       dwi=("csf", 0.5, 0.85), adc=("csf", 0.4, 0.8), gre=("csf", 0.5, 0.85),
                       ct=("csf", 0.4, 0.8))


def _csf_like(rng, lo=0.85):
    c = ("csf", lo, 1.0)
    return _appearance(rng, t1w=c, t2w=c, flair=c, dwi=c, adc=c, gre=c, ct=c)


# ----------------------------------------------------------------------------- class plans
# plan(ctx, rng, free) -> dict with
#   foci: [(centre voxel (3,) or None, diameter mm)], allowed: bool mask (labels grid),
#   parts: [(name, volume fraction)] outermost first, app: {part: {contrast: spec}},
#   location, and optionally acuity, grade, same_side (default True), prefer (mask pulled
#   toward), lobulation (beta range), bloom (T2* blooming).
# ``ctx`` is synth.lesions._Ctx (tissue masks, ventricles, near(), ...); ``free`` the voxels
# not taken by other lesions.

def _plan_glioma(ctx, rng, free):
    high = rng.random() < 0.55
    c = pick_voxel(ctx.tissue("wm") & free, rng)
    if high:
        core = uniform(rng, 0.4, 0.7)
        nec = uniform(rng, 0.2, 0.5)
        parts = [("edema", 1 - core), ("enhancing", core * (1 - nec)), ("necrotic", core * nec)]
        app = {"edema": _edema(rng), "necrotic": _necrotic(rng),
               "enhancing": _appearance(rng, t1w=(-0.3, -0.1), t2w=(0.3, 0.6), flair=(0.3, 0.6), dwi=(0.0, 0.3),
                                        adc=(-0.1, 0.15), gre=(-0.25, 0.15), ct=(-4, 6), enh=(0.8, 1.5))}
    else:
        edema = uniform(rng, 0.15, 0.4) if rng.random() < 0.4 else 0.0
        parts = [("edema", edema), ("tumor", 1 - edema)] if edema else [("tumor", 1.0)]
        app = {"edema": _edema(rng),
               "tumor": _appearance(rng, t1w=(-0.4, -0.2), t2w=(0.5, 1.0), flair=(0.4, 0.8), dwi=(-0.05, 0.1),
                                    adc=(0.2, 0.5), gre=(0.2, 0.5), ct=(-12, -5))}
    return dict(foci=[(c, uniform(rng, 25, 60) if high else uniform(rng, 20, 50))], allowed=ctx.cerebral,
                parts=parts, app=app, location="parenchymal", grade="high" if high else "low",
                same_side=rng.random() < 0.9)


def _plan_meningioma(ctx, rng, free):
    tumor = _appearance(rng, t1w=(-0.04, 0.04), t2w=(-0.04, 0.12), flair=(-0.04, 0.12), dwi=(-0.04, 0.2),
                        adc=(-0.2, 0.0), gre=(-0.04, 0.04), ct=(10, 20), enh=(1.0, 1.6))
    if rng.random() < 0.15 and ctx.lateral_ventricles.any():
        c = pick_voxel(ctx.lateral_ventricles & free, rng)
        return dict(foci=[(c, uniform(rng, 12, 30))], allowed=ctx.ventricles | ctx.tissue("choroid"),
                    parts=[("tumor", 1.0)], app={"tumor": tumor}, location="intraventricular")
    cover = ctx.tissue("dura", "skull")
    cand = ctx.ext_csf & ctx.near(ctx.tissue("gm"), 3, "gm") & ctx.near(cover, 4, "cover") & free
    c = pick_voxel(cand, rng)
    return dict(foci=[(c, uniform(rng, 15, 45))], allowed=ctx.ext_csf | ctx.tissue("dura", "gm"),
                prefer=ctx.ext_csf | ctx.tissue("dura"),
                parts=[("tumor", 1.0)], app={"tumor": tumor}, location="extra-axial", same_side=False)


def _plan_metastasis(ctx, rng, free):
    if rng.random() < 0.15 and ctx.tissue("cerebellum_wm").any():
        cand = ctx.tissue("cerebellum_wm") & ctx.near(ctx.tissue("cerebellum_gm"), 2, "cbgm")
        allowed = ctx.tissue("cerebellum_wm", "cerebellum_gm")
    else:
        cand = ctx.tissue("wm") & ctx.near(ctx.tissue("gm"), 2, "gm")
        allowed = ctx.cerebral
    c = pick_voxel(cand & free, rng)
    core_d = uniform(rng, 6, 25)
    edema = uniform(rng, 0.4, 0.75) if rng.random() < 0.8 else 0.0
    enh = _appearance(rng, t1w=(-0.25, -0.05), t2w=(0.1, 0.5), flair=(0.1, 0.5), dwi=(-0.1, 0.3),
                      adc=(-0.2, 0.2), gre=(-0.3, 0.1), ct=(-3, 8), enh=(0.8, 1.5))
    parts = [("edema", edema)] if edema else []
    if core_d >= 12:
        nec = uniform(rng, 0.2, 0.45)
        parts += [("enhancing", (1 - edema) * (1 - nec)), ("necrotic", (1 - edema) * nec)]
    else:
        parts += [("enhancing", 1 - edema)]
    d = core_d / (1 - edema) ** (1 / 3)
    return dict(foci=[(c, d)], allowed=allowed, parts=parts,
                app={"edema": _edema(rng), "enhancing": enh, "necrotic": _necrotic(rng)}, location="parenchymal")


def _plan_edema(ctx, rng, free):
    c = pick_voxel(ctx.tissue("wm") & free, rng)
    return dict(foci=[(c, uniform(rng, 15, 45))], allowed=ctx.tissue("wm", "deep_gm"), parts=[("edema", 1.0)],
                app={"edema": _edema(rng)}, location="parenchymal")


def _plan_infarct(ctx, rng, free):
    acuity = str(rng.choice(["acute", "subacute", "chronic"], p=[0.4, 0.2, 0.4]))
    terr = ctx.anatomy.territories.numpy()[0]
    hemi = ctx.anatomy.hemispheres.numpy()[0]
    t = int(rng.choice([1, 2, 3], p=[0.2, 0.6, 0.2]))
    h = int(rng.integers(1, 3))
    allowed = (terr == t) & (hemi == h) & ctx.cerebral
    if not (allowed & free).any():
        allowed = (terr > 0) & ctx.cerebral
    lacunar = rng.random() < 0.2
    cand = allowed & (ctx.tissue("wm", "deep_gm") if lacunar else ctx.tissue("gm"))
    c = pick_voxel(cand & free, rng)
    if c is None:
        c = pick_voxel(allowed & free, rng)
    d = uniform(rng, 6, 15) if lacunar else uniform(rng, 20, 60)
    if acuity == "acute":
        app = {"infarct": _appearance(rng, t1w=(-0.2, -0.05), t2w=(0.15, 0.5), flair=(0.15, 0.5), dwi=(0.5, 1.2),
                                      adc=(-0.55, -0.3), gre=(-0.05, 0.1), ct=(-10, -4))}
        parts = [("infarct", 1.0)]
    elif acuity == "subacute":
        restricted = rng.random() < 0.5
        app = {"infarct": _appearance(rng, t1w=(-0.3, -0.15), t2w=(0.4, 0.8), flair=(0.4, 0.8), dwi=(0.3, 0.8),
                                      adc=(-0.45, -0.28) if restricted else (-0.03, 0.03), gre=(0.0, 0.2),
                                      ct=(-15, -8), enh=(0.4, 0.8) if rng.random() < 0.3 else 0.0)}
        parts = [("infarct", 1.0)]
    else:
        cav = uniform(rng, 0.5, 0.8)
        parts = [("gliosis", 1 - cav), ("cavity", cav)]
        app = {"cavity": _csf_like(rng, 0.7),
               "gliosis": _appearance(rng, t1w=(-0.25, -0.1), t2w=(0.3, 0.6), flair=(0.3, 0.6), dwi=(-0.1, 0.05),
                                      adc=(0.3, 0.6), gre=(0.1, 0.3), ct=(-15, -8))}
    return dict(foci=[(c, d)], allowed=allowed, parts=parts, app=app, location="parenchymal", acuity=acuity)


def _plan_wmh(ctx, rng, free):
    wm = ctx.tissue("wm")
    peri = wm & ctx.near(ctx.lateral_ventricles, 8, "latvent")
    deep = wm & ~ctx.near(ctx.tissue("gm"), 4, "gm")
    foci = []
    for _ in range(int(rng.integers(3, 13))):
        c = pick_voxel((peri if rng.random() < 0.6 else deep) & free, rng)
        if c is None:
            c = pick_voxel(wm & free, rng)
        foci.append((c, uniform(rng, 3, 12)))
    app = {"wmh": _appearance(rng, t1w=(-0.3, 0.0), t2w=(0.3, 0.7), flair=(0.35, 0.8), dwi=(-0.05, 0.1),
                              adc=(0.1, 0.4), gre=(0.1, 0.3), ct=(-8, -3))}
    return dict(foci=foci, allowed=wm, parts=[("wmh", 1.0)], app=app, location="parenchymal", lobulation=(0.3, 0.8))


def _plan_hemorrhage(ctx, rng, free):
    acuity = "acute" if rng.random() < 0.7 else "subacute"
    if acuity == "acute":
        hem = _appearance(rng, t1w=(-0.1, 0.04), t2w=(-0.5, -0.25), flair=(-0.4, -0.1), dwi=(-0.5, -0.25),
                          adc=(-0.4, -0.2), gre=(-0.8, -0.5), ct=("hu", 60, 80))
    else:
        hem = _appearance(rng, t1w=(0.3, 0.6), t2w=(0.3, 0.7), flair=(0.2, 0.5), dwi=(0.3, 0.6),
                          adc=(-0.05, 0.2), gre=(-0.7, -0.4), ct=("hu", 45, 60))
    u = rng.random()
    if u < 0.15 and ctx.lateral_ventricles.any():
        c = pick_voxel(ctx.lateral_ventricles & free, rng)
        return dict(foci=[(c, uniform(rng, 10, 30))], allowed=ctx.ventricles, parts=[("hematoma", 1.0)],
                    app={"hematoma": hem}, location="intraventricular", acuity=acuity, bloom=True)
    if u < 0.6:
        c = pick_voxel(ctx.tissue("deep_gm") & free, rng)
        allowed = ctx.tissue("deep_gm", "wm")
    else:
        c = pick_voxel(ctx.tissue("wm") & ctx.near(ctx.tissue("gm"), 4, "gm") & free, rng)
        allowed = ctx.cerebral
    return dict(foci=[(c, uniform(rng, 12, 45))], allowed=allowed, parts=[("hematoma", 1.0)], app={"hematoma": hem},
                location="parenchymal", acuity=acuity, bloom=True)


def _plan_cyst(ctx, rng, free):
    app = {"cyst": _csf_like(rng, 0.9)}
    if rng.random() < 0.5:
        cand = ctx.ext_csf & ctx.near(ctx.tissue("gm"), 2, "gm") & free
        c = pick_voxel(cand, rng)
        if c is not None:
            return dict(foci=[(c, uniform(rng, 15, 40))], allowed=ctx.ext_csf | ctx.tissue("gm"),
                        parts=[("cyst", 1.0)], app=app, location="extra-axial")
    c = pick_voxel(ctx.tissue("wm", "deep_gm") & free, rng)
    return dict(foci=[(c, uniform(rng, 10, 35))], allowed=ctx.cerebral, parts=[("cyst", 1.0)], app=app,
                location="parenchymal")


def _plan_resection(ctx, rng, free):
    lobes = ctx.anatomy.lobes.numpy()[0]
    c = pick_voxel(ctx.tissue("gm") & (lobes > 0) & free, rng)
    cav = uniform(rng, 0.6, 0.8)
    rim = _appearance(rng, t1w=(-0.2, -0.05), t2w=(0.3, 0.6), flair=(0.3, 0.7), dwi=(-0.1, 0.2), adc=(0.1, 0.4),
                      gre=(-0.4, 0.0), ct=(-12, -5), enh=(0.5, 1.0) if rng.random() < 0.4 else 0.0)
    return dict(foci=[(c, uniform(rng, 20, 50))], allowed=ctx.cerebral | ctx.ext_csf,
                parts=[("rim", 1 - cav), ("cavity", cav)], app={"rim": rim, "cavity": _csf_like(rng)},
                location="parenchymal", acuity="chronic")


#: Class name -> plan function.
PLANS = {"glioma": _plan_glioma, "meningioma": _plan_meningioma, "metastasis": _plan_metastasis,
         "edema": _plan_edema, "infarct": _plan_infarct, "wmh": _plan_wmh, "hemorrhage": _plan_hemorrhage,
         "cyst": _plan_cyst, "resection_cavity": _plan_resection}


