"""Error-recovery examples: the faulty step really fails with the error shown, the rest runs."""

import numpy as np
import pytest
import torch

from task_templates.example import MOD, Example, Step, VisionCall, VolumeInfo
from voxelprompt.datagen import DataConfig, examples_from_subject
from voxelprompt.recovery import misspell, with_recovery
from voxelprompt.sequence import IGNORE, build_sequence
from voxelprompt.tokenizer import Tokenizer


def _program() -> Example:
    steps = [
        Step(f"left_hippocampus = segment(t1_1{MOD})\nsize = volume(left_hippocampus)\nprint(size)", "3\n"),
        Step("half = size / 2\nprint(half)", "1.5\n"),
        Step('report(measurements={"size": size, "half": half})', "reported\n"),
    ]
    return Example("volume", "how big is the left hippocampus?", [VolumeInfo("t1_1", "T1w")], steps,
                   [VisionCall("segment", 0, ["t1_1"], ["truth"], "left hippocampus")])


def _run(example: Example) -> list[str]:
    """Runs the steps in one namespace (as the kernel does) and returns each step's output."""
    ns = {"t1_1": 1, "segment": lambda v: 3, "volume": lambda m: m,
          "report": lambda **kw: print("reported")}
    outs = []
    for s in example.steps:
        lines = []
        ns["print"] = lambda *a: lines.append(" ".join(map(str, a)) + "\n")
        ns["report"] = lambda **kw: lines.append("reported\n")
        try:
            exec(s.code.replace(MOD, ""), ns)
        except NameError as exc:
            lines.append(f"NameError: {exc}\n")
        outs.append("".join(lines))
    return outs


@pytest.mark.parametrize("kind", ["typo", "rename"])
@pytest.mark.parametrize("seed", range(6))
def test_the_faulty_step_fails_as_shown_and_the_recovered_program_runs(kind, seed):
    ex = with_recovery(_program(), np.random.default_rng(seed), kind)
    assert ex is not None and ex.meta["recovery"] == kind
    faulty = [i for i, s in enumerate(ex.steps) if s.output.startswith("NameError")]
    assert len(faulty) == 1
    outs = _run(ex)
    assert outs == [s.output for s in ex.steps]     # every output (the error included) is what running gives
    i = faulty[0]
    assert not ex.steps[i].target and ex.steps[i + 1].target
    assert len(ex.steps) == 4
    # the vision call of the original step moved with it; a faulty copy (no targets) sits before it
    if i == 0:
        assert [(c.step, bool(c.targets)) for c in ex.vision_calls] == [(0, False), (1, True)]
    if kind == "rename":         # the step that picked the odd name is context; later ones use it
        j = next(k for k, s in enumerate(ex.steps) if not s.target and k != i)
        assert j < i


def test_typo_keeps_the_original_step_after_the_error():
    ex = with_recovery(_program(), np.random.default_rng(1), "typo")
    i = next(i for i, s in enumerate(ex.steps) if not s.target)
    assert ex.steps[i + 1].code == _program().steps[i].code


def test_misspell_avoids_defined_and_builtin_names():
    rng = np.random.default_rng(0)
    taken = {"lesion", "lesion_mask", "lesion_vol", "lesion_1", "lesions", "lesion_seg", "lesion_mm",
             "lesion_volume"}
    assert misspell("lesion", rng, taken) == "lesion_lesion"
    for _ in range(50):
        w = misspell("t1_2", rng, {"t1_2"})
        assert w not in {"t1_2", "np", "vl"} and w.isidentifier()
    assert misspell("x", np.random.default_rng(0), {"x" + s for s in
                                                     ("_mask", "_vol", "_1", "s", "_seg", "_mm", "_volume", "_lesion")}) is None


def test_sequence_masks_the_faulty_step():
    tok = Tokenizer()
    ex = with_recovery(_program(), np.random.default_rng(0), "typo")
    seq = build_sequence(ex, tok)
    base = build_sequence(_program(), tok)
    i = next(i for i, s in enumerate(ex.steps) if not s.target)
    faulty = tok.encode(ex.steps[i].code) + [tok.endstep_id]
    # the recovered sequence has as many targets as the original: the faulty code adds none
    assert int((seq.labels != IGNORE).sum()) == int((base.labels != IGNORE).sum())
    assert len(seq) > len(base) + len(faulty)


def test_generated_training_data_contains_recoveries():
    cfg = DataConfig(resolution=4.0, examples_per_subject=12, recovery_prob=1.0, rich_share=0.0,
                     atlas_share=0.0)
    exs = examples_from_subject(5, cfg)
    rec = [e for e in exs if "recovery" in e.meta]
    assert len(rec) >= len(exs) // 2
    tok = Tokenizer()
    for e in rec:
        seq = build_sequence(e, tok)       # the layout stays valid (<MOD> counts, call slots)
        assert len(seq.calls) == len(e.vision_calls)
        assert any(s.output.startswith("NameError: name '") for s in e.steps)
    assert all("recovery" not in e.meta for e in examples_from_subject(5, DataConfig(
        resolution=4.0, examples_per_subject=4, rich_share=0.0, atlas_share=0.0)))
