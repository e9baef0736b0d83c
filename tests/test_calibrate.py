"""Mask-threshold calibration: the scoring rule, the choice, and the threshold reaching every user."""

import json

import pytest
import torch

from voxelprompt import calibrate as cal
from voxelprompt.checkpoint import load_model, save_model
from voxelprompt.configs import get_config
from voxelprompt.model import VoxelPrompt
from voxelprompt.policy import checkpoint_threshold


def _ball(shape=(20, 20, 20), r=5.0):
    g = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij"))
    return (g - 10).norm(dim=0)


def test_score_counts_dice_and_empty_absent_masks():
    d = _ball()
    truth = d < 5
    p = (1 - d / 10).clamp(0, 1) * 0.6        # 0.6 at the centre, 0.3 at the target's edge
    calls = [(p, truth, False), (torch.full_like(p, 0.2), torch.zeros_like(truth), True)]
    hi = cal.score(calls, 0.5)                 # too strict: a small core of the ball, absent stays empty
    mid = cal.score(calls, 0.3)                # the ball itself; the absent call (p = 0.2) still empty
    lo = cal.score(calls, 0.1)                 # the absent call now gets a mask everywhere: scores 0
    assert mid["dice"] == pytest.approx(1.0, abs=0.05) and mid["empty_when_absent"] == 1.0
    assert hi["dice"] < 0.3 and lo["empty_when_absent"] == 0.0
    assert mid["score"] > max(hi["score"], lo["score"])
    assert mid["n_present"] == 1 and mid["n_absent"] == 1
    # mask volume / truth volume: ~1 at the right threshold, the whole grid over |ball| at the low one
    assert mid["volume_ratio"] == pytest.approx(1.0, abs=0.15)
    assert lo["volume_ratio"] > 3 * mid["volume_ratio"] and hi["volume_ratio"] < 0.5


def test_calibrate_writes_the_threshold_that_every_loader_reads(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = VoxelPrompt(get_config("tiny", vocab_size=3000))
    path = save_model(model, tmp_path / "m.safetensors", {"step": 1})
    res = cal.calibrate(model, n_subjects=1, resolution=4.0)
    assert res["calls"] > 0 and len(res["table"]) == len(cal.GRID) and res["threshold"] in cal.GRID
    assert res["best"]["score"] >= res["at_0.5"]["score"]
    res["threshold"] = 0.35                    # any grid value: check it travels
    cal.write_threshold(path, res)
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["step"] == 1 and meta["threshold_calibration"]["threshold"] == 0.35
    assert load_model(path).vision.cfg.mask_threshold == 0.35
    assert checkpoint_threshold(path) == 0.35
    # the kernel's staged copy follows a changed JSON even when its size is unchanged
    from voxelprompt.agent import kernel_checkpoint
    monkeypatch.setenv("VOXELPROMPT_CACHE", str(tmp_path / "cache"))
    staged = kernel_checkpoint(path)
    res["threshold"] = 0.45
    cal.write_threshold(path, res)
    staged = kernel_checkpoint(path)
    assert checkpoint_threshold(staged) == 0.45
    from voxelprompt.policy import load_vision
    assert load_vision(staged).cfg.mask_threshold == 0.45


def test_calibrate_scores_each_mask_source_alone():
    """``sources=True``: the free channel and the selected classes, each at its own best threshold;
    the network is left making union masks."""
    torch.manual_seed(0)
    model = VoxelPrompt(get_config("tiny", vocab_size=3000))
    res = cal.calibrate(model, n_subjects=1, resolution=4.0, sources=True)
    assert set(res["sources"]) == {"free", "selection"}
    for r in res["sources"].values():
        assert r["threshold"] in cal.GRID and 0 <= r["score"] <= 1
        assert (r["n_present"], r["n_absent"]) == (res["best"]["n_present"], res["best"]["n_absent"])  # same calls
    assert model.vision.mask_source == "union"
    # a fresh selector (bias −4) selects almost nothing: alone it scores no better than the union
    assert res["sources"]["selection"]["score"] <= res["best"]["score"] + 1e-9


def test_cli_prints_the_table(tmp_path, capsys, monkeypatch):
    torch.manual_seed(0)
    path = save_model(VoxelPrompt(get_config("tiny", vocab_size=3000)), tmp_path / "m.safetensors")
    monkeypatch.setattr(cal, "collect", lambda model, n, resolution=None: [
        ((1 - _ball() / 10).clamp(0, 1) * 0.6, _ball() < 5, False)])
    assert cal.main(["--checkpoint", str(path), "--subjects", "1", "--write"]) == 0
    out = capsys.readouterr().out
    assert "<- chosen" in out and "written to" in out
    assert 0.25 <= checkpoint_threshold(path) <= 0.35
    assert cal.main(["--checkpoint", str(tmp_path / "none.safetensors")]) == 2
