"""The agent loop, the Python API, transcripts, replay, the CLI and the demo — through the real sandbox.

Scripted policies run ground-truth programs with oracle masks (the atlas truth on the MNI152 T1);
a tiny random-weight checkpoint exercises the in-kernel vision network and the model policy's
greedy decoding. The model-quality end-to-end test needs the trained checkpoint and skips, saying
so, until ``voxelprompt/assets/`` ships one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import voxel_lib as vl
from voxel_lib import shapes
from voxelprompt import data
from voxelprompt.agent import (AgentLimits, Assistant, Conversation, InputError, ReplayError, make_pool,
                               parse_volume_key, prepare_inputs, replay)
from voxelprompt.policy import ScriptedPolicy, Step, find_checkpoint
from voxelprompt.transcript import Transcript, validate, volume_sha256

REPO = Path(__file__).resolve().parent.parent
LEFT_HIPPOCAMPUS = 17
VOLUME_PROGRAM = [
    'left_hippocampus = segment(t1<MOD>)\nvolume = vl.volume(left_hippocampus, "mL")\nprint(volume)',
    'report(measurements={"volume": volume}, volumes={"left_hippocampus": left_hippocampus})',
]


def _mni_truth():
    t1 = vl.load(data.path("mni152_t1"), kind="image").float()
    atlas = vl.load(data.path("aparc_aseg"))
    return t1, atlas.select(LEFT_HIPPOCAMPUS).resample_like(t1, mode="nearest")


def oracle_policy(inputs):
    """Policy factory for the CLI test (``--policy test_agent:oracle_policy``): the volume program
    with the atlas's left hippocampus as the segment() result."""
    atlas = vl.load(data.path("aparc_aseg"))
    t1 = inputs[0].volume
    mask = atlas.select(LEFT_HIPPOCAMPUS).resample_like(t1, mode="nearest")
    return ScriptedPolicy([[Step(VOLUME_PROGRAM[0], masks=[[mask]]), Step(VOLUME_PROGRAM[1])]], source="oracle")


def _phantom(shape=(24, 26, 20), spacing=3.0, radius=12.0):
    aff = vl.ras_grid(shape, spacing)
    g = torch.Generator().manual_seed(0)
    ball = shapes.sphere(shape, aff, (6.0, -3.0, 0.0), radius)
    img = vl.Volume(0.2 * torch.rand(shape, generator=g) + 0.7 * ball.tensor[0].float(), aff)
    return img, ball


@pytest.fixture(scope="module")
def pool():
    p = make_pool(1)
    yield p
    p.close()


# ----------------------------------------------------------------------------------- inputs
def test_inputs_names_sessions_and_metadata_lines(tmp_path):
    img, _ = _phantom()
    ins = prepare_inputs({"t1@2023-04-02": img, "flair@2021-03-01": img, "t1@20210301": img}, copy_dir=tmp_path)
    assert [(i.name, i.session, i.date) for i in ins] == [
        ("flair_1", 0, "2021-03-01"), ("t1_1", 0, "2021-03-01"), ("t1_2", 1, "2023-04-02")]
    assert ins[-1].line() == "t1_2: T1w, 2023-04-02"
    assert all((tmp_path / i.file).is_file() and len(i.sha256) == 64 for i in ins)
    one = prepare_inputs({"t1": img, "flair": img}, dates={"t1": "2022-01-05", "flair": "2022-01-05"})
    assert [i.line() for i in one] == ["t1: T1w, 2022-01-05", "flair: FLAIR, 2022-01-05"]
    assert parse_volume_key("t1ce@2020-01-02") == ("t1c", "2020-01-02")
    with pytest.raises(InputError, match="unknown volume name"):
        prepare_inputs({"brain": img})
    with pytest.raises(InputError, match="give every volume a date, or none"):
        prepare_inputs({"t1@2021-01-01": img, "flair": img})
    with pytest.raises(InputError, match="same session"):
        prepare_inputs({"t1": img, "t1w": img})
    with pytest.raises(InputError, match="not a date"):
        prepare_inputs({"t1@yesterday": img})
    bad = tmp_path / "bad.nii.gz"
    bad.write_text("not a nifti")
    with pytest.raises(InputError):
        prepare_inputs({"t1": bad})


# ----------------------------------------------------------------- MNI: ask, answer, replay
@pytest.fixture(scope="module")
def mni_run(tmp_path_factory, pool):
    t1, truth = _mni_truth()
    out = tmp_path_factory.mktemp("mni")

    def script(state):   # the ground-truth program; segment() returns the atlas truth
        return [Step(VOLUME_PROGRAM[0], masks=[[truth]]), Step(VOLUME_PROGRAM[1])]

    a = Assistant.scripted(script, source="oracle", pool=pool)
    ans = a.ask("what is the volume of the left hippocampus?", volumes={"t1": data.path("mni152_t1")}, out=out)
    a.current.close()
    return ans, t1, truth, out


def test_ask_volume_on_mni_t1_through_the_sandbox(mni_run):
    ans, t1, truth, out = mni_run
    assert ans.ok, ans.message
    truth_ml = float(vl.volume(truth, "mL"))
    m = ans.measurement("volume")
    assert m.unit == "mL" and m.value == pytest.approx(truth_ml, rel=1e-9)
    assert ans.text == f"volume: {truth_ml:.2f} mL"
    steps = ans.steps
    assert [s["output"] for s in steps] == [f"{truth_ml:.2f} mL\n",
                                           f"reported: volume = {truth_ml!r} mL; volume left_hippocampus: "
                                           f"(182, 218, 182) voxels\n"]
    assert all(s["error"] is None and s["duration_s"] > 0 for s in steps)
    # the output mask: NIfTI in the input's geometry, a PNG preview, hashed
    o = ans.outputs["left_hippocampus"]
    back = vl.load(o.path)
    assert back.same_grid(t1) and back.orientation == "LAS" and torch.equal(back.tensor.bool(), truth.tensor.bool())
    assert o.preview.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and o.preview.stat().st_size > 5000
    assert o.sha256 == volume_sha256(back)
    # the transcript: schema-valid, with inputs, model, sandbox and the segment() masks recorded
    tr = Transcript.load(out)
    assert validate(tr.data) == []
    assert tr.data["inputs"][0]["path"] == str(data.path("mni152_t1").resolve())
    assert tr.data["inputs"][0]["shape"] == [182, 218, 182] and tr.data["inputs"][0]["orientation"] == "LAS"
    assert tr.data["model"]["policy"] == "scripted" and tr.data["vision"] == {"backend": "masks", "threshold": 0.5,
                                                                              "source": "oracle"}
    assert tr.data["sandbox"]["mode"] in ("bwrap", "none")
    call = tr.turns[0]["steps"][0]["vision_calls"][0]
    assert call["kind"] == "segment" and call["volumes"] == ["t1"] and call["sessions"] == [0]
    assert call["masks"][0]["sha256"] == volume_sha256(truth.new(truth.tensor.to(torch.uint8)))
    md, html = (out / "transcript.md").read_text(), (out / "transcript.html").read_text()
    assert "segment(t1<MOD>)" in md and "segment(t1&lt;MOD&gt;)" in html and "left_hippocampus.png" in html
    timing = tr.turns[0]["timing"]
    assert {"kernel_start_s", "inputs_s", "report_s", "outputs_s", "total_s"} <= set(timing)


def test_replay_matches_and_detects_changes(mni_run, tmp_path, pool):
    ans, _, _, out = mni_run
    rep = replay(out / "transcript.json", pool=pool)
    assert rep.matches, rep.summary()
    assert len(rep.checks) >= 8 and "every output matches" in rep.summary()
    # a transcript whose recorded result differs is reported, check by check
    forged = tmp_path / "forged"
    shutil.copytree(out, forged)
    doc = json.loads((forged / "transcript.json").read_text())
    doc["turns"][0]["answer"]["measurements"][0]["value"] *= 1.01
    doc["turns"][0]["steps"][0]["output"] = "6.00 mL\n"
    (forged / "transcript.json").write_text(json.dumps(doc))
    rep2 = replay(forged / "transcript.json")
    assert not rep2.matches
    assert {c["what"] for c in rep2.mismatches} == {"question 1 step 1 output", "question 1 measurement 'volume'"}
    # an input that changed since the run is refused before anything runs
    img, _ = _phantom()
    p = vl.save(img, tmp_path / "t1.nii.gz")
    doc["inputs"][0]["path"] = str(p)
    (forged / "transcript.json").write_text(json.dumps(doc))
    with pytest.raises(ReplayError, match="changed since the run"):
        replay(forged / "transcript.json")


# ------------------------------------------------------ conversation: state, errors, limits
def test_follow_ups_keep_state_errors_are_fed_back_and_limits_stop(tmp_path, pool):
    img, ball = _phantom()
    seen = {}

    def script(state):
        if state.turn == 0:
            return [Step("lesion = segment(t1<MOD>)\nv = vl.volume(lesion, 'mL')\nprint(v)", masks=[[ball]]),
                    Step("print(undefined_name)"),
                    Step("x = (1,"),
                    Step("report(measurements={'volume': v})")]
        if state.turn == 1:      # a follow-up: the kernel still has `lesion` and `v`
            seen["outputs"] = [s.output for s in state.steps]
            return [Step("print(round(float(v) * 2, 3))\nreport(answer=f'{float(v):.3f} mL, twice: '"
                         "f'{2 * float(v):.3f}')")]
        if state.turn == 2:
            return [Step("import time\ntime.sleep(30)"), Step("print(v)")]
        if state.turn == 3:
            return [Step(f"i = {k}") for k in range(50)]   # never reports: hits max_steps
        if state.turn == 4:
            return [Step("time.sleep(0.4)") for k in range(50)]   # hits max_seconds
        return [Step("print(undefined_name)") for k in range(5)]  # the same failure twice: stops

    conv = Conversation(prepare_inputs({"t1": img}, copy_dir=tmp_path), ScriptedPolicy(script), out_dir=tmp_path,
                        limits=AgentLimits(max_steps=5, step_timeout=2.0), pool=pool)
    with conv:
        a1 = conv.ask("what is the lesion volume?")
        v = float(vl.volume(ball, "mL"))
        assert a1.ok and a1.measurement("volume").value == pytest.approx(v)
        s = a1.steps
        assert s[1]["error"]["name"] == "NameError"
        assert s[1]["output"] == "NameError: name 'undefined_name' is not defined\n"
        assert "print(undefined_name)" in "".join(s[1]["error"]["traceback"])
        assert s[2]["error"]["name"] == "SyntaxError" and s[2]["duration_s"] == 0.0   # parsed, never run
        assert s[2]["output"].startswith("SyntaxError: ") and s[2]["output"].endswith("(line 1)\n")
        a2 = conv.ask("and twice that?")
        assert a2.ok and a2.text == f"{v:.3f} mL, twice: {2 * v:.3f}"
        assert a2.steps[0]["output"].startswith(f"{round(v * 2, 3)}\n")
        a3 = conv.ask("sleep")
        assert a3.steps[0]["error"]["name"] == "TimeoutError" and not a3.steps[0]["state_lost"]
        assert a3.steps[1]["output"] == f"{v:.2f} mL\n"            # interrupted; variables kept
        a4 = conv.ask("loop")
        assert a4.status == "step_limit" and "5 steps" in a4.message and len(a4.steps) == 5
        assert a4.text is None and a4.measurements == [] and a4.outputs == {}
        conv.limits = AgentLimits(max_steps=50, max_seconds=1.0, step_timeout=2.0)
        a5 = conv.ask("slow")
        assert a5.status == "time_limit" and "1 s" in a5.message and 2 <= len(a5.steps) <= 4
        conv.limits = AgentLimits(max_steps=5, step_timeout=2.0)
        a6 = conv.ask("repeat")
        assert a6.status == "repeated_error" and len(a6.steps) == 2
        assert "NameError: name 'undefined_name' is not defined" in a6.message
    tr = Transcript.load(tmp_path)
    assert [t["status"] for t in tr.turns] == ["done", "done", "done", "step_limit", "time_limit", "repeated_error"]
    assert validate(tr.data) == []


# --------------------------------------------------------- the network backend in the kernel
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    import os

    from voxelprompt.configs import get_config
    from voxelprompt.model import VoxelPrompt
    from voxelprompt.policy import save_checkpoint
    from voxelprompt.tokenizer import Tokenizer
    d = tmp_path_factory.mktemp("ckpt")
    old = os.environ.get("VOXELPROMPT_CACHE")
    os.environ["VOXELPROMPT_CACHE"] = str(tmp_path_factory.mktemp("cache"))   # the kernels' checkpoint copies
    corpus = [f"x{i} = segment(t1<MOD>)\nv{i} = vl.volume(x{i}, 'mL')\nprint(v{i})\nreport(measurements="
              f"{{'volume': v{i}}})\n" for i in range(40)]
    tok = Tokenizer.train(corpus * 3, d / "tokenizer.model", vocab_size=512, threads=1)
    torch.manual_seed(0)
    model = VoxelPrompt(get_config("tiny", vocab_size=tok.vocab_size))
    with torch.no_grad():
        model.vision.out.bias.fill_(0.0)    # an untrained net, biased to segment something
    yield save_checkpoint(model, d / "model.safetensors", tokenizer="tokenizer.model", model_id="tiny-random")
    if old is None:
        os.environ.pop("VOXELPROMPT_CACHE", None)
    else:
        os.environ["VOXELPROMPT_CACHE"] = old


def test_network_vision_runs_in_the_kernel_and_replays(tiny_checkpoint, tmp_path):
    img, _ = _phantom()
    phi = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))
    script = [[Step("lesion = segment(t1<MOD>)\nv = vl.volume(lesion, 'mL')\nprint(v > 0)", phis=phi[:1]),
               Step("encode(t1<MOD>)\nboth = segment(t1<MOD>)\nprint(int(both.tensor.sum()))", phis=phi[1:]),
               Step("report(measurements={'volume': v}, volumes={'lesion': lesion})", phis=phi[:0])]]

    class Recording(ScriptedPolicy):     # sees what the loop feeds back: outputs and ε
        def next_step(self, state):
            eps_seen[:] = [s.eps for s in state.steps]
            return super().next_step(state)

    eps_seen: list = []
    a = Assistant(lambda inputs: Recording(script, vision="network", checkpoint=tiny_checkpoint),
                  checkpoint=tiny_checkpoint)
    with a:
        ans = a.ask("segment the lesion", volumes={"t1": img}, out=tmp_path / "run")
    assert ans.ok, ans.message
    assert ans.steps[0]["output"] == "True\n"
    assert np.allclose(ans.steps[0]["phi"], phi[:1].numpy())
    call = ans.steps[1]["vision_calls"]
    assert [c["kind"] for c in call] == ["encode", "segment"] and len(call[1]["masks"]) == 1
    assert eps_seen[0] is None and tuple(eps_seen[1].shape) == (1, 64)     # ε of encode() came back from the kernel
    mask = ans.outputs["lesion"].volume
    assert mask.is_label and mask.same_grid(img) and 0 < int(mask.tensor.sum()) < mask.tensor.numel()
    tr = Transcript.load(tmp_path / "run")
    assert tr.data["vision"]["backend"] == "network" and tr.data["model"]["checkpoint_sha256"]
    rep = replay(tmp_path / "run" / "transcript.json", out=tmp_path / "replay")
    assert rep.matches, rep.summary()
    assert any(c["what"].endswith("segment masks") for c in rep.checks)
    other = tmp_path / "other.safetensors"
    other.write_bytes(Path(tiny_checkpoint).read_bytes() + b" ")
    with pytest.raises(ReplayError, match="sha256"):
        replay(tmp_path / "run" / "transcript.json", checkpoint=other)


def test_model_policy_decodes_greedily_and_stops_at_the_limits(tiny_checkpoint, tmp_path):
    img, _ = _phantom()
    with Assistant.load(tiny_checkpoint, limits=AgentLimits(max_steps=10, max_step_tokens=20, max_tokens=50)) as a:
        ans = a.ask("what is the volume of the lesion?", volumes={"t1": img}, out=tmp_path)
        assert ans.status == "token_limit" and "max_step_tokens" in ans.message, ans.message   # 20-token garbage
        steps = ans.steps
        assert len(steps) == 1 and steps[0]["tokens"] == 20 and steps[0]["truncated"]
        assert steps[0]["error"]["name"] == "SyntaxError" or steps[0]["error"] is None
        a.current.limits = AgentLimits(max_steps=10, max_step_tokens=20, max_tokens=15)
        ans = a.ask("what is the volume of the lesion?")           # a follow-up, fresh LM context
        assert ans.status == "token_limit" and ans.steps[0]["tokens"] == 15
        assert ans.transcript.turns[1]["header"] == ans.transcript.turns[0]["header"]
        for s in steps:   # φ rows are exactly the generated <MOD>s
            assert len(s["phi"] or []) == s["code"].count("<MOD>")
        m = Transcript.load(tmp_path).data["model"]
        assert m["id"] == "tiny-random" and m["policy"] == "model" and len(m["checkpoint_sha256"]) == 64


# ------------------------------------------------------------- model quality (needs training)
def test_e2e_trained_model_measures_the_left_hippocampus(tmp_path):
    ckpt = find_checkpoint()
    if ckpt is None:
        pytest.skip("no trained checkpoint is shipped in voxelprompt/assets/ (voxelprompt-cpu.safetensors) yet: "
                    "the model-quality end-to-end test runs once training has produced one")
    t1, truth = _mni_truth()
    with Assistant.load() as a:
        tol = float(a.model.meta.get("volume_tolerance", 0.20))
        ans = a.ask("what is the volume of the left hippocampus?", volumes={"t1": data.path("mni152_t1")},
                    out=tmp_path / "run")
    assert ans.ok, ans.message
    got, want = float(ans.measurement("volume").value), float(vl.volume(truth, "mL"))
    assert abs(got - want) <= tol * want, f"{got:.2f} mL vs atlas {want:.2f} mL (tolerance {tol:.0%})"
    rep = replay(tmp_path / "run" / "transcript.json")
    assert rep.matches, rep.summary()


# ----------------------------------------------------------------------------- CLI and demo
def test_cli_ask_json_and_replay(tmp_path, capsys, monkeypatch):
    from voxelprompt.cli import main
    monkeypatch.syspath_prepend(str(REPO / "tests"))
    assert main(["ask", "what is the volume of the left hippocampus?", "-v", f"t1={data.path('mni152_t1')}",
                 "--out", str(tmp_path / "ask"), "--json", "--policy", "test_agent:oracle_policy"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"answer", "measurements", "outputs", "transcript"}
    _, truth = _mni_truth()
    assert out["measurements"][0]["value"] == pytest.approx(float(vl.volume(truth, "mL")))
    png = Path(out["outputs"][0]["preview"])
    assert png.is_file() and Path(out["transcript"]).is_file()
    assert main(["replay", out["transcript"]]) == 0
    assert "every output matches" in capsys.readouterr().out


def test_cli_errors_are_one_line(capsys, tmp_path, monkeypatch):
    from voxelprompt.cli import main
    monkeypatch.syspath_prepend(str(REPO / "tests"))
    assert main(["ask", "x", "-v", "t1=/nonexistent.nii.gz", "--policy", "test_agent:oracle_policy",
                 "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "error: t1: /nonexistent.nii.gz is not a file\n"
    if find_checkpoint() is None:
        assert main(["ask", "x", "-v", f"t1={data.path('mni152_t1')}", "--out", str(tmp_path)]) == 2
        assert "no trained checkpoint" in capsys.readouterr().err
        assert main(["demo", "--checkpoint", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "d")]) == 2
        assert not (tmp_path / "d").exists()
    assert main(["replay", str(tmp_path / "nothing.json")]) == 2
    assert "not a readable transcript" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_scripted(tmp_path):
    from voxelprompt.demo import run_demo
    lines = []
    s = run_demo(tmp_path, scripted=True, resolution=3.0, echo=lines.append)
    assert s["mode"] == "scripted" and "SCRIPTED" in lines[0]
    kinds = [q["kind"] for c in s["cases"] for q in c["questions"]]
    assert kinds == ["volume", "asymmetry", "lesion growth", "characterisation", "crop"]
    for c in s["cases"]:
        assert Path(c["html"]).is_file()
        for q in c["questions"]:
            assert q["status"] == "done"
            for m in q["measurements"]:     # oracle masks: the program reproduces the truth
                assert np.allclose(m["answer"], m["truth"], rtol=1e-6), (q["prompt"], m)
            for p in q["previews"].values():
                assert Path(p).read_bytes()[:4] == b"\x89PNG"
    growth = s["cases"][1]["questions"][0]["measurements"]
    assert growth[0]["name"] == "volume change" and growth[0]["answer"] > 0
    assert "crop" in lines[-1] or any("cropped" in x for x in lines)


def test_docs_show_the_transcript_schema_and_every_command():
    import re

    from voxelprompt.transcript import SCHEMA
    text = (REPO / "docs" / "transcripts.md").read_text()
    block = re.search(r"## JSON Schema.*?```json\n(.*?)```", text, flags=re.S).group(1)
    assert json.loads(block) == SCHEMA
    usage = (REPO / "docs" / "usage.md").read_text()
    for cmd in ("voxelprompt ask", "voxelprompt replay", "voxelprompt serve", "voxelprompt batch", "voxelprompt demo",
                "Assistant.load", "curl"):
        assert cmd in usage
