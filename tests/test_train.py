"""Training, resuming, checkpoints and evaluation, end to end on the tiny config (real sampled data)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from voxelprompt import checkpoint, evaluate, train
from voxelprompt.configs import get_config

ARGS = ["--config", "tiny", "--accum", "2", "--workers", "0", "--val-subjects", "1", "--val-every", "2",
        "--data-resolution", "3", "--examples-per-subject", "4", "--quiet", "--warmup", "1", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert train.main(["--out", str(out), "--max-steps", "2", *ARGS]) == 0
    return out


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _stage_from(run, out, *args):
    """Runs a stage started from ``run``'s weights; returns the weights before and after."""
    w0 = checkpoint.load_model(run).state_dict()
    assert train.main(["--out", str(out), "--init", str(run / "ckpt" / "model.safetensors"), *args, *ARGS]) == 0
    return w0, checkpoint.load_model(out).state_dict()


def test_train_writes_checkpoint_and_metrics(run):
    ck = run / "ckpt"
    assert (ck / "model.safetensors").exists() and (ck / "model.json").exists() and (ck / "state.pt").exists()
    st = torch.load(ck / "state.pt", weights_only=False)
    assert st["step"] == 2 and st["examples"] == 4 and st["optimizer"]["state"]
    recs = _records(run)
    tr = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in tr] == [1, 2]
    for r in tr:
        assert math.isfinite(r["ce"]) and r["lr"] > 0 and r["ex_per_s"] > 0 and "wall_s" in r
    val = [r for r in recs if r["kind"] == "val"]
    assert val and math.isfinite(val[0]["ce"]) and val[0]["n"] > 0
    model = checkpoint.load_model(run)
    assert model.config.name == "tiny" and model.config.lm.vocab_size >= 3000
    assert not model.training


def test_resume_continues(run, tmp_path):
    import shutil
    out = tmp_path / "r"
    shutil.copytree(run, out)
    before = torch.load(out / "ckpt" / "state.pt", weights_only=False)
    w0 = checkpoint.load_model(out).state_dict()
    assert train.main(["--out", str(out), "--resume", "--max-steps", "3", *ARGS]) == 0
    after = torch.load(out / "ckpt" / "state.pt", weights_only=False)
    assert after["step"] == 3 and after["examples"] == 6
    assert after["data_round"] == before["data_round"] + 1
    # Adam's step counter continued from the restored optimizer state (2 -> 3)
    steps = [float(s["step"]) for s in after["optimizer"]["state"].values()]
    assert steps and max(steps) == 3.0
    w1 = checkpoint.load_model(out).state_dict()
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)
    tr = [r["step"] for r in _records(out) if r["kind"] == "train"]
    assert tr == [1, 2, 3]
    assert train.main(["--out", str(tmp_path / "none"), "--resume", *ARGS]) == 2


def test_init_from_weights_starts_a_fresh_run(run, tmp_path):
    w0 = checkpoint.load_model(run).state_dict()
    init, fresh = tmp_path / "init", tmp_path / "fresh"
    common = ["--max-steps", "1", *ARGS, "--seed", "7"]
    assert train.main(["--out", str(init), "--init", str(run / "ckpt" / "model.safetensors"), *common]) == 0
    assert train.main(["--out", str(fresh), *common]) == 0
    st = torch.load(init / "ckpt" / "state.pt", weights_only=False)
    assert st["step"] == 1  # a fresh optimizer and counters
    assert st["data_round"] == 4  # a fresh data stream: offset by the 4 examples the weights saw

    def dist(out):
        w = checkpoint.load_model(out).state_dict()
        return sum(float((w0[k] - w[k]).abs().sum()) for k in w0)
    # one step away from the given weights, far closer than a run from a random init
    assert 0 < dist(init) < 0.2 * dist(fresh)


def test_lm_stage_trains_the_language_model_only(run, tmp_path):
    """--stage lm: batched CE steps (+ the selection term); the vision network does not run, so only
    its φ → class selector moves with the language model."""
    out = tmp_path / "lm"
    w0, w1 = _stage_from(run, out, "--stage", "lm", "--batch", "3", "--max-steps", "2")
    assert all(torch.equal(w0[k], w1[k]) for k in w0 if k.startswith("vision.") and not k.startswith("vision.select."))
    assert any(not torch.equal(w0[k], w1[k]) for k in w0 if k.startswith("lm."))
    assert not torch.equal(w0["vision.select.weight"], w1["vision.select.weight"])
    tr = [r for r in _records(out) if r["kind"] == "train"]
    assert [r["step"] for r in tr] == [1, 2] and all(r["dice_loss"] is None for r in tr)
    assert all(r["anatomy_ce"] is None for r in tr) and any(r["select_bce"] for r in tr)
    assert [r["examples"] for r in tr] == [3, 6]


def test_lm_stage_with_vision_and_a_fresh_vision_network(run, tmp_path):
    """--reinit-vision keeps the language model and starts the vision network afresh; with
    --vision-prob 1 the lm stage's batches run their segment calls (a Dice term is logged)."""
    w0, w1 = _stage_from(run, tmp_path / "lmv", "--stage", "lm", "--batch", "4", "--max-steps", "0",
                         "--reinit-vision")
    assert all(torch.equal(w0[k], w1[k]) for k in w0 if k.startswith("lm.") and "phi_head" not in k)
    assert not torch.equal(w0["vision.out.weight"], w1["vision.out.weight"])
    assert not torch.equal(w0["lm.phi_head.0.weight"], w1["lm.phi_head.0.weight"])
    out2 = tmp_path / "lmv2"
    _, w2 = _stage_from(run, out2, "--stage", "lm", "--batch", "4", "--max-steps", "3", "--vision-prob", "1")
    tr = [r for r in _records(out2) if r["kind"] == "train"]
    assert any(r["dice_loss"] is not None for r in tr)
    assert any(not torch.equal(w0[k], w2[k]) for k in w0 if k.startswith("vision."))


def test_eval_synthetic_reports_every_metric(run):
    model = checkpoint.load_model(run)
    res = evaluate.eval_synthetic(model, n=2, seed=5, progress=False, resolution=3.0)
    assert res["n"] == 2
    for key in ("program_exact_match", "execution_success", "anatomy_dice_mean", "lesion_dice_mean",
                "dice_per_structure", "dice_per_lesion_class", "qa_accuracy", "measurement_error",
                "median_volume_error", "per_category", "program_exact_match_train_phrasing"):
        assert key in res
    assert 0.0 <= res["program_exact_match"] <= 1.0 and 0.0 <= res["execution_success"] <= 1.0


def test_run_example_with_oracle_like_model_matches(run):
    """Scoring is right when the program is right: the ground truth scores exact-match 1, Dice 1."""
    from task_templates import Report

    ex, classes = next(evaluate.synthetic_examples(1, seed=11, resolution=3.0))
    seg = [c for c in ex.vision_calls if c.kind == "segment"]
    fake = {"steps": [s.code for s in ex.steps], "errors": [], "stopped": True, "truncated": False,
            "report": Report(), "segments": [list(c.targets) for c in seg], "mod_mismatch": False}
    sc = evaluate.score_example(ex, fake, classes)
    assert sc["exact"] and sc["executed"]
    assert all(d["dice"] == pytest.approx(1.0) for d in sc["dice"])
    assert sc["recovered"] is None                   # nothing failed: not counted either way
    # a step raised, the model rewrote it and finished: not "executed", but "recovered"
    bad = dict(fake, steps=["print(x)"] + fake["steps"], errors=["NameError: name 'x' is not defined"],
               failed=[True] + [False] * len(fake["steps"]))
    sc2 = evaluate.score_example(ex, bad, classes)
    assert not sc2["executed"] and sc2["recovered"] is True
    stuck = dict(bad, failed=[True, False, True], stopped=False)
    sc3 = evaluate.score_example(ex, stuck, classes)
    assert sc3["recovered"] is False
    summary = evaluate.summarize([sc, sc2, sc3])
    assert summary["recovered_after_error"] == 0.5 and summary["recovered_n"] == 2


def test_generated_code_cannot_break_voxel_lib_for_later_examples():
    """Evaluation runs generated code in-process with ``vl`` in reach: what a program rebinds or
    adds in voxel_lib (or its submodules) is undone after the example."""
    import sys

    import voxel_lib
    vmod = sys.modules["voxel_lib.volume"]          # (voxel_lib.volume the attribute is a function)
    volume, Volume = voxel_lib.volume, vmod.Volume
    ns = {"vl": voxel_lib}
    with evaluate._modules_restored(voxel_lib):
        exec("vl.volume = {'mL': 1}\nvl.stray = 3\nimport sys\nsys.modules['voxel_lib.volume'].Volume = None", ns)
        assert isinstance(voxel_lib.volume, dict) and vmod.Volume is None
    assert voxel_lib.volume is volume and vmod.Volume is Volume and not hasattr(voxel_lib, "stray")


def test_cli_dispatch(run, tmp_path, capsys):
    from voxelprompt.cli import main
    out = tmp_path / "res.json"
    assert main(["eval", "real", "--checkpoint", str(run), "--structures", "Left-Hippocampus",
                 "--json", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["n_structures"] == 1 and "Left-Hippocampus" in res["per_structure"]
    assert "volume_rel_error" in res["per_structure"]["Left-Hippocampus"]


def test_default_checkpoint_error_is_clear(monkeypatch, tmp_path):
    monkeypatch.setattr(checkpoint, "DEFAULT_PATH", tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError, match="voxelprompt train"):
        checkpoint.load_model()


def test_plots(run, tmp_path):
    from voxelprompt.plots import main
    png = tmp_path / "c.png"
    assert main([str(run / "metrics.jsonl"), str(png)]) == 0
    assert png.stat().st_size > 1000


def test_plots_lay_stages_end_to_end(run, tmp_path):
    from voxelprompt.plots import _stages, main
    log = run / "metrics.jsonl"
    png = tmp_path / "stages.png"
    assert main([str(log), str(log), str(png)]) == 0 and png.stat().st_size > 1000
    (_, a, _), (_, b, _) = _stages([log, log])
    assert [r["x"] for r in a] == [2, 4]            # examples seen, first stage
    assert [r["x"] for r in b] == [6, 8]            # the second stage continues from there


def test_vision_stage_trains_the_vision_network_under_a_frozen_language_model(run, tmp_path):
    """--stage vision: only φ's head and the vision network move; the anatomy heads' CE is logged."""
    out = tmp_path / "vis"
    w0, w1 = _stage_from(run, out, "--stage", "vision", "--batch", "2", "--max-steps", "2")
    assert all(torch.equal(w0[k], w1[k]) for k in w0 if k.startswith("lm.") and "phi_head" not in k)
    assert any(not torch.equal(w0[k], w1[k]) for k in w0 if k.startswith("vision."))
    assert not torch.equal(w0["vision.anatomy.weight"], w1["vision.anatomy.weight"])
    tr = [r for r in _records(out) if r["kind"] == "train"]
    assert [r["step"] for r in tr] == [1, 2]
    assert all(r["dice_loss"] is not None and r["anatomy_ce"] is not None and r["ce"] == 0 for r in tr)
    val = [r for r in _records(out) if r["kind"] == "val"]
    assert val and math.isfinite(val[0]["anatomy_ce"]) and math.isfinite(val[0]["dice_loss"])
    from voxelprompt import plots       # a vision stage (no code CE) lays out after an earlier stage
    png = plots.plot([run / "metrics.jsonl", out / "metrics.jsonl"], out / "curves.png")
    assert png.stat().st_size > 10_000


def test_vision_stage_on_crops(run, tmp_path, monkeypatch):
    """--crop-mm: the vision stage's segment calls run on crops (smaller grids than validation's
    whole volumes); other stages and a size ≤ 0 are refused."""
    from voxelprompt.model import VisionNet
    shapes = []
    forward = VisionNet.forward

    def spy(self, volumes, phi, anatomy=False):
        shapes.append((self.training, [tuple(v.shape) for v in volumes]))
        return forward(self, volumes, phi, anatomy)
    monkeypatch.setattr(VisionNet, "forward", spy)
    out = tmp_path / "crop"
    w0, w1 = _stage_from(run, out, "--stage", "vision", "--batch", "2", "--max-steps", "2", "--crop-mm", "30")
    assert not torch.equal(w0["vision.anatomy.weight"], w1["vision.anatomy.weight"])
    assert json.loads((out / "run.json").read_text())["args"]["crop_mm"] == 30.0
    voxels = {t: [math.prod(s) for tt, vs in shapes if tt == t for s in vs] for t in (True, False)}
    assert voxels[True] and voxels[False]          # 30 mm of ~150-200 mm heads along two axes
    assert sum(voxels[True]) / len(voxels[True]) < 0.5 * sum(voxels[False]) / len(voxels[False])
    for bad in (["--stage", "lm", "--crop-mm", "30"], ["--stage", "vision", "--crop-mm", "0"]):
        assert train.main(["--out", str(tmp_path / "bad"), *bad, "--max-steps", "1", *ARGS]) == 2


def test_grow_heads_extends_a_trained_network_with_the_lesion_partitions(run, tmp_path):
    """--grow-heads: weights with the three anatomy partitions gain the lesion ones; the vision
    stage then trains all five. A config whose partitions do not extend the weights' is refused."""
    from dataclasses import replace

    from voxelprompt.anatomy_classes import SIZES
    from voxelprompt.model import VoxelPrompt
    m = checkpoint.load_model(run)
    n = sum(SIZES[:3])
    old = VoxelPrompt(replace(m.config, vision=replace(m.config.vision, anatomy_classes=SIZES[:3])))
    old.load_state_dict({k: v[:n] if k.startswith(("vision.anatomy.", "vision.select.")) else v
                         for k, v in m.state_dict().items()})
    w = checkpoint.save_model(old, tmp_path / "three" / "model.safetensors")
    out = tmp_path / "grown"
    assert train.main(["--out", str(out), "--init", str(w), "--grow-heads", "--stage", "vision", "--batch", "2",
                       "--max-steps", "1", *ARGS]) == 0
    g = checkpoint.load_model(out)
    assert g.config.vision.anatomy_classes == SIZES and g.vision.anatomy.weight.shape[0] == sum(SIZES)
    assert float((g.vision.select.bias.detach()[n:] + 4.0).abs().max()) < 0.05      # new rows: fresh, one step in
    recs = [r for r in _records(out) if r["kind"] == "train"]
    assert all(r["anatomy_ce"] is not None and 0 < r["anatomy_dice"] <= 1 and r["select_bce"] > 0 for r in recs)
    with pytest.raises(SystemExit):       # growing and re-initialising the heads exclude each other
        train.main(["--out", str(tmp_path / "both"), "--init", str(w), "--grow-heads", "--reinit-vision"])
    assert train.main(["--out", str(tmp_path / "bad"), "--init", str(run / "ckpt" / "model.safetensors"),
                       "--grow-heads", "--config", "paper", "--max-steps", "1", "--workers", "0", "--quiet"]) == 2
    mlp = tmp_path / "mlp"          # the cpu config's heads have a residual MLP: growing adds it
    assert train.main(["--out", str(mlp), "--init", str(out / "ckpt" / "model.safetensors"), "--grow-heads",
                       "--stage", "vision", "--batch", "2", "--max-steps", "1", *ARGS, "--config", "cpu"]) == 0
    g2 = checkpoint.load_model(mlp)
    assert g2.config.vision.anatomy_hidden == get_config("cpu").vision.anatomy_hidden > 0
    assert g2.vision.anatomy_mlp[2].weight.abs().max() > 0         # one step from zero
    assert g2.config.vision.channels == g.config.vision.channels     # the trained network, not the cpu one
    assert train.main(["--out", str(mlp), "--resume", "--stage", "vision", "--batch", "2", "--max-steps", "2",
                       *ARGS, "--config", "cpu"]) == 0      # the grown network resumes
    assert [r["step"] for r in _records(mlp) if r["kind"] == "train"] == [1, 2]


def test_optimizer_state_follows_parameters_by_name():
    """remap_optimizer_state: Adam moments saved for one registration order land on the same
    parameters in another; a parameter new since the save starts fresh."""
    class Net(torch.nn.Module):
        def __init__(self, order):
            super().__init__()
            for name in order:
                setattr(self, name, torch.nn.Linear(3, {"a": 2, "b": 4, "c": 5}[name]))

    def adam(net):
        return torch.optim.Adam([p for _, p in net.named_parameters()], lr=0.1)
    first = Net("ab")
    opt = adam(first)
    sum(p.sum() * (i + 1) for i, p in enumerate(first.parameters())).backward()
    opt.step()
    names = [n for n, _ in first.named_parameters()]
    second = Net("cba")
    second.load_state_dict(first.state_dict(), strict=False)
    opt2 = adam(second)
    osd = train.remap_optimizer_state(opt.state_dict(), names, [n for n, _ in second.named_parameters()])
    osd["param_groups"] = opt2.state_dict()["param_groups"]
    opt2.load_state_dict(osd)
    saved = dict(zip(names, opt.state_dict()["state"].values()))
    for i, (n, p) in enumerate(second.named_parameters()):
        if n.startswith("c."):
            assert p not in opt2.state or not opt2.state[p]
        else:
            assert torch.equal(opt2.state[p]["exp_avg"], saved[n]["exp_avg"])


def test_bce_max_ratio_flag_reaches_the_saved_config(run, tmp_path):
    """--bce-max-ratio overrides the loaded weights' mask-BCE cap (0 = fully balanced) and is saved
    with the checkpoint; a negative ratio is refused."""
    assert checkpoint.load_model(run).config.bce_max_ratio == 10.0
    _stage_from(run, tmp_path / "balanced", "--bce-max-ratio", "0", "--max-steps", "1")
    assert checkpoint.load_model(tmp_path / "balanced").config.bce_max_ratio is None
    _stage_from(run, tmp_path / "r3", "--bce-max-ratio", "3", "--max-steps", "1")
    assert checkpoint.load_model(tmp_path / "r3").config.bce_max_ratio == 3.0
    assert train.main(["--out", str(tmp_path / "neg"), "--init", str(run / "ckpt" / "model.safetensors"),
                       "--bce-max-ratio", "-1", *ARGS]) == 2
