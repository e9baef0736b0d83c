"""``voxelprompt eval alignment``: prompt-alignment analysis of lesion segmentation (seeds/000).

Synthetic subjects with known lesions (``synth.subject.generate_subject``, one session) are
prompted with controlled variants of a lesion description (words from ``task_templates.terms``,
the canonical synonym of each term) in the segmentation template ``segment the <roi>``; the model
writes and runs its program exactly as in ``voxelprompt eval synthetic`` (greedy decoding with
the KV cache, in-process execution with the live vision network) and the mask of its first
``segment`` call (first session) is scored with Dice against the target lesion, on the grid of
the first acquisition. A run without a ``segment`` call counts as an empty mask.

Experiments
- **decomposition**: full description (side + lobe + signal + class) vs side-only, lobe-only,
  class-only and generic ("lesion") prompts;
- **perturbation**: the full description with one attribute swapped (side, lobe, signal, class);
  ΔDice = Dice(perturbed) − Dice(full) against the *original* lesion, and the share of
  catastrophic drops |ΔDice| > 0.5;
- **ladder**: L0 "lesion" → L1 class → L2 + side → L3 + lobe → L4 + signal (full);
- **swap**: the full prompt of case i on the images of case j (K × K Dice matrix against case
  j's lesion): matched (diagonal) vs mismatched;
- **irrelevant**: a lesion the case does not have, the right result is an empty mask. Kinds:
  "absent class" (``the edema``), "absent class + side" (``the left edema``) and "present
  class, wrong side" (``the right glioma`` when no lesion that could be called a glioma reaches
  the right hemisphere). Absence follows the rule the training data uses for its absent targets
  (``task_templates.describe.describe_absent``): a lesion of any session answers to every noun of
  ``task_templates.describe.lesion_nouns`` (its class, ontology parents, the generic nouns,
  its components' nouns - an edema component makes "edema" present, a cavity or necrotic part
  "cavity"/"cyst" - and look-alikes: cyst ~ cavity ~ resection cavity), on every side its
  mask or metadata reaches (``task_templates.case.Case.lesion_sites``: a bilateral or unknown
  hemisphere counts as both). An absent class is a class no lesion answers to; the wrong side is
  asked only when no lesion answering to the target's class reaches it (see
  :func:`irrelevant_prompts`). Also asked as a location question ("where is the <absent>?"):
  the answer should say it was not found (counted: "not found"-style answers, no answer, or a
  guessed location).

Statistics: paired two-sided Wilcoxon signed-rank tests (full vs each fragment, full vs each
perturbation, adjacent ladder rungs, matched vs mean mismatched per case) with
Benjamini-Hochberg correction across all tests (``voxel_lib.metrics.paired_wilcoxon``), and
bootstrap 95 % confidence intervals of mean Dice.

Writes ``alignment.json``, ``alignment.md`` and PNG plots into ``--out``; prints the tables.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

LOBE_SWAP = {"frontal": "occipital", "occipital": "frontal", "parietal": "temporal", "temporal": "parietal",
             "insula": "occipital", "cingulate": "temporal"}
SIGNAL_SWAP = {"hyper": "hypo", "hypo": "hyper", "iso": "hyper"}
NOT_FOUND = re.compile(r"\b(not found|no such|not present|absent|none|no lesion|not seen|could not find|"
                       r"cannot find|not detected|no \w+ (?:is|was) (?:found|seen|present))\b", re.I)
EMPTY_VOXELS = 0      # a predicted mask with more voxels than this is "not empty"


# =============================================================================== prompt building
def _signal_stem(case) -> str | None:
    stems = case.stems(0)
    for s in ("flair", "t2", "t1", "ct"):
        if s in stems:
            return s
    return stems[0] if stems else None


def lesion_attrs(meta: dict, signal_stem: str | None) -> dict:
    """side, lobe, signal, cls of a lesion (None where the metadata has none)."""
    from task_templates.describe import _contrast_key
    sig = None
    if signal_stem:
        sig = (meta.get("signal") or {}).get(_contrast_key(signal_stem))
    side = meta.get("hemisphere") if meta.get("hemisphere") in ("left", "right") else None
    return {"side": side, "lobe": meta.get("lobe"), "signal": sig, "cls": meta["cls"]}


def phrase(cls: str | None = None, side: str | None = None, lobe: str | None = None, signal: str | None = None,
           signal_stem: str | None = None) -> str:
    """``the left frontal hyperintense glioma`` (canonical terms; missing parts dropped)."""
    from task_templates.terms import LESION_TERMS, LOBE_ADJ, SIGNAL_ADJ
    words = []
    if side:
        words.append(side)
    if lobe:
        words.append(LOBE_ADJ.get(lobe, lobe))
    if signal:
        words.append(SIGNAL_ADJ[signal]["ct" if signal_stem == "ct" else "mr"][0])
    words.append(LESION_TERMS[cls][0] if cls else "lesion")
    return "the " + " ".join(words)


def seg_prompt(roi_phrase: str) -> str:
    return f"segment {roi_phrase}"


def variants(attrs: dict, signal_stem: str | None, all_classes: list[str]) -> dict[str, dict[str, str]]:
    """Prompt phrases per experiment: {experiment: {variant: phrase}}."""
    a = attrs
    full = phrase(a["cls"], a["side"], a["lobe"], a["signal"], signal_stem)
    out = {"decomposition": {"full": full, "side": phrase(None, a["side"]) if a["side"] else None,
                             "lobe": phrase(None, None, a["lobe"]) if a["lobe"] else None,
                             "class": phrase(a["cls"]), "generic": phrase(None)}}
    other_cls = next((c for c in all_classes if c != a["cls"]), None)
    pert = {}
    if a["side"]:
        pert["side"] = phrase(a["cls"], {"left": "right", "right": "left"}[a["side"]], a["lobe"], a["signal"],
                              signal_stem)
    if a["lobe"]:
        pert["lobe"] = phrase(a["cls"], a["side"], LOBE_SWAP.get(a["lobe"], "frontal"), a["signal"], signal_stem)
    if a["signal"]:
        pert["signal"] = phrase(a["cls"], a["side"], a["lobe"], SIGNAL_SWAP[a["signal"]], signal_stem)
    if other_cls:
        pert["class"] = phrase(other_cls, a["side"], a["lobe"], a["signal"], signal_stem)
    out["perturbation"] = pert
    out["ladder"] = {"L0 generic": phrase(None), "L1 class": phrase(a["cls"]),
                     "L2 +side": phrase(a["cls"], a["side"]),
                     "L3 +lobe": phrase(a["cls"], a["side"], a["lobe"]),
                     "L4 +signal (full)": full}
    out["decomposition"] = {k: v for k, v in out["decomposition"].items() if v}
    return out


def irrelevant_prompts(case, attrs: dict, ci: int, all_classes: list[str]) -> list[tuple[str, str, dict]]:
    """The irrelevant prompts of a case: ``(kind, phrase, {"noun", "side"?})``, each absent by the training rule.

    - "absent class" / "absent class + side": a class no lesion of any session answers to
      (:func:`task_templates.describe.can_be_called` anywhere), chosen round-robin by the case index ``ci``; with the
      target's side in the second;
    - "present class, wrong side": the target's class on the other side, only when no lesion
      answering to that class reaches it (masks and metadata; bilateral/unknown = both sides).
    """
    from task_templates.describe import can_be_called

    sites = case.lesion_sites()
    out = []
    absent = [c for c in all_classes if not can_be_called(sites, c)]
    if absent:
        c = absent[ci % len(absent)]
        out.append(("absent class", phrase(c), {"noun": c}))
        out.append(("absent class + side", phrase(c, attrs["side"]), {"noun": c, "side": attrs["side"]}))
    other = {"left": "right", "right": "left"}[attrs["side"]]
    if not can_be_called(sites, attrs["cls"], other):
        out.append(("present class, wrong side", phrase(attrs["cls"], other), {"noun": attrs["cls"], "side": other}))
    return out


# =============================================================================== running the model
class Prompted:
    """The minimal example :func:`voxelprompt.evaluate.run_example` needs: a prompt and volumes."""

    def __init__(self, prompt: str, volumes):
        self.prompt = prompt
        self.volumes = volumes

    def header(self) -> str:
        return self.prompt + "\n" + "\n".join(v.line() for v in self.volumes)


def case_volumes(case):
    from task_templates import VolumeInfo
    return [VolumeInfo(a.name, a.modality, None, 0, a.volume) for a in case.sessions[0].acquisitions]


class Runner:
    """Runs prompts on cases, caching (prompt, case) results."""

    def __init__(self, model, tok, max_steps: int = 4, max_tokens: int = 200):
        self.model, self.tok = model, tok
        self.max_steps, self.max_tokens = max_steps, max_tokens
        self.cache: dict = {}
        self.calls = 0

    def run(self, prompt: str, case_idx: int, case) -> dict:
        key = (prompt, case_idx)
        if key in self.cache:
            return self.cache[key]
        from .evaluate import run_example
        ex = Prompted(prompt, case_volumes(case))
        self.calls += 1
        try:
            r = run_example(self.model, self.tok, ex, max_steps=self.max_steps, max_tokens=self.max_tokens)
        except Exception as exc:  # noqa: BLE001 - a model failure is a result
            r = {"steps": [], "errors": [f"{type(exc).__name__}: {exc}"], "segments": [], "report": None}
        mask = None
        if r["segments"] and r["segments"][0]:
            mask = r["segments"][0][0]
        rep = r.get("report")
        answer = getattr(rep, "answer", None) if rep is not None else None
        out = {"mask": mask, "answer": answer, "steps": r["steps"], "errors": r["errors"][:2]}
        self.cache[key] = out
        return out


def _on_grid(mask, like):
    if mask is None:
        return None
    if not mask.same_grid(like):
        mask = mask.resample_like(like, mode="nearest")
    t = mask.tensor[0]
    return (t > 0.5) if t.dtype.is_floating_point else (t != 0)


def dice_vs(mask, truth) -> float:
    """Dice of a predicted mask (None = empty) vs a truth mask; 1.0 when both are empty."""
    tb = truth.tensor[0] != 0
    p = _on_grid(mask, truth)
    ps = int(p.sum()) if p is not None else 0
    ts = int(tb.sum())
    if ps + ts == 0:
        return 1.0
    inter = int((p & tb).sum()) if p is not None else 0
    return 2.0 * inter / (ps + ts)


def mask_voxels(mask) -> int:
    if mask is None:
        return 0
    t = mask.tensor[0]
    return int(((t > 0.5) if t.dtype.is_floating_point else (t != 0)).sum())


# =============================================================================== data
def make_cases(n: int, seed: int, resolution: float, anatomy: str = "auto", progress: bool = True):
    """``n`` one-session synthetic cases, each with at least one lateralised lesion: (case, target meta)."""
    from synth.anatomy import atlas_available
    from synth.subject import generate_subject
    from task_templates import Case
    if anatomy == "auto":
        anatomy = "atlas" if atlas_available() else "phantom"
    cases, k = [], 0
    while len(cases) < n and k < 20 * n + 20:
        s = int(np.random.SeedSequence([seed, 777, k]).generate_state(1)[0])
        k += 1
        rng = np.random.default_rng(s)
        try:
            subj = generate_subject(s, anatomy=anatomy, resolution=resolution, n_sessions=1,
                                    protocols=[["t1w", "flair"]], n_lesions=int(rng.integers(1, 3)))
            case = Case.from_subject(subj)
        except Exception as exc:  # noqa: BLE001
            print(f"subject {s}: generation failed: {exc}", file=sys.stderr)
            continue
        metas = case.lesion_meta
        cand = [m for m in metas if m.get("hemisphere") in ("left", "right") and m.get("lobe")]
        if not cand:
            continue
        cases.append((case, cand[0]))
        if progress:
            print(f"  case {len(cases)}/{n}: {len(metas)} lesion(s), target {cand[0]['cls']} "
                  f"{cand[0].get('hemisphere')} {cand[0].get('lobe')}", file=sys.stderr, flush=True)
    return cases, anatomy


def _truth(case, meta):
    from task_templates import ROI
    like = case.sessions[0].acquisitions[0].volume
    t = case.truth(ROI("lesion", str(meta["id"])), 0, like)
    if t is None:
        import voxel_lib as vl
        t = vl.Volume(torch.zeros(like.shape, dtype=torch.uint8), like.affine, "label")
    return t


def _empty_like(case):
    import voxel_lib as vl
    like = case.sessions[0].acquisitions[0].volume
    return vl.Volume(torch.zeros(like.shape, dtype=torch.uint8), like.affine, "label")


# =============================================================================== experiments
def run_alignment(model, tok, n_cases: int = 6, seed: int = 4321, resolution: float | None = None,
                  swap_cases: int = 4, anatomy: str = "auto", progress: bool = True,
                  max_steps: int = 4, max_tokens: int = 200) -> dict:
    from task_templates.terms import CLASS_NAME
    t0 = time.time()
    res_mm = resolution or model.config.vision.min_spacing or 2.0
    cases, anatomy = make_cases(n_cases, seed, res_mm, anatomy, progress)
    runner = Runner(model, tok, max_steps, max_tokens)
    all_classes = sorted(CLASS_NAME)
    per_case = []
    for ci, (case, meta) in enumerate(cases):
        stem = _signal_stem(case)
        attrs = lesion_attrs(meta, stem)
        truth = _truth(case, meta)
        var = variants(attrs, stem, all_classes)
        rec = {"case": ci, "subject": case.subject_id, "target": {**attrs, "id": meta["id"]},
               "truth_voxels": int((truth.tensor != 0).sum()), "experiments": {}}
        for exp, vs in var.items():
            rec["experiments"][exp] = {}
            for name, ph in vs.items():
                r = runner.run(seg_prompt(ph), ci, case)
                rec["experiments"][exp][name] = {"prompt": seg_prompt(ph), "dice": dice_vs(r["mask"], truth),
                                                 "voxels": mask_voxels(r["mask"]),
                                                 "segment_ran": r["mask"] is not None,
                                                 "first_step": (r["steps"] or [""])[0][:300], "errors": r["errors"]}
        # irrelevant: absent class (any side), and the present class on a side no lesion of it reaches
        rec["irrelevant"] = []
        empty = _empty_like(case)
        for kind, ph, _spec in irrelevant_prompts(case, attrs, ci, all_classes):
            r = runner.run(seg_prompt(ph), ci, case)
            rq = runner.run(f"where is {ph}?", ci, case)
            ans = rq["answer"]
            qa = "not found" if ans and NOT_FOUND.search(ans) else ("no answer" if not ans else "guess")
            rec["irrelevant"].append({"kind": kind, "prompt": seg_prompt(ph), "voxels": mask_voxels(r["mask"]),
                                      "empty": mask_voxels(r["mask"]) <= EMPTY_VOXELS,
                                      "segment_ran": r["mask"] is not None,
                                      "first_step": (r["steps"] or [""])[0][:300], "errors": r["errors"],
                                      "dice_vs_empty": dice_vs(r["mask"], empty),
                                      "qa_prompt": f"where is {ph}?", "qa_answer": ans, "qa": qa})
        per_case.append(rec)
        if progress:
            full = rec["experiments"]["decomposition"]["full"]["dice"]
            print(f"  case {ci + 1}/{len(cases)} done: full-prompt Dice {full:.3f} "
                  f"({runner.calls} model runs, {time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    # cross-case swap
    k = min(swap_cases, len(cases))
    swap = np.zeros((k, k))
    for i in range(k):       # prompt of case i
        case_i, meta_i = cases[i]
        ph = var_full(case_i, meta_i)
        for j in range(k):   # on images of case j
            case_j, meta_j = cases[j]
            r = runner.run(seg_prompt(ph), j, case_j)
            swap[i, j] = dice_vs(r["mask"], _truth(case_j, meta_j))
    out = {"n_cases": len(cases), "seed": seed, "resolution_mm": res_mm, "anatomy": anatomy,
           "cases": per_case, "swap_matrix": swap.tolist(), "model_runs": runner.calls}
    out.update(summarize(per_case, swap))
    out["wall_s"] = round(time.time() - t0, 1)
    return out


def var_full(case, meta) -> str:
    stem = _signal_stem(case)
    a = lesion_attrs(meta, stem)
    return phrase(a["cls"], a["side"], a["lobe"], a["signal"], stem)


def _stats(v):
    from voxel_lib.metrics import bootstrap_ci
    v = [x for x in v if x is not None]
    if not v:
        return {"n": 0, "mean": None, "std": None, "ci95": None}
    est, lo, hi = bootstrap_ci(v, n=1000)
    return {"n": len(v), "mean": est, "std": float(np.std(v)), "median": float(np.median(v)), "ci95": [lo, hi]}


def summarize(per_case: list[dict], swap: np.ndarray) -> dict:
    from voxel_lib.metrics import paired_wilcoxon
    out = {}
    comparisons = {}
    for exp in ("decomposition", "ladder"):
        names = []
        for r in per_case:
            for k in r["experiments"][exp]:
                if k not in names:
                    names.append(k)
        out[exp] = {k: _stats([r["experiments"][exp].get(k, {}).get("dice") for r in per_case]) for k in names}
        for k in names:
            out[exp][k]["empty_share"] = float(np.mean([r["experiments"][exp][k]["voxels"] == 0 for r in per_case
                                                        if k in r["experiments"][exp]] or [np.nan]))
    for k in out["decomposition"]:
        if k == "full":
            continue
        pairs = [(r["experiments"]["decomposition"]["full"]["dice"], r["experiments"]["decomposition"][k]["dice"])
                 for r in per_case if k in r["experiments"]["decomposition"]]
        if pairs:
            comparisons[f"decomposition: full vs {k}"] = tuple(map(list, zip(*pairs)))
    rungs = list(out["ladder"])
    for a, b in zip(rungs, rungs[1:]):
        pairs = [(r["experiments"]["ladder"][a]["dice"], r["experiments"]["ladder"][b]["dice"]) for r in per_case]
        comparisons[f"ladder: {a} vs {b}"] = tuple(map(list, zip(*pairs)))
    pert = {}
    for r in per_case:
        full = r["experiments"]["decomposition"]["full"]["dice"]
        for k, v in r["experiments"]["perturbation"].items():
            pert.setdefault(k, []).append((full, v["dice"]))
    out["perturbation"] = {}
    for k, pairs in pert.items():
        d = [b - a for a, b in pairs]
        out["perturbation"][k] = {"n": len(d), "mean_delta_dice": float(np.mean(d)),
                                  "median_abs_delta_dice": float(np.median(np.abs(d))),
                                  "catastrophic_share": float(np.mean(np.abs(d) > 0.5)),
                                  "catastrophic": int(np.sum(np.abs(d) > 0.5)),
                                  "empty_share": float(np.mean([v["voxels"] == 0 for r in per_case
                                                                for kk, v in r["experiments"]["perturbation"].items()
                                                                if kk == k]))}
        comparisons[f"perturbation: full vs {k} swapped"] = tuple(map(list, zip(*pairs)))
    k = swap.shape[0]
    if k >= 2:
        diag = [float(swap[i, i]) for i in range(k)]
        off = [float(swap[i, j]) for i in range(k) for j in range(k) if i != j]
        off_per_case = [float(np.mean([swap[i, j] for i in range(k) if i != j])) for j in range(k)]
        out["swap"] = {"matched": _stats(diag), "mismatched": _stats(off),
                       "mismatched_empty_share": None}
        comparisons["swap: matched vs mismatched (per image)"] = ([float(swap[j, j]) for j in range(k)], off_per_case)
    irr = [x for r in per_case for x in r["irrelevant"]]
    out["irrelevant"] = {"n": len(irr), "empty_rate": float(np.mean([x["empty"] for x in irr])) if irr else None,
                         "qa_not_found_rate": float(np.mean([x["qa"] == "not found" for x in irr])) if irr else None,
                         "qa_no_answer_rate": float(np.mean([x["qa"] == "no answer" for x in irr])) if irr else None,
                         "qa_guess_rate": float(np.mean([x["qa"] == "guess" for x in irr])) if irr else None,
                         "segment_ran": int(sum(x["segment_ran"] for x in irr)),
                         "empty_rate_when_segment_ran": (float(np.mean([x["empty"] for x in irr if x["segment_ran"]]))
                                                         if any(x["segment_ran"] for x in irr) else None),
                         "by_kind": {}}
    runs = [v for r in per_case for e in r["experiments"].values() for v in e.values()]
    out["segment_ran_share"] = float(np.mean([v["segment_ran"] for v in runs])) if runs else None
    for kind in sorted({x["kind"] for x in irr}):
        sub = [x for x in irr if x["kind"] == kind]
        out["irrelevant"]["by_kind"][kind] = {"n": len(sub), "empty_rate": float(np.mean([x["empty"] for x in sub]))}
    out["tests"] = paired_wilcoxon(comparisons) if comparisons else {}
    return out


# =============================================================================== report
def _f(x, d=3):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{d}f}"


def tables(res: dict) -> str:
    """The results as Markdown tables (also printed)."""
    L = []
    L.append(f"cases: {res['n_cases']} ({res['anatomy']} anatomy, {res['resolution_mm']} mm), "
             f"model runs: {res['model_runs']}, wall {res.get('wall_s', '-')} s\n")
    for exp, title in (("decomposition", "Sub-prompt decomposition"), ("ladder", "Specificity ladder")):
        L.append(f"### {title}\n")
        L.append("| prompt | n | mean Dice | 95 % CI | empty masks |")
        L.append("|---|---|---|---|---|")
        for k, s in res[exp].items():
            ci = "-" if not s.get("ci95") else f"[{_f(s['ci95'][0])}, {_f(s['ci95'][1])}]"
            L.append(f"| {k} | {s['n']} | {_f(s['mean'])} | {ci} | {_f(s.get('empty_share'), 2)} |")
        L.append("")
    L.append("### Attribute perturbation (ΔDice vs the full prompt, against the original lesion)\n")
    L.append("| swapped | n | mean ΔDice | median abs ΔDice | catastrophic (abs ΔDice > 0.5) | empty masks |")
    L.append("|---|---|---|---|---|---|")
    for k, s in res["perturbation"].items():
        L.append(f"| {k} | {s['n']} | {_f(s['mean_delta_dice'])} | {_f(s['median_abs_delta_dice'])} | "
                 f"{s['catastrophic']}/{s['n']} ({100 * s['catastrophic_share']:.0f} %) | {_f(s['empty_share'], 2)} |")
    L.append("")
    if "swap" in res:
        L.append("### Cross-case prompt swap (rows: prompt of case i; columns: images of case j)\n")
        m = res["swap_matrix"]
        L.append("| prompt \\ image | " + " | ".join(f"case {j}" for j in range(len(m))) + " |")
        L.append("|---|" + "---|" * len(m))
        for i, row in enumerate(m):
            L.append(f"| case {i} | " + " | ".join(("**" + _f(v) + "**") if i == j else _f(v)
                                                  for j, v in enumerate(row)) + " |")
        L.append(f"\nmatched Dice {_f(res['swap']['matched']['mean'])}, "
                 f"mismatched {_f(res['swap']['mismatched']['mean'])}\n")
    ir = res["irrelevant"]
    L.append("### Irrelevant prompts (target absent: the right answer is an empty mask / 'not found')\n")
    L.append("| kind | n | empty masks |")
    L.append("|---|---|---|")
    for k, s in ir["by_kind"].items():
        L.append(f"| {k} | {s['n']} | {100 * s['empty_rate']:.0f} % |")
    if ir["n"]:
        L.append(f"| **all** | {ir['n']} | **{100 * ir['empty_rate']:.0f} %** |")
        L.append(f"\nA run whose program never executes a segment call counts as an empty mask. Segment calls "
                 f"that ran: {ir['segment_ran']}/{ir['n']} on irrelevant prompts"
                 + (f" (empty among them: {100 * ir['empty_rate_when_segment_ran']:.0f} %)"
                    if ir["empty_rate_when_segment_ran"] is not None else
                    " — **the empty rate is vacuous: the model never ran a segment call**")
                 + f"; on the target prompts {100 * (res.get('segment_ran_share') or 0):.0f} % of runs executed a "
                 "segment call.")
        L.append(f"\nlocation question on the absent target: 'not found' {100 * ir['qa_not_found_rate']:.0f} %, "
                 f"no answer {100 * ir['qa_no_answer_rate']:.0f} %, a guessed location "
                 f"{100 * ir['qa_guess_rate']:.0f} %\n")
    L.append("### Wilcoxon signed-rank (two-sided, paired), Benjamini-Hochberg q\n")
    L.append("| comparison | n | median difference | p | q |")
    L.append("|---|---|---|---|---|")
    for k, t in res["tests"].items():
        L.append(f"| {k} | {t['n']} | {_f(t.get('median_difference'))} | {_f(t.get('p'), 4)} | {_f(t.get('q'), 4)} |")
    return "\n".join(L) + "\n"


def plots(res: dict, out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    files = []
    cases = res["cases"]

    def box(exp, fname, title):
        names = list(res[exp])
        data = [[r["experiments"][exp][k]["dice"] for r in cases if k in r["experiments"][exp]] for k in names]
        fig, ax = plt.subplots(figsize=(1.3 * len(names) + 2, 3.5))
        ax.boxplot(data, showmeans=True)
        ax.set_xticks(range(1, len(names) + 1), names, rotation=20)
        for i, d in enumerate(data):
            ax.scatter(np.full(len(d), i + 1) + np.random.default_rng(i).uniform(-0.08, 0.08, len(d)), d, s=10,
                       alpha=0.6)
        ax.set_ylabel("Dice")
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(title)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        files.append(fname)

    box("decomposition", "alignment_decomposition.png", "Sub-prompt decomposition")
    box("ladder", "alignment_ladder.png", "Specificity ladder")
    names = list(res["perturbation"])
    if names:
        full = {r["case"]: r["experiments"]["decomposition"]["full"]["dice"] for r in cases}
        data = [[r["experiments"]["perturbation"][k]["dice"] - full[r["case"]] for r in cases
                 if k in r["experiments"]["perturbation"]] for k in names]
        fig, ax = plt.subplots(figsize=(1.3 * len(names) + 2, 3.5))
        ax.boxplot(data, showmeans=True)
        ax.set_xticks(range(1, len(names) + 1), [f"swap {k}" for k in names])
        for y in (-0.5, 0.5):
            ax.axhline(y, color="r", ls="--", lw=0.8)
        ax.set_ylabel("ΔDice vs full prompt")
        ax.set_ylim(-1.05, 1.05)
        ax.set_title("Attribute perturbation")
        fig.tight_layout()
        fig.savefig(out / "alignment_perturbation.png", dpi=110)
        plt.close(fig)
        files.append("alignment_perturbation.png")
    m = np.asarray(res["swap_matrix"])
    if m.size:
        fig, ax = plt.subplots(figsize=(3.8, 3.4))
        im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", color="w", fontsize=8)
        ax.set_xlabel("images of case j")
        ax.set_ylabel("prompt of case i")
        ax.set_title("Cross-case prompt swap (Dice)")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(out / "alignment_swap.png", dpi=110)
        plt.close(fig)
        files.append("alignment_swap.png")
    return files


def write_report(res: dict, out: Path, checkpoint: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    files = plots(res, out)
    res["plots"] = files
    md = [f"# Prompt alignment (seeds/000 protocol)\n", f"checkpoint: `{checkpoint}`"
          + (f" (step {res['checkpoint_step']})" if res.get("checkpoint_step") is not None else "") + "\n",
          tables(res)]
    md += [f"![{f}]({f})\n" for f in files]
    p = out / "alignment.md"
    p.write_text("\n".join(md))
    (out / "alignment.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    return p


# =============================================================================== CLI
def load_for_eval(checkpoint: str | None, device: str = "cpu"):
    """(model, tokenizer, step) from a checkpoint (default: the shipped one)."""
    from .checkpoint import config_path, load_model
    from .tokenizer import Tokenizer
    model = load_model(checkpoint, device)
    step = None
    try:
        from .checkpoint import DEFAULT_PATH
        p = Path(checkpoint) if checkpoint else DEFAULT_PATH
        if p.is_dir():
            p = p / "ckpt" / "model.safetensors"
        step = json.loads(config_path(p).read_text()).get("step")
    except Exception:  # noqa: BLE001 - the step is informative only
        pass
    return model, Tokenizer(), step


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="voxelprompt eval alignment", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None,
                   help="a .safetensors file or training run dir (default: the shipped model)")
    p.add_argument("--cases", type=int, default=6, help="synthetic cases (default 6)")
    p.add_argument("--swap-cases", type=int, default=4, help="cases in the prompt-swap matrix (default 4)")
    p.add_argument("--seed", type=int, default=4321)
    p.add_argument("--resolution", type=float, default=None,
                   help="synthetic working resolution, mm (default: the model's floor, else 2)")
    p.add_argument("--anatomy", choices=("atlas", "phantom", "auto"), default="auto")
    p.add_argument("--out", default="alignment-report", help="report directory (default ./alignment-report)")
    p.add_argument("--json", dest="json_path", default=None, help="also write the JSON here")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1, see docs/benchmarks.md; 0 = torch's default)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model, tok, step = load_for_eval(args.checkpoint, args.device)
    except FileNotFoundError as exc:
        print(f"error: {exc} (pass --checkpoint PATH)", file=sys.stderr)
        return 2
    res = run_alignment(model, tok, args.cases, args.seed, args.resolution, args.swap_cases, args.anatomy)
    res["checkpoint"] = str(args.checkpoint or "default")
    res["checkpoint_step"] = step
    p = write_report(res, Path(args.out), res["checkpoint"])
    print(tables(res))
    print(f"wrote {p} and {Path(args.out) / 'alignment.json'}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(res, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
