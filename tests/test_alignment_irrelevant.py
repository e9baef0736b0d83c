"""`voxelprompt eval alignment`: every irrelevant prompt is absent by the rule training uses.

Absence as in ``task_templates.describe.describe_absent``: a lesion of any session can be called
every noun of ``lesion_nouns`` (class, ontology parents, generic nouns, component nouns,
look-alikes) on every side ``Case.lesion_sites`` says it reaches.
"""

import pytest
import torch

from task_templates.describe import lesion_nouns
from task_templates.terms import CLASS_NAME, LESION_TERMS

ALL_CLASSES = sorted(CLASS_NAME)
CANONICAL = {terms[0]: noun for noun, terms in LESION_TERMS.items()}


def _parse(ph: str) -> tuple[str, str | None]:
    """``the right resection cavity`` -> ("resection_cavity", "right")."""
    assert ph.startswith("the "), ph
    words = ph.removeprefix("the ").split(" ")
    side = words.pop(0) if words[0] in ("left", "right") else None
    rest = " ".join(words)
    assert rest in CANONICAL, ph
    return CANONICAL[rest], side


def _callable_by(case, noun: str, side: str | None) -> list[str]:
    """Lesions (any session) that could be called ``noun`` on ``side``, by task_templates' rule."""
    return [f"{m['cls']} {sorted(s)}" for m, s, _ in case.lesion_sites()
            if noun in lesion_nouns(m) and (side is None or side in s)]


def _target(case):
    """The lesion alignment would target (as ``make_cases``: first lateralised one with a lobe)."""
    return next((m for m in case.lesion_meta if m.get("hemisphere") in ("left", "right") and m.get("lobe")), None)


def _all_irrelevant(case, meta):
    """Irrelevant prompts for every case index (so every absent-class choice is exercised)."""
    from voxelprompt.alignment import _signal_stem, irrelevant_prompts, lesion_attrs
    attrs = lesion_attrs(meta, _signal_stem(case))
    out = []
    for ci in range(len(ALL_CLASSES) + 1):
        out += irrelevant_prompts(case, attrs, ci, ALL_CLASSES)
    return out


@pytest.fixture(scope="module")
def cases():
    """Alignment's own cases plus cases with edema / cavity components and look-alike classes."""
    import task_templates as tt
    from synth.subject import generate_subject
    from voxelprompt.alignment import make_cases
    torch.set_num_threads(1)
    got, _ = make_cases(4, 3, 4.0, "phantom", progress=False)
    out = list(got)
    for seed, classes in ((20, ["glioma"]), (21, ["glioma", "cyst"]), (13, ["resection_cavity", "cyst"]),
                          (14, ["glioma", "infarct"]), (12, ["metastasis", "glioma"])):
        case = tt.Case.from_subject(generate_subject(seed, anatomy="phantom", resolution=4.0, n_sessions=1,
                                                     protocols=[["t1w", "flair"]], n_lesions=len(classes),
                                                     lesion_classes=classes))
        meta = _target(case)
        if meta is not None:
            out.append((case, meta))
    return out


def test_irrelevant_prompts_are_absent_by_the_training_rule(cases):
    from voxelprompt.alignment import phrase
    kinds, edema_cases, cavity_cases = set(), 0, 0
    for case, meta in cases:
        comps = {c for m, _, _ in case.lesion_sites() for c in m.get("components") or ()}
        classes = {m["cls"] for m, _, _ in case.lesion_sites()}
        irr = _all_irrelevant(case, meta)
        assert irr
        for kind, ph, spec in irr:
            kinds.add(kind)
            noun, side = _parse(ph)
            assert (noun, side) == (spec["noun"], spec.get("side")) and ph == phrase(noun, side)
            assert not _callable_by(case, noun, side), (kind, ph, _callable_by(case, noun, side))
            if kind.startswith("absent class"):
                assert noun in CLASS_NAME and not _callable_by(case, noun, None), (kind, ph)
            else:
                assert noun == meta["cls"] and side != meta["hemisphere"]
        absent = {spec["noun"] for kind, _, spec in irr if kind.startswith("absent class")}
        if "edema" in comps:   # a lesion with an edema component: "the edema" is present
            edema_cases += 1
            assert "edema" not in absent
        if "cavity" in comps or classes & {"cyst", "resection_cavity"}:   # cyst ~ cavity ~ resection cavity
            cavity_cases += 1
            assert "cyst" not in absent
    assert edema_cases and cavity_cases, (edema_cases, cavity_cases)
    assert kinds == {"absent class", "absent class + side", "present class, wrong side"}


class _Sites:
    def __init__(self, sites):
        self._sites = sites

    def lesion_sites(self):
        return self._sites


def test_irrelevant_rules_on_hand_made_sites():
    from voxelprompt.alignment import irrelevant_prompts
    glioma = {"cls": "glioma", "ontology": ["neoplasm", "mass", "lesion"], "components": ["edema", "tumor"]}
    attrs = {"cls": "glioma", "side": "left", "lobe": "frontal", "signal": None}

    def run(sites, a=attrs):
        return [x for ci in range(len(ALL_CLASSES)) for x in irrelevant_prompts(_Sites(sites), a, ci, ALL_CLASSES)]

    def absent(irr):
        return {s["noun"] for k, _, s in irr if k.startswith("absent class")}

    # a glioma with an edema component: never "the edema"; the right side is free
    irr = run([(glioma, {"left"}, {"frontal"})])
    assert "edema" not in absent(irr) and absent(irr)
    assert ("present class, wrong side", "the right glioma", {"noun": "glioma", "side": "right"}) in irr
    # a second glioma reaching both sides (bilateral or unknown hemisphere): no wrong-side prompt
    irr = run([(glioma, {"left"}, {"frontal"}), (dict(glioma, components=[]), {"left", "right"}, {"parietal"})])
    assert not [k for k, _, _ in irr if k == "present class, wrong side"]
    # look-alikes: a resection cavity makes "cyst" present
    cav = {"cls": "resection_cavity", "ontology": ["cavity", "lesion"], "components": ["cavity", "rim"]}
    irr = run([(glioma, {"left"}, {"frontal"}), (cav, {"right"}, {"frontal"})])
    assert absent(irr) and not {"cyst", "resection_cavity", "edema", "glioma"} & absent(irr)
    # a cyst target with a resection cavity on the other side: the other side is not "elsewhere"
    cyst = {"cls": "cyst", "ontology": ["lesion"], "components": []}
    irr = run([(cyst, {"left"}, {"frontal"}), (cav, {"right"}, {"frontal"})], dict(attrs, cls="cyst"))
    assert not [k for k, _, _ in irr if k == "present class, wrong side"]
    # an infarct with a cavity component makes "cyst" present too
    inf = {"cls": "infarct", "ontology": ["stroke", "lesion"], "components": ["cavity", "gliosis"]}
    irr = run([(glioma, {"left"}, {"frontal"}), (inf, {"right"}, {"occipital"})])
    assert "cyst" not in absent(irr) and "infarct" not in absent(irr)
    # every class present (as far as the rule goes): no absent-class prompts at all
    every = [({"cls": c, "ontology": ["lesion"], "components": []}, {"left", "right"}, {"frontal"})
             for c in ALL_CLASSES]
    assert run(every) == []
