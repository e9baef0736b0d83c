"""The measurement harness: native-vs-iso and decode benches, alignment and paraphrase evals.

Everything runs on tiny random models and small synthetic cases (the numbers mean nothing; the
point is that every table is computed and every file written).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch


# ----------------------------------------------------------------------------- native vs iso
def test_iso_grid_keeps_axes_and_field_of_view():
    from voxelprompt.bench_native import iso_grid
    aff = np.diag([0.9, 0.9, 4.0, 1.0])
    aff[:3, 3] = [-80, -100, -70]
    shape, iso = iso_grid((180, 210, 40), aff)
    iso = np.asarray(iso)
    assert shape == [162, 189, 160]
    assert np.allclose(np.linalg.norm(iso[:3, :3], axis=0), 1.0)
    # the first edge of the field of view is kept
    assert np.allclose(iso[:3, 3] - 0.5, aff[:3, 3] - np.array([0.45, 0.45, 2.0]))


def test_sessions_follow_table2():
    from synth.geometry import ACQUISITIONS
    from voxelprompt.bench_native import sample_session
    rng = np.random.default_rng(0)
    for _ in range(5):
        sess = sample_session(3, rng)
        assert len(sess) == 3
        for g in sess:
            assert ACQUISITIONS[g["acquisition"]].table2
            assert min(g["spacing"]) >= 0.8 - 1e-6
            fov = sorted(n * s for n, s in zip(g["shape"], g["spacing"]))
            assert 130 < fov[0] and fov[-1] < 215


def test_native_vs_iso_runs_and_summarizes(tmp_path):
    from voxelprompt.bench_native import main
    out = tmp_path / "nv.json"
    assert main(["--config", "tiny", "--samples", "1", "--inputs", "1", "2", "--fov-scale", "0.2",
                 "--threads", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert len(res["rows"]) == 2
    for k in ("1", "2", "all"):
        d = res["summary"][k]
        for q in ("infer_s", "infer_peak_bytes", "train_peak_bytes"):
            assert d[f"native_{q}"] > 0 and d[f"iso_{q}"] > 0 and d[f"ratio_{q}"] > 0
    # a training step holds at least what inference holds
    r = res["rows"][0]
    assert r["native_train_peak_bytes"] >= r["native_infer_peak_bytes"]


# ----------------------------------------------------------------------------- decode
def test_decode_bench_tiny():
    from voxelprompt.bench_decode import bench_config
    r = bench_config("tiny", prompt=16, gen=4, repeats=1)
    assert r["prefill_tok_s"] > 0 and r["gen_cached_tok_s"] > 0 and r["gen_uncached_tok_s"] > 0


# ----------------------------------------------------------------------------- alignment
@pytest.fixture(scope="module")
def tiny():
    from voxelprompt.configs import get_config
    from voxelprompt.model import VoxelPrompt
    from voxelprompt.tokenizer import Tokenizer
    tok = Tokenizer()
    torch.manual_seed(0)
    return VoxelPrompt(get_config("tiny", vocab_size=tok.vocab_size)).eval(), tok


def test_prompt_variants_and_dice():
    import voxel_lib as vl
    from voxelprompt.alignment import dice_vs, phrase, variants
    attrs = {"side": "left", "lobe": "frontal", "signal": "hyper", "cls": "glioma"}
    v = variants(attrs, "flair", ["edema", "glioma"])
    assert v["decomposition"]["full"] == "the left frontal hyperintense glioma"
    assert v["decomposition"]["generic"] == "the lesion"
    assert v["perturbation"]["side"].startswith("the right frontal")
    assert "edema" in v["perturbation"]["class"]
    assert list(v["ladder"])[-1].startswith("L4") and v["ladder"]["L4 +signal (full)"] == v["decomposition"]["full"]
    assert phrase("glioma", "right") == "the right glioma"
    t = torch.zeros(8, 8, 8, dtype=torch.uint8)
    t[2:4, 2:4, 2:4] = 1
    truth = vl.Volume(t, torch.eye(4, dtype=torch.float64), "label")
    assert dice_vs(None, truth) == 0.0
    assert dice_vs(truth, truth) == 1.0
    empty = truth.new(torch.zeros_like(t), kind="label")
    assert dice_vs(None, empty) == 1.0


def test_alignment_report_on_tiny_model(tiny, tmp_path):
    from voxelprompt.alignment import run_alignment, tables, write_report
    model, tok = tiny
    res = run_alignment(model, tok, n_cases=2, seed=3, resolution=4.0, swap_cases=2, anatomy="phantom",
                        progress=False, max_steps=1, max_tokens=24)
    assert res["n_cases"] == 2
    for k in ("decomposition", "ladder", "perturbation", "swap", "irrelevant", "tests"):
        assert res[k], k
    assert np.asarray(res["swap_matrix"]).shape == (2, 2)
    assert 0.0 <= res["irrelevant"]["empty_rate"] <= 1.0
    assert any(k.startswith("perturbation:") for k in res["tests"])
    md = write_report(res, tmp_path / "rep", "tiny-random")
    text = md.read_text()
    assert "Specificity ladder" in text and "Wilcoxon" in text
    for f in res["plots"]:
        assert (tmp_path / "rep" / f).stat().st_size > 1000
    assert len(res["plots"]) == 4
    json.loads((tmp_path / "rep" / "alignment.json").read_text())
    assert "catastrophic" in tables(res)


def test_paraphrase_on_tiny_model(tiny):
    from voxelprompt.paraphrase import run_paraphrase
    model, tok = tiny
    import voxelprompt.evaluate as ev
    res = run_paraphrase(model, tok, n=2, seed=5, categories=["volume", "segmentation"], resolution=4.0,
                         progress=False)
    assert res["n_pairs"] == 2
    allr = res["per_category"]["all"]
    assert allr["n"] == 2 and set(allr) >= {"train", "eval", "gap_correct", "p", "q"}
    assert ev  # the scoring comes from voxelprompt.evaluate
    p = res["pairs"][0]
    assert p["train"]["category"] == p["eval"]["category"]


def test_cli_wiring_and_missing_checkpoint(tmp_path, capsys):
    from voxelprompt.cli import _BENCHES
    assert {"native-vs-iso", "decode", "e2e"} <= set(_BENCHES)
    from voxelprompt.alignment import main
    assert main(["--checkpoint", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path)]) == 2
    assert "--checkpoint" in capsys.readouterr().err
