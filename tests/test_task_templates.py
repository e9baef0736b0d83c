"""Task catalog: grammar, held-out phrasing, descriptions, and the oracle check on real programs."""

import collections

import numpy as np
import pytest

import task_templates as tt
from task_templates import grammar
from task_templates.catalog import BUILDERS, T, Builder
from task_templates.describe import describe_lesion, location_answer
from task_templates.sampler import check, run_program


@pytest.fixture(scope="module")
def cases():
    from synth.subject import generate_subject
    full = [["t1w", "flair", "t1c", "dwi", "adc", "t2w"], ["t1w", "flair"]]
    out = [tt.Case.from_subject(generate_subject(s, anatomy="phantom", resolution=3.0, protocols=full,
                                                 n_lesions=n, lesion_classes=c))
           for s, n, c in [(1, 2, ["glioma", "infarct"]), (2, 3, ["metastasis", "meningioma", "wmh"])]]
    out.append(tt.Case.from_subject(generate_subject(3, anatomy="atlas", resolution=3.0, n_lesions=1,
                                                     protocols=[["ct"], ["ct", "t1w"]])))
    return out


def test_grammar_expand_and_count():
    rng = np.random.default_rng(0)
    t = "{segment|delineate} {roi}[ please]"
    seen = {grammar.expand(t, {"roi": "the thalamus"}, rng, "any") for _ in range(200)}
    assert seen == {"segment the thalamus", "delineate the thalamus", "segment the thalamus please",
                    "delineate the thalamus please"}
    assert grammar.count_forms(t) == 4
    assert grammar.count_forms("{a|{b|c} d}[ e]") == 6
    with pytest.raises(KeyError):
        grammar.expand("{verb} {roi2}", {"verb": "x"}, rng)


def test_heldout_split_is_stable_and_disjoint():
    opts = ["hippocampus", "hippocampal formation", "hippocampal region", "hippocampal body"]
    flags = grammar.heldout_flags(opts)
    assert flags == grammar.heldout_flags(list(opts))  # deterministic
    assert any(flags) and not all(flags)
    rng = np.random.default_rng(0)
    train = {grammar.pick(opts, rng, "train") for _ in range(200)}
    ev = {grammar.pick(opts, rng, "eval") for _ in range(200)}
    assert train.isdisjoint(ev) and train | ev == set(opts)
    # every category keeps training and held-out templates
    for cat, temps in T.items():
        f = grammar.heldout_flags(temps)
        assert not all(f), cat
        assert any(f), cat


def test_typo_changes_one_word():
    rng = np.random.default_rng(3)
    text = "segment the left hippocampus please"
    out = grammar.typo(text, rng, rate=1.0)
    diff = [(a, b) for a, b in zip(text.split(), out.split()) if a != b]
    assert len(diff) == 1 and len(out.split()) == len(text.split())
    assert grammar.typo(text, rng, rate=0.0) == text


def test_abbreviations_and_bilateral_rois(cases):
    rng = np.random.default_rng(5)
    assert grammar.abbreviate("segment the left hippocampus", rng, rate=1.0) in {
        "seg the left hippocampus", "segment the lt hippocampus", "segment the left hippo"}
    # a bilateral ROI is the union of both sides
    case = cases[2]  # atlas
    both = tt.ROI("anatomy", "Hippocampus", "both")
    left, right = (case.roi_array(tt.ROI("anatomy", "Hippocampus", s), 0) for s in ("left", "right"))
    assert (case.roi_array(both, 0) == (left | right)).all() and left.any() and right.any()
    assert both.label == "Bilateral-Hippocampus"


def test_descriptions_single_out_the_target():
    onto = ["neoplasm", "mass", "lesion"]
    metas = [
        {"id": 1, "cls": "glioma", "ontology": onto, "hemisphere": "left", "lobe": "frontal", "signal": {"flair": "hyper"}, "enhancement": True},
        {"id": 2, "cls": "metastasis", "ontology": onto, "hemisphere": "left", "lobe": "frontal", "signal": {"flair": "hyper"}, "enhancement": True},
        {"id": 3, "cls": "glioma", "ontology": onto, "hemisphere": "right", "lobe": "parietal", "signal": {"flair": "hyper"}, "enhancement": False},
    ]
    rng = np.random.default_rng(0)
    for target in metas:
        for _ in range(50):
            d = describe_lesion(target, metas, rng, "any", signal_stem="flair")
            assert d is not None
            # a shared parent alone ("mass", "tumor", "lesion") is never enough here
            if target["id"] == 1:
                assert "glioma" in d or "glial" in d or "right" not in d
    # every synth class and ontology parent has prompt wording
    from synth.lesion_classes import LESION_CLASSES, ONTOLOGY
    from task_templates.terms import LESION_TERMS
    assert all(c in LESION_TERMS and all(p in LESION_TERMS for p in ONTOLOGY[c]) for c in LESION_CLASSES)
    assert location_answer({"hemisphere": "left", "lobe": "parietal", "location": "parenchymal"}) == "left parietal lobe"
    assert location_answer({"hemisphere": "right", "lobe": None, "deep_structure": "Right-Thalamus-Proper",
                            "location": "parenchymal"}) == "right thalamus"


def test_every_category_passes_the_oracle_check(cases):
    rng = np.random.default_rng(0)
    done = collections.Counter()
    for case in cases:
        for cat in tt.CATEGORIES:
            for _ in range(2):
                try:
                    ex = tt.sample(case, rng, cat, split="any")
                except tt.Skip:
                    continue
                done[cat] += 1
                assert ex.steps and all(s.code for s in ex.steps)
                # one <MOD> per volume argument of each vision call, in program order
                n_mod = sum(tt.count_mod(s.code) for s in ex.steps)
                assert n_mod == sum(len(c.volumes) for c in ex.vision_calls)
                assert "reported:" in ex.steps[-1].output
                if ex.category in ("volume", "volume_change", "extent", "center_of_mass", "intensity"):
                    assert ex.measurements and all(m["unit"] for m in ex.measurements.values())
    missing = [c for c in tt.CATEGORIES if done[c] == 0]
    assert not missing, f"categories never sampled: {missing}"


def test_oracle_check_catches_a_wrong_program(cases):
    case = cases[0]
    rng = np.random.default_rng(1)
    b = Builder(case, rng, "train")
    draft = BUILDERS["volume"](b)
    run = run_program(draft.steps, case, draft.vision_calls)
    check(draft, run.report)  # the real program passes
    wrong = [s.replace('"mL"', '"mm³"') for s in draft.steps]
    with pytest.raises(tt.CheckFailure):
        check(draft, run_program(wrong, case, draft.vision_calls).report)
    b = Builder(case, rng, "train")
    draft = BUILDERS["cropping"](b)
    wrong = [s.replace("margin=", "margin=1 + ") for s in draft.steps]
    with pytest.raises(tt.CheckFailure):
        check(draft, run_program(wrong, case, draft.vision_calls).report)


def test_eval_split_uses_only_heldout_templates(cases):
    rng = np.random.default_rng(2)
    for split, want in (("eval", True), ("train", False)):
        for _ in range(20):
            ex = tt.sample(cases[0], rng, "volume", split=split)
            for tid in ex.meta["templates"]:
                cat, i = tid.rsplit(":", 1)
                assert grammar.heldout_flags(T[cat])[int(i)] == want


def test_runtime_sessions_and_errors(cases):
    case = cases[0]
    rng = np.random.default_rng(4)
    ex = tt.sample(case, rng, "volume_change")
    call = ex.vision_calls[0]
    assert len(call.targets) == 2  # one mask per session
    first = {a.name: a.volume for s in case.sessions for a in s.acquisitions}
    assert call.targets[0].same_grid(first[call.volumes[0]])
    vols = {a.name: (a.volume, k) for k, s in enumerate(case.sessions) for a in s.acquisitions}
    rt = tt.Runtime(tt.OracleBackend(ex.vision_calls), vols)
    ns = rt.namespace()
    with pytest.raises(TypeError, match="input volume"):
        ns["segment"]("t1")
    exec(tt.strip_mod(ex.steps[0].code), ns)
    assert "before" in ns and ns["before"].unit == "mL"
