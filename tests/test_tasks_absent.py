"""Absent targets: prompts about a lesion the images do not have get an empty mask / 'not found'."""

import collections

import numpy as np
import pytest
import torch

import task_templates as tt
import voxel_lib as vl
from task_templates import catalog
from task_templates.api import empty_mask_answer
from task_templates.describe import NOT_FOUND_ANSWER, describe_absent, lesion_nouns
from task_templates.terms import LESION_TERMS
from voxelprompt.alignment import NOT_FOUND

ABSENT_CATEGORIES = ("segmentation", "volume", "location", "tissue_removal")


@pytest.fixture(scope="module")
def cases():
    from synth.subject import generate_subject
    torch.set_num_threads(1)
    two = [["t1w", "flair", "t1c"], ["t1w", "flair"]]
    specs = [(1, 2, ["glioma", "infarct"], two), (2, 0, None, [["t1w", "flair"]]),
             (3, 3, ["metastasis", "meningioma", "cyst"], [["t1w", "flair"]])]
    return [tt.Case.from_subject(generate_subject(s, anatomy="phantom", resolution=3.0, protocols=p,
                                                  n_lesions=n, lesion_classes=c)) for s, n, c, p in specs]


@pytest.fixture
def always_absent(monkeypatch):
    monkeypatch.setattr(catalog, "ABSENT_PROB", 1.0)


def _absent_examples(case, category, n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(20 * n):
        try:
            ex = tt.sample(case, rng, category, split="any", typos=False)
        except tt.Skip:
            continue
        if "absent" in ex.meta:
            out.append(ex)
            if len(out) == n:
                break
    return out


def _could_be(case, spec) -> list[str]:
    """Lesions (any session) the spec could name, judged from metadata and masks directly."""
    from synth.lesions import LOBES
    lobe_id = {v: k for k, v in LOBES.items()}
    hits = []
    for k, ses in enumerate(case.sessions):
        hemi = ses.anatomy.hemispheres.tensor[0].numpy()
        lobes = ses.anatomy.lobes.tensor[0].numpy()
        for les in ses.lesions:
            m, meta = np.asarray(les.mask, bool), les.meta
            nouns = {meta["cls"], *meta["ontology"]}
            if spec["noun"] not in nouns | {"lesion", "mass", "hyperintensity"}:
                continue
            side_ok = "side" not in spec or meta.get("hemisphere") in (spec["side"], "bilateral", None) or \
                bool((m & (hemi == (1 if spec["side"] == "left" else 2))).any())
            lobe_ok = "lobe" not in spec or meta.get("lobe") in (spec["lobe"], None) or \
                bool((m & (lobes == lobe_id[spec["lobe"]])).any())
            if side_ok and lobe_ok:
                hits.append(f"session {k}: {meta['cls']} {meta.get('hemisphere')} {meta.get('lobe')}")
    return hits


def test_absent_draws_have_empty_targets_on_the_right_grid(cases, always_absent):
    for case in cases:
        first = case.sessions[0].acquisitions[0].volume
        for cat in ("segmentation", "volume", "tissue_removal"):
            exs = _absent_examples(case, cat, 3)
            assert exs, (cat, case.lesion_meta)
            for ex in exs:
                seg = [c for c in ex.vision_calls if c.kind == "segment"]
                assert len(seg) == 1 and seg[0].roi.startswith("absent:")
                t = seg[0].targets[0]
                assert t.same_grid(first) and t.is_label and not bool(t.tensor.any())
                assert "lesion = segment(" in ex.steps[0].code  # the normal program shape
                if cat == "segmentation":
                    assert not bool(ex.outputs["lesion"].tensor.any())
                    assert ex.answer == empty_mask_answer(["lesion"]) and NOT_FOUND.search(ex.answer)
                    assert ", empty; answer: not found" in ex.steps[-1].output
                if cat == "volume":
                    assert ex.measurements["volume"] == {"value": 0.0, "unit": "mL"}


def test_absent_descriptions_never_name_a_present_lesion(cases, always_absent):
    modes = collections.Counter()
    for case in cases:
        for cat in ABSENT_CATEGORIES:
            for ex in _absent_examples(case, cat, 15, seed=1):
                for spec in ex.meta["absent"]:
                    modes[spec["mode"]] += 1
                    assert spec["phrase"].removeprefix("the ") in ex.prompt
                    assert not _could_be(case, spec), (spec, _could_be(case, spec))
                    if spec["mode"] == "no_lesion":
                        assert not any(s.lesions for s in case.sessions)
    assert modes["no_lesion"] and modes["absent_class"] and modes["elsewhere"], modes


def test_describe_absent_rules():
    rng = np.random.default_rng(0)
    glioma = {"cls": "glioma", "ontology": ["neoplasm", "mass", "lesion"], "components": ["edema", "tumor"]}
    cyst = {"cls": "cyst", "ontology": ["lesion"], "components": []}
    sites = [(glioma, {"left"}, {"frontal"}), (cyst, {"left", "right"}, {"temporal"})]
    banned = {"glioma", "neoplasm", "mass", "lesion", "hyperintensity", "edema", "cyst", "cavity"}
    assert lesion_nouns(glioma) == {"glioma", "neoplasm", "mass", "lesion", "hyperintensity", "edema"}
    for _ in range(300):
        phrase, spec = describe_absent(sites, rng, "train", signal_stem="flair")
        assert phrase.startswith("the ") and spec["noun"] in LESION_TERMS
        if spec["mode"] == "absent_class":
            assert spec["noun"] not in banned
        else:
            assert spec["mode"] == "elsewhere" and spec["noun"] in banned
            assert spec.get("side") or spec.get("lobe")
            if spec["noun"] in ("cyst", "cavity"):   # the cyst reaches both sides: only its lobe can differ
                assert spec.get("lobe") not in (None, "temporal")
            if spec["noun"] in ("lesion", "mass", "hyperintensity"):
                assert not (spec.get("side") == "left" and spec.get("lobe") in (None, "frontal"))
                assert spec.get("lobe") != "temporal"
    # a lesion-free case: any noun, including the generic ones
    nouns = {describe_absent([], rng, "train")[1]["noun"] for _ in range(400)}
    assert {"lesion", "mass", "glioma"} <= nouns
    # held-out phrasing: train and eval draws use disjoint synonyms of the noun
    from task_templates.grammar import heldout_flags
    for split, want in (("train", False), ("eval", True)):
        for _ in range(100):
            phrase, spec = describe_absent([], rng, split)
            syn = [t for t, f in zip(LESION_TERMS[spec["noun"]], heldout_flags(LESION_TERMS[spec["noun"]]))
                   if f == want or len(LESION_TERMS[spec["noun"]]) < 3]
            assert any(t in phrase for t in syn), (split, phrase)


def test_location_of_an_absent_target_is_not_found(cases, always_absent):
    for case in cases:
        exs = _absent_examples(case, "location", 4, seed=2)
        assert exs
        for ex in exs:
            assert ex.answer == NOT_FOUND_ANSWER and NOT_FOUND.search(ex.answer)
            assert ex.meta["subtask"] in ("location", "territory")
            assert [c.kind for c in ex.vision_calls] == ["encode"]
            assert ex.steps[-1].code == f"report(answer={NOT_FOUND_ANSWER!r})"


def test_absent_rate_is_the_configured_probability(cases):
    p = catalog.ABSENT_PROB
    assert 0.05 <= p <= 0.2
    rng = np.random.default_rng(3)
    # location on a case with lesions: every draw is a lesion draw
    n = 500
    ab = sum("absent" in tt.sample(cases[0], rng, "location", split="any", execute=False).meta for _ in range(n))
    assert abs(ab / n - p) < 0.045, ab / n
    # lesion-free case: the absent draw is taken at the same rate, otherwise the category is skipped
    got = 0
    for _ in range(n):
        try:
            tt.sample(cases[1], rng, "location", split="any", execute=False)
            got += 1
        except tt.Skip:
            pass
    assert abs(got / n - p) < 0.045, got / n
    # segmentation: among lesion draws (real or absent) the absent share is p
    kinds = collections.Counter()
    for _ in range(n):
        ex = tt.sample(cases[2], rng, "segmentation", split="any", execute=False)
        kinds[ex.vision_calls[0].roi.split(":")[0]] += 1
    share = kinds["absent"] / (kinds["absent"] + kinds["lesion"])
    assert abs(share - p) < 0.07, kinds


def test_other_categories_never_draw_absent_targets(cases, always_absent):
    rng = np.random.default_rng(4)
    for cat in ("extent", "center_of_mass", "intensity", "cropping", "enhancement", "signal"):
        for _ in range(5):
            try:
                ex = tt.sample(cases[0], rng, cat, split="any")
            except tt.Skip:
                continue
            assert "absent" not in ex.meta and not any(c.roi.startswith("absent:") for c in ex.vision_calls)


def test_report_says_not_found_for_an_empty_mask(capsys):
    img = vl.Volume(torch.rand(1, 6, 6, 6), torch.eye(4), "image")
    empty = vl.Volume(torch.zeros(6, 6, 6, dtype=torch.uint8), torch.eye(4), "label")
    full = vl.Volume(torch.ones(6, 6, 6, dtype=torch.uint8), torch.eye(4), "label")
    rt = tt.Runtime(tt.OracleBackend([]), {"t1": (img, 0)})
    rt.report(volumes={"lesion": empty})
    assert rt.result.answer == "not found: the mask 'lesion' is empty" and NOT_FOUND.search(rt.result.answer)
    assert "voxels, empty; answer: not found" in capsys.readouterr().out
    for kwargs in ({"volumes": {"lesion": full}}, {"volumes": {"result": img * 0}},
                   {"answer": "done", "volumes": {"lesion": empty}}):
        rt = tt.Runtime(tt.OracleBackend([]), {"t1": (img, 0)})
        rt.report(**kwargs)
        assert rt.result.answer == kwargs.get("answer")
    assert empty_mask_answer(["a", "b"]) == "not found: the masks 'a', 'b' are empty"


def test_evaluation_scores_absent_targets_by_emptiness(cases, always_absent):
    from voxelprompt.evaluate import score_example, summarize
    ex = _absent_examples(cases[0], "segmentation", 1, seed=5)[0]
    tgt = ex.vision_calls[0].targets[0]
    runs = {"empty": [tgt], "guess": [tgt.new(torch.ones_like(tgt.tensor))], "none": None}
    scores = []
    for name, seg in runs.items():
        run = {"steps": [s.code for s in ex.steps], "errors": [], "stopped": True, "truncated": False,
               "segments": [seg] if seg is not None else [], "report": tt.Report(answer=None)}
        s = score_example(ex, run, {})
        assert s["dice"] == [] and s["absent_empty"] == [name != "guess"]
        scores.append(s)
    out = summarize(scores)
    assert out["absent_n"] == 3 and abs(out["absent_empty_rate"] - 2 / 3) < 1e-9
    assert out["anatomy_dice_mean"] is None and not any(k.startswith("absent") for k in out["dice_per_structure"])
