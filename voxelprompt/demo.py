"""``voxelprompt demo``: representative questions on a real scan and on a synthetic subject.

* the MNI152 T1 (a real scan, shipped with the atlas data): the volume of the left hippocampus,
  the hippocampal asymmetry;
* a synthetic subject with T1, FLAIR and post-contrast T1 at two sessions and a glioma that
  grows between them: the lesion's growth, whether it enhances, a crop around it.

With a trained checkpoint (shipped in ``voxelprompt/assets/`` or ``--checkpoint``) the model
answers; otherwise (``--scripted``, or no checkpoint) the ground-truth programs of the task
catalog run through the same agent loop and sandbox with oracle masks — the plumbing is real, the
"model" is a script, and the summary says so. Each case is one conversation (one kernel; the
questions are follow-ups). Answers, transcripts (JSON/Markdown/HTML) and PNG previews go to
``--out``, and the summary compares every measurement with the truth.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import voxel_lib as vl

from .agent import AgentLimits, Conversation, prepare_inputs
from .policy import ModelPolicy, ScriptedPolicy, Step, load_checkpoint
from .transcript import format_value

#: (category, prompt) of the MNI questions and their labels in the aparc+aseg atlas
MNI_QUESTIONS = [
    ("volume", "what is the volume of the left hippocampus?"),
    ("asymmetry", "compute the bilateral asymmetry of the hippocampus"),
]
SYNTH_CATEGORIES = [("lesion growth", "volume_change"), ("characterisation", "enhancement"),
                    ("crop", "cropping")]


@dataclass
class Question:
    case: str
    kind: str
    prompt: str
    steps: list[Step]                       # the ground-truth program with oracle masks
    truth: dict = field(default_factory=dict)   # name -> {"value", "unit"}
    truth_answer: str | None = None


def mni_questions() -> tuple[dict, list[Question]]:
    """The MNI152 T1 and its questions (truth from the aparc+aseg atlas)."""
    from . import data
    t1_path = data.path("mni152_t1")
    t1 = vl.load(t1_path, kind="image").float()
    atlas = vl.load(data.path("aparc_aseg"))
    lh = atlas.select(17).resample_like(t1, mode="nearest")
    rh = atlas.select(53).resample_like(t1, mode="nearest")
    vol_l, vol_r = vl.volume(lh, "mL"), vl.volume(rh, "mL")
    q1 = Question("MNI152 T1", "volume", MNI_QUESTIONS[0][1], [
        Step('left_hippocampus = segment(t1<MOD>)\nvolume = vl.volume(left_hippocampus, "mL")\nprint(volume)',
             masks=[[lh]]),
        Step('report(measurements={"volume": volume}, volumes={"left_hippocampus": left_hippocampus})')],
        {"volume": {"value": float(vol_l), "unit": "mL"}})
    q2 = Question("MNI152 T1", "asymmetry", MNI_QUESTIONS[1][1], [
        Step('left_hippocampus = segment(t1<MOD>)\nright_hippocampus = segment(t1<MOD>)\n'
             'left = vl.volume(left_hippocampus, "mL")\nright = vl.volume(right_hippocampus, "mL")\nprint(left, right)',
             masks=[[lh], [rh]]),
        Step('asymmetry = vl.asymmetry(left, right)\nprint(asymmetry)\nreport(measurements={"left volume": left, '
             '"right volume": right, "asymmetry index": asymmetry})')],
        {"left volume": {"value": float(vol_l), "unit": "mL"}, "right volume": {"value": float(vol_r), "unit": "mL"},
         "asymmetry index": {"value": float(vl.asymmetry(vol_l, vol_r)), "unit": "%"}})
    return {"t1": t1_path}, [q1, q2]


def synthetic_questions(seed: int = 3, resolution: float = 2.0) -> tuple[dict, dict, list[Question]]:
    """A two-session T1/FLAIR/T1c subject with a growing glioma, and its questions."""
    from synth.anatomy import atlas_available
    from synth.subject import generate_subject
    from task_templates import Case, sample
    subj = generate_subject(seed, anatomy="atlas" if atlas_available() else "phantom", resolution=resolution,
                            protocols=[["t1w", "flair", "t1c"], ["t1w", "flair", "t1c"]], n_lesions=1,
                            lesion_classes=["glioma"], lesion_factors={1: 1.5}, subject_id="demo")
    case = Case.from_subject(subj)
    with tempfile.TemporaryDirectory() as tmp:   # stored as NIfTI, like any scan (float32 affines)
        for s in case.sessions:
            for a in s.acquisitions:
                a.volume = vl.load(vl.save(a.volume, Path(tmp) / f"{a.name}.nii.gz"), kind="image").float()
    volumes, dates = {}, {}
    for s in case.sessions:
        for a in s.acquisitions:
            key = f"{a.stem}@{s.date}"
            volumes[key], dates[key] = a.volume, s.date
    qs = []
    for kind, cat in SYNTH_CATEGORIES:
        ex = None
        for k in range(30):
            ex = sample(case, np.random.default_rng(k), cat, typos=False)
            if any(str(r).startswith("lesion") for r in ex.meta.get("rois", [])):
                break
        steps = []
        calls = [c for c in ex.vision_calls if c.kind == "segment"]
        for i, st in enumerate(ex.steps):
            steps.append(Step(st.code, masks=[list(c.targets) for c in calls if c.step == i]))
        qs.append(Question("synthetic subject", kind, ex.prompt, steps, dict(ex.measurements), ex.answer))
    return volumes, dates, qs


def _scripted(questions: list[Question]) -> ScriptedPolicy:
    return ScriptedPolicy([q.steps for q in questions], source="oracle")


def run_demo(out: str | Path = "voxelprompt-demo", *, checkpoint: str | Path | None = None,
             scripted: bool | None = None, resolution: float = 2.0, echo=print) -> dict:
    """Runs the demo; returns the summary (also written to ``out/summary.json``).

    Args:
        checkpoint: the model (default: the shipped one, if any).
        scripted: force the scripted ground-truth programs (default: when no checkpoint is available).
    """
    out = Path(out)
    t0 = time.perf_counter()
    model = None
    why = None
    if not scripted:
        try:
            model = load_checkpoint(checkpoint)
        except Exception as exc:
            if scripted is False or checkpoint is not None:
                raise
            why = str(exc)
    mode = "model" if model is not None else "scripted"
    if mode == "model":
        echo(f"VoxelPrompt demo — model {model.model_id} ({model.path.name}, sha256 {model.sha256[:12]}…)")
    else:
        echo("VoxelPrompt demo — SCRIPTED: the task catalog's ground-truth programs with oracle masks run through "
             "the real agent loop, sandbox, transcripts and previews" + (f"\n  ({why})" if why else ""))
    out.mkdir(parents=True, exist_ok=True)
    summary = {"mode": mode, "model": model.describe() if model else None, "cases": []}
    cases = []
    echo("preparing the cases (MNI152 T1; a synthetic two-session subject) ...")
    vols, qs = mni_questions()
    cases.append(("mni152", "MNI152 T1 (real scan)", vols, None, qs))
    svols, sdates, sqs = synthetic_questions(resolution=resolution)
    cases.append(("synthetic", "synthetic subject (T1, FLAIR, T1c × 2 sessions, glioma)", svols, None, sqs))
    for folder, title, volumes, dates, questions in cases:
        cdir = out / folder
        inputs = prepare_inputs(volumes, dates, copy_dir=cdir)
        policy = ModelPolicy(model) if model is not None else _scripted(questions)
        echo(f"\n{title}: " + ", ".join(f"{i.name} {'×'.join(map(str, i.volume.shape))}" for i in inputs))
        case_sum = {"case": title, "folder": str(cdir), "questions": []}
        with Conversation(inputs, policy, out_dir=cdir, limits=AgentLimits(max_steps=8),
                          vision_source="oracle" if model is None else None) as conv:
            for k, q in enumerate(questions):
                t = time.perf_counter()
                ans = conv.ask(q.prompt)
                dt_s = time.perf_counter() - t
                echo(f"  [{k + 1}] {q.kind}: {q.prompt}")
                echo(f"      → {ans.text}" + ("" if ans.ok else f"   [{ans.status}: {ans.message}]"))
                got = {m.name: m for m in ans.measurements}
                cmp = []
                for name, tv in q.truth.items():
                    g = got.get(name)
                    cmp.append({"name": name, "truth": tv["value"], "unit": tv["unit"],
                                "answer": None if g is None else g.value})
                    unit = tv["unit"] if tv["unit"] not in (None, "1") else ""
                    echo(f"        {name}: {format_value(g.value) if g else '—'} vs truth "
                         f"{format_value(tv['value'])} {unit}".rstrip())
                if q.truth_answer:
                    echo(f"        truth: {q.truth_answer}")
                for o in ans.outputs.values():
                    echo(f"        output {o.name}: {o.path.relative_to(out)}  preview {o.preview.relative_to(out)}")
                echo(f"        {len(ans.steps)} step(s), {dt_s:.1f} s")
                case_sum["questions"].append({"kind": q.kind, "prompt": q.prompt, "answer": ans.text,
                                              "status": ans.status, "measurements": cmp,
                                              "truth_answer": q.truth_answer,
                                              "outputs": {n: str(o.path) for n, o in ans.outputs.items()},
                                              "previews": {n: str(o.preview) for n, o in ans.outputs.items()},
                                              "steps": len(ans.steps), "seconds": round(dt_s, 3)})
            case_sum["transcript"] = str(conv.transcript.path)
            case_sum["html"] = str(conv.transcript.root / "transcript.html")
        echo(f"  transcript: {case_sum['html']}")
        summary["cases"].append(case_sum)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    echo(f"\ndone in {summary['seconds']} s; summary in {out / 'summary.json'}")
    return summary
