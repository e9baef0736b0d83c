"""Natural-language descriptions of ROIs (prompt side) and canonical answer phrases.

Anatomy: ``left hippocampus`` / ``hippocampus on the left`` / ``hippocampal formation (left)``.
Lesions: a noun (class term, or an ontology parent when it is unambiguous for this case) with
metadata adjectives as prefix (``left frontal enhancing mass``) or suffix (``mass in the left
frontal lobe``). With several lesions, adjectives are added until the description singles out
the target; with one lesion, metadata may be dropped for coarse phrasing.
"""

from __future__ import annotations

import re

import numpy as np

from .grammar import pick
from .terms import (ACUITY_ADJ, BOTH_SIDES, ANATOMY, CLASS_NAME, COMPONENT_TERMS, LESION_TERMS, LOBE_ADJ, LOBE_PHRASE,
                    SIDE_PREFIX, SIDE_SUFFIX, SIGNAL_ADJ)


def var_name(text: str) -> str:
    """A Python identifier from a canonical phrase: ``left hippocampus`` -> ``left_hippocampus``."""
    v = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    return v if v and not v[0].isdigit() else f"roi_{v}"


def anatomy_canonical(key: str, side: str | None) -> str:
    """Canonical phrase, e.g. ``left hippocampus``, ``brainstem``."""
    term = ANATOMY[key][1][0]
    if side == "both":
        return f"bilateral {term}"
    return f"{side} {term}" if side else term


def describe_anatomy(key: str, side: str | None, rng: np.random.Generator, split: str) -> str:
    """A prompt phrase for an anatomical ROI."""
    term = pick(ANATOMY[key][1], rng, split)
    if side is None:
        return f"the {term}"
    if side == "both":
        return pick(BOTH_SIDES, rng, split).format(t=term)
    form = int(rng.integers(3))
    if form == 0:
        return f"the {pick(SIDE_PREFIX[side], rng, split)} {term}"
    if form == 1:
        return f"the {term} {pick(SIDE_SUFFIX[side], rng, split)}"
    return f"the {term} {pick(['on the ' + side, '(' + side + ')', side + '-sided'], rng, split)}"


# ------------------------------------------------------------------ lesions
def _attrs(meta: dict, signal_stem: str | None) -> dict[str, str]:
    """Describable attributes of a lesion."""
    a = {}
    if meta.get("hemisphere") in ("left", "right"):
        a["side"] = meta["hemisphere"]
    if meta.get("lobe"):
        a["lobe"] = meta["lobe"]
    if signal_stem and meta.get("signal", {}).get(_contrast_key(signal_stem)):
        a["signal"] = meta["signal"][_contrast_key(signal_stem)]
    if meta.get("enhancement") is not None:
        a["enhancing"] = "yes" if meta["enhancement"] else "no"
    if meta.get("acuity"):
        a["acuity"] = meta["acuity"]
    return a


def _contrast_key(stem: str) -> str:
    return {"t1": "t1w", "t2": "t2w"}.get(stem, stem)


def _nouns(meta: dict) -> list[str]:
    return [meta["cls"]] + [p for p in meta.get("ontology", ["lesion"]) if p in LESION_TERMS]


def _matches(meta: dict, noun: str, chosen: dict[str, str], signal_stem: str | None) -> bool:
    if noun not in _nouns(meta):
        return False
    attrs = _attrs(meta, signal_stem)
    return all(attrs.get(k) == v for k, v in chosen.items())


def describe_lesion(target: dict, metas: list[dict], rng: np.random.Generator, split: str,
                    signal_stem: str | None = None, component: str | None = None) -> str | None:
    """A phrase that singles out ``target`` among ``metas`` (None if impossible).

    Args:
        signal_stem: the acquisition whose signal adjective may be used (e.g. "flair").
        component: describe a sub-component of the lesion instead (``enhancing``, ``necrotic``, ...).
    """
    nouns = _nouns(target)
    # parents are usable only when no other lesion shares them, unless attributes disambiguate
    order = list(rng.permutation(len(nouns)))
    attrs = _attrs(target, signal_stem)
    keys = list(rng.permutation(sorted(attrs)))
    for ni in order:
        noun = nouns[ni]
        n_keep = int(rng.integers(0, len(keys) + 1))
        chosen = {k: attrs[k] for k in keys[:n_keep]}
        for extra in [None] + keys[n_keep:]:
            if extra is not None:
                chosen[extra] = attrs[extra]
            others = [m for m in metas if m is not target and _matches(m, noun, chosen, signal_stem)]
            if not others:
                # 'enhancing' = no is not describable in words we use; drop it
                if chosen.get("enhancing") == "no":
                    chosen.pop("enhancing")
                    if any(_matches(m, noun, chosen, signal_stem) for m in metas if m is not target):
                        continue
                return _phrase(noun, chosen, rng, split, signal_stem, component)
    return None


def _phrase(noun: str, chosen: dict, rng, split, signal_stem, component) -> str:
    term = pick(LESION_TERMS[noun], rng, split)
    pre, post = [], []
    if "acuity" in chosen:
        pre.append(pick(ACUITY_ADJ[chosen["acuity"]], rng, split))
    if "signal" in chosen:
        kind = "ct" if signal_stem == "ct" else "mr"
        pre.append(pick(SIGNAL_ADJ[chosen["signal"]][kind], rng, split))
    if chosen.get("enhancing") == "yes":
        pre.append(pick(["enhancing", "contrast-enhancing"], rng, split))
    side, lobe = chosen.get("side"), chosen.get("lobe")
    if side or lobe:
        if rng.random() < 0.5:  # prefix: "left frontal mass"
            loc = " ".join(x for x in (side, LOBE_ADJ.get(lobe) if lobe else None) if x)
            pre.insert(0, loc)
        else:  # suffix: "mass in the left frontal lobe"
            if lobe:
                post.append(f"in the {side + ' ' if side else ''}{LOBE_PHRASE[lobe]}")
            else:
                post.append(pick(SIDE_SUFFIX[side], rng, split))
    text = " ".join(pre + [term] + post)
    if component:
        comp = pick(COMPONENT_TERMS[component], rng, split)
        return f"the {comp} of the {text}"
    return f"the {text}"


def location_answer(meta: dict) -> str:
    """Canonical location: ``left parietal lobe``, ``right thalamus``, ``extra-axial, left frontal lobe``."""
    side = meta.get("hemisphere")
    side = "bilateral" if side == "bilateral" else side
    where = None
    if meta.get("lobe"):
        where = LOBE_PHRASE[meta["lobe"]]
    elif meta.get("deep_structure"):
        key = re.sub(r"^(Left|Right)-", "", meta["deep_structure"])
        where = ANATOMY[key][1][0] if key in ANATOMY else key.replace("-", " ").lower()
    else:
        where = "hemisphere"
    text = f"{side} {where}" if side else where
    loc = meta.get("location")
    if loc in ("intraventricular", "extra-axial"):
        text = f"{loc}, {text}"
    return text


def territory_answer(meta: dict) -> str | None:
    """Canonical vascular territory: ``left MCA territory`` (None if none)."""
    t = meta.get("territory")
    if not t:
        return None
    side = meta.get("hemisphere")
    return f"{side} {t} territory" if side in ("left", "right") else f"{t} territory"


def class_answer(meta: dict) -> str:
    return CLASS_NAME.get(meta["cls"], meta["cls"])


# ------------------------------------------------------------------ absent targets
#: the canonical answer to a question about a lesion the images do not show (matches
#: ``voxelprompt.alignment.NOT_FOUND``)
NOT_FOUND_ANSWER = "not found"
#: nouns any lesion may be called: never used for an absent target when the case has a lesion
GENERIC_NOUNS = ("lesion", "mass", "hyperintensity")
#: nouns a lesion's components make it answer to ("the edema" of a glioma with peritumoral edema)
COMPONENT_NOUNS = {"edema": ("edema",), "cavity": ("cavity", "cyst"), "necrotic": ("cavity",)}
#: nouns a class answers to beyond its ontology (look-alikes: a fluid-filled resection cavity)
CLASS_LOOKALIKES = {"cyst": ("cavity",), "resection_cavity": ("cyst",)}
#: classes whose terms take an acuity adjective in absent descriptions
_ACUTE_NOUNS = ("infarct", "stroke", "hemorrhage", "bleed")


def lesion_nouns(meta: dict) -> set[str]:
    """Every noun (a key of ``LESION_TERMS``) that could refer to this lesion.

    Its class and ontology parents, the generic nouns, nouns of its components and class
    look-alikes: deliberately broad, so an absent target's noun never names a lesion that is there.
    """
    out = set(_nouns(meta)) | set(GENERIC_NOUNS) | set(CLASS_LOOKALIKES.get(meta["cls"], ()))
    for comp in meta.get("components") or ():
        out |= set(COMPONENT_NOUNS.get(comp, ()))
    return out & set(LESION_TERMS)


def can_be_called(sites: list[tuple[dict, set[str], set[str]]], noun: str, side: str | None = None,
                  lobe: str | None = None) -> bool:
    """True when some lesion of ``sites`` could be called ``noun`` on ``side`` / in ``lobe``.

    The rule that decides absence: a lesion answers to every noun of :func:`lesion_nouns`,
    wherever :meth:`task_templates.case.Case.lesion_sites` says it may reach (None = anywhere).
    """
    return any(noun in lesion_nouns(m) and (side is None or side in s) and (lobe is None or lobe in lb)
               for m, s, lb in sites)


def describe_absent(sites: list[tuple[dict, set[str], set[str]]], rng: np.random.Generator, split: str,
                    signal_stem: str | None = None) -> tuple[str, dict] | None:
    """A phrase for a lesion the case does NOT have, worded like a real target (None if none).

    Args:
        sites: every lesion of every session with the sides and lobes it may reach
            (:meth:`task_templates.case.Case.lesion_sites`); empty for a lesion-free case.

    Three kinds (``spec["mode"]``):

    - ``no_lesion``: the case has no lesion; any noun, with optional adjectives;
    - ``absent_class``: a noun no lesion answers to (:func:`lesion_nouns`), optionally with
      side, lobe, signal, enhancement and acuity adjectives;
    - ``elsewhere``: a noun some lesion answers to, on a side and/or in a lobe that no lesion
      answering to it reaches (``the right glioma`` when the only glioma is on the left).

    Returns:
        (phrase, spec) with ``spec = {"mode", "noun", side?, lobe?, ...}``.
    """
    lobes_all = sorted(LOBE_ADJ)
    if not sites:
        modes = ["no_lesion"]
    else:
        modes = ["absent_class", "elsewhere"] if rng.random() < 0.5 else ["elsewhere", "absent_class"]
    present = set().union(*(lesion_nouns(m) for m, _, _ in sites)) if sites else set()
    for mode in modes:
        if mode in ("no_lesion", "absent_class"):
            nouns = [n for n in LESION_TERMS if n not in present]
            if not nouns:
                continue
            noun = nouns[int(rng.integers(len(nouns)))]
            attrs = {"side": ["left", "right"][int(rng.integers(2))],
                     "lobe": lobes_all[int(rng.integers(len(lobes_all)))]}
            if signal_stem and rng.random() < 0.5:
                attrs["signal"] = ["hyper", "hypo", "iso"][int(rng.integers(3))]
            if rng.random() < 0.3:
                attrs["enhancing"] = "yes"
            if noun in _ACUTE_NOUNS and rng.random() < 0.5:
                attrs["acuity"] = ["acute", "subacute", "chronic"][int(rng.integers(3))]
            keys = [str(k) for k in rng.permutation(sorted(attrs))]
            chosen = {k: attrs[k] for k in keys[:int(rng.integers(0, len(keys) + 1))]}
        else:  # elsewhere: a named noun where no lesion it could name reaches
            options = {}
            for noun in sorted(present):
                ok = [(side, lobe) for side in ("left", "right", None) for lobe in [None] + lobes_all
                      if (side or lobe) and not can_be_called(sites, noun, side, lobe)]
                if ok:
                    options[noun] = ok
            if not options:
                continue
            names = sorted(options)
            noun = names[int(rng.integers(len(names)))]
            side, lobe = options[noun][int(rng.integers(len(options[noun])))]
            chosen = {k: v for k, v in (("side", side), ("lobe", lobe)) if v}
        phrase = _phrase(noun, chosen, rng, split, signal_stem, None)
        return phrase, {"mode": mode, "noun": noun, **chosen}
    return None
