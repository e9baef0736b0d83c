"""Tokenizer, token layout, vision network geometry and the joint model (tiny sizes, CPU)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

import voxel_lib as vl
from task_templates.example import Example, Step, VisionCall, VolumeInfo
from voxelprompt.configs import get_config
from voxelprompt.model import (VisionNet, VoxelPrompt, _target_on, pool_factors, pyramid, resample,
                               sampling_grid, shared_grid)
from voxelprompt.sequence import IGNORE, build_sequence, header_ids, output_ids
from voxelprompt.tokenizer import RECORD_SEP, Tokenizer, corpus_texts

torch.set_num_threads(2)

CODE = '''def f(mask):
    if vl.volume(mask) > 0:
\treturn  mask   # tab, two spaces
    return None

x = segment(t1<MOD>, flair<MOD>)<ENDSTEP>
print(f"{vl.volume(x).to('mL'):.2f} mL")  \u00e9\u4e2d
'''


def _vol(shape, spacing, rot=(0, 0, 0), center=(0, 0, 0), seed=0):
    g = torch.Generator().manual_seed(seed)
    return vl.Volume(torch.rand(*shape, generator=g), vl.rotation_affine(rot) @ vl.ras_grid(shape, spacing, center))


def _example() -> Example:
    def lesion(v):   # a bright 6 mm sphere on a noisy background
        return (v.world_coordinates() - torch.tensor([3.0, -2.0, 1.0]).view(3, 1, 1, 1)).norm(dim=0) < 6

    t1 = _vol((12, 14, 10), (2.0, 2.0, 2.0), (0, 0, 8), seed=1)
    flair = _vol((11, 12, 5), (2.0, 2.2, 4.5), (6, 0, 0), (1, -1, 0), seed=2)
    t1, flair = (v.new(0.3 * v.tensor + 0.6 * lesion(v)) for v in (t1, flair))
    truth = t1.new(lesion(t1).to(torch.uint8), kind="label")
    steps = [
        Step("mask = segment(t1<MOD>, flair<MOD>)\nprint(f\"{vl.volume(mask).to('mL'):.2f} mL\")",
             "12.34 mL"),
        Step("e = encode(t1<MOD>)\nif e.label == 'hyper':\n    print('hyperintense')\nelse:\n    print('other')",
             "hyperintense"),
    ]
    return Example("volume", "What is the volume of the lesion?",
                   [VolumeInfo("t1", "T1w", "2021-03-01", 0, t1), VolumeInfo("flair", "FLAIR", "2021-03-01", 0, flair)],
                   steps, [VisionCall("segment", 0, ["t1", "flair"], [truth]), VisionCall("encode", 1, ["t1"])])


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    ex = _example()
    corpus = [ex.header(), CODE] + [s.code for s in ex.steps] + [s.output for s in ex.steps]
    corpus += [f"x{i} = segment(t{i}<MOD>)\n    print(vl.volume(x{i}))\n" for i in range(50)]
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    Tokenizer.train(corpus * 3, path, vocab_size=400, threads=1)
    return Tokenizer(path)


def _example_with_anatomy() -> Example:
    """``_example()`` with anatomy truth: classes 1 and 2 split the grid, class 3 is the first
    segment call's target."""
    ex = _example()
    t1 = ex.volumes[0].volume
    lab = torch.zeros((3, *t1.shape), dtype=torch.uint8)
    lab[0, :6], lab[0, 6:] = 1, 2
    lab[0][ex.vision_calls[0].targets[0].tensor[0].bool()] = 3
    ex.anatomy = {0: vl.Volume(lab, t1.affine, "label")}
    return ex


def _model(tok, seed=0, **vision):
    torch.manual_seed(seed)
    cfg = get_config("tiny", vocab_size=tok.vocab_size)
    if vision:
        cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, **vision))
    return VoxelPrompt(cfg)


# ----------------------------------------------------------------------------------- tokenizer
def test_tokenizer_round_trip(tok):
    ids = tok.encode(CODE)
    assert tok.decode(ids) == CODE
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.mod_id, tok.endstep_id, tok.out_id,
            tok.stop_id) == tuple(range(8))
    assert ids.count(tok.mod_id) == 2 and ids.count(tok.endstep_id) == 1
    assert tok.encode("<OUT><STOP>") == [tok.out_id, tok.stop_id]
    assert tok.unk_id not in ids                       # byte fallback covers anything
    assert tok.decode([tok.bos_id, *tok.encode("  a\n"), tok.eos_id]) == "  a\n"


def test_corpus_file_and_reload(tok, tmp_path):
    (tmp_path / "c.txt").write_text(RECORD_SEP.join(["a = 1\n", "  b\n\n", ""]))
    assert list(corpus_texts(tmp_path / "c.txt")) == ["a = 1\n", "  b\n\n"]
    tok.save(tmp_path / "t.model")
    assert Tokenizer(tmp_path / "t.model").encode(CODE) == tok.encode(CODE)


# ------------------------------------------------------------------------------------ layout
def test_sequence_layout(tok):
    ex = _example()
    seq = build_sequence(ex, tok)
    ids = seq.ids.tolist()
    head = header_ids(tok, ex.header())
    assert ids[:len(head)] == head and ids[-1] == tok.stop_id
    assert [ids[p] for p in seq.mod_positions.tolist()] == [tok.mod_id] * 3
    # targets: exactly the code tokens, <ENDSTEP> and <STOP>
    code_len = sum(len(tok.encode(s.code)) + 1 for s in ex.steps) + 1
    assert int((seq.labels != IGNORE).sum()) == code_len
    tgt = seq.labels[seq.labels != IGNORE].tolist()
    assert tgt.count(tok.endstep_id) == 2 and tgt[-1] == tok.stop_id and tok.out_id not in tgt
    # the encode call's ε slot sits right after step 1's <OUT>, followed by its output
    seg, enc = seq.calls
    assert seg.kind == "segment" and seg.mods == [0, 1] and enc.mods == [2] and not seg.eps_positions
    (p,) = enc.eps_positions
    assert ids[p - 1] == tok.out_id and ids[p] == tok.pad_id
    assert ids[p + 1:p + 1 + len(output_ids(tok, "hyperintense"))] == output_ids(tok, "hyperintense")
    assert seq.eps_blocks == [(p, [1])]
    bad = _example()
    bad.vision_calls[0].volumes = ["t1"]
    with pytest.raises(ValueError, match="<MOD>"):
        build_sequence(bad, tok)


# ------------------------------------------------------------------------------ geometry
def test_pooling_follows_anisotropy():
    sp = [tuple(round(s, 6) for s in torch.linalg.norm(a[:3, :3], dim=0).tolist())
          for _, a in pyramid((64, 64, 12), torch.diag(torch.tensor([1.0, 1.0, 5.0, 1.0], dtype=torch.float64)), 5)]
    assert sp == [(1, 1, 5), (2, 2, 5), (4, 4, 5), (8, 8, 10), (16, 16, 20)]
    assert pool_factors((1, 1, 1), (4, 4, 1)) == (2, 2, 1)          # never pool a 1-voxel axis
    assert pool_factors((0.5, 2, 2), (1, 40, 40)) == (1, 2, 2)      # ...nor let it block the others


def test_resample_is_world_space():
    src = _vol((20, 24, 18), (2.0, 1.5, 3.0), (5, 10, -7), (1, 2, 3))
    dst = _vol((15, 17, 13), (1.7, 1.7, 2.1), (-3, 4, 20))
    out = resample(src.world_coordinates()[None], src.affine, dst.shape, dst.affine)[0]
    ijk = torch.as_tensor(src.world_to_voxel(dst.world_coordinates().permute(1, 2, 3, 0).numpy()))
    inside = ((ijk >= 0) & (ijk <= torch.tensor(src.shape) - 1)).all(-1)
    assert inside.float().mean() > 0.9
    assert (out - dst.world_coordinates()).abs().amax(0)[inside].max() < 1e-3
    _, half = sampling_grid(src.shape, src.affine, dst.shape, dst.affine)
    assert half[inside].all()
    shape, aff = shared_grid([src.shape], [src.affine])                # one volume: its own grid
    assert shape == src.shape and torch.allclose(aff, src.affine, atol=1e-6)


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_unet_shapes_and_geometry(n):
    torch.manual_seed(0)
    specs = [((12, 14, 10), (2.0, 2.0, 2.0), (0, 0, 0)), ((16, 15, 4), (1.2, 1.2, 5.0), (10, 0, 5)),
             ((9, 11, 13), (2.5, 2.0, 2.0), (0, 20, 0)), ((7, 20, 9), (3.0, 1.0, 2.5), (-15, 5, 30)),
             ((10, 10, 10), (2.2, 2.2, 2.2), (0, 0, 45))]
    vols = [_vol(s, sp, r, (i, -i, 0), seed=i) for i, (s, sp, r) in enumerate(specs[:n])]
    net = VisionNet(get_config("tiny").vision, embed_dim=64)
    phi = torch.randn(n, 32)
    with torch.no_grad():
        masks = net(vols, phi)
        eps = net.encode(vols, phi)
        segs = net.segment(vols, phi)
        merged = net.segment(vols, phi, sessions=[0] * n, threshold=0.5)
    assert [m.shape for m in masks] == [torch.Size(v.shape) for v in vols]
    assert all(0 <= float(m.min()) and float(m.max()) <= 1 for m in masks)
    assert eps.shape == (n, 64) and torch.isfinite(eps).all()
    for s, v in zip(segs, vols):
        assert s.shape == v.shape and torch.equal(s.affine, v.affine)
    assert len(merged) == 1 and merged[0].same_grid(vols[0]) and merged[0].is_label


def test_degenerate_and_distant_inputs():
    net = VisionNet(get_config("tiny").vision, embed_dim=64)
    a = _vol((12, 14, 10), (2.0, 2.0, 2.0))
    one_slice = _vol((20, 18, 1), (1.5, 1.5, 6.0), (0, 0, 30), seed=1)
    one_voxel = _vol((1, 1, 1), (3.0, 3.0, 3.0), center=(5, 5, 5), seed=2)
    far = _vol((12, 14, 10), (2.0, 2.0, 2.0), center=(500, 0, 0), seed=3)
    with torch.no_grad():
        outs = net([a, one_slice, one_voxel, far], torch.randn(4, 32))
    assert [o.shape for o in outs] == [torch.Size(v.shape) for v in (a, one_slice, one_voxel, far)]
    assert all(torch.isfinite(o).all() for o in outs)
    shape, _ = shared_grid([a.shape, far.shape], [a.affine, far.affine])   # bounded union
    assert torch.Size(shape).numel() <= 2 * torch.Size(a.shape).numel()


def test_shared_grid_of_orthogonal_thick_slices_is_no_larger_than_an_input():
    # an axial 1×1×5 mm and a sagittal 5×1×1 mm acquisition of the same 160×190×160 mm field
    axial = _vol((160, 190, 32), (1.0, 1.0, 5.0))
    sagittal = _vol((32, 190, 160), (5.0, 1.0, 1.0))
    largest = max(torch.Size(v.shape).numel() for v in (axial, sagittal))
    for vols in ([axial, sagittal], [sagittal, axial]):
        shape, aff = shared_grid([v.shape for v in vols], [v.affine for v in vols], factor=2.0)
        spacing = torch.linalg.norm(aff[:3, :3], dim=0)
        assert torch.allclose(spacing, torch.tensor([5 ** 0.5, 1.0, 5 ** 0.5], dtype=spacing.dtype), atol=1e-6)
        # the geometric mean of the voxel counts (= either input here, up to a voxel per axis),
        # not the ~1 mm union the finest-spacing rule gave (5x the largest input)
        assert torch.Size(shape).numel() <= 1.05 * largest
    # grids sharing a spacing keep it; a tilted copy of a volume does not refine the grid
    tilted = _vol((160, 190, 32), (1.0, 1.0, 5.0), rot=(0, 0, 10))
    shape, _ = shared_grid([axial.shape, tilted.shape], [axial.affine, tilted.affine])
    assert torch.Size(shape).numel() <= 2.0 * torch.Size(axial.shape).numel()


def test_interaction_in_slabs_and_checkpointed_matches_one_pass(monkeypatch):
    import voxelprompt.model as model_mod
    vols = [_vol((12, 14, 10), (2.0, 2.0, 2.0), seed=1), _vol((13, 12, 5), (2.0, 2.0, 4.5), (8, 0, 0), seed=2),
            _vol((10, 11, 12), (2.4, 2.4, 2.0), (0, 0, 15), (2, 1, 0), seed=3)]
    cfg = get_config("tiny").vision
    torch.manual_seed(0)
    net = VisionNet(cfg, embed_dim=64)
    phi = torch.randn(3, 32)

    def run(tokens, ckpt):
        monkeypatch.setattr(model_mod, "_INTERACT_TOKENS", tokens)
        net.cfg = dataclasses.replace(cfg, checkpoint_interaction=ckpt)
        net.zero_grad()
        out = net(vols, phi)
        sum((o ** 2).mean() for o in out).backward()
        return [o.detach() for o in out], net.enc_attn[0].qkv.weight.grad.clone()

    ref_out, ref_grad = run(10 ** 9, False)            # one slab, activations stored
    for tokens, ckpt in [(60, False), (60, True)]:    # many slabs; recomputed in backward
        out, grad = run(tokens, ckpt)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(out, ref_out))
        assert torch.allclose(grad, ref_grad, rtol=1e-4, atol=1e-7)


def test_working_resolution_floor():
    net = VisionNet(dataclasses.replace(get_config("tiny").vision, min_spacing=2.0), embed_dim=64)
    fine = _vol((24, 20, 8), (1.0, 1.0, 4.0), (0, 10, 0))
    xs, affs, native = net._prepare([fine], torch.zeros(1, 32))
    assert tuple(xs[0].shape[2:]) == (12, 10, 8)
    assert torch.allclose(torch.linalg.norm(affs[0][:3, :3], dim=0), torch.tensor([2.0, 2.0, 4.0], dtype=torch.float64))
    with torch.no_grad():
        (mask,) = net([fine], torch.zeros(1, 32))
    assert mask.shape == fine.shape


def test_cross_volume_attention_is_permutation_equivariant():
    torch.manual_seed(0)
    vols = [_vol((12, 14, 10), (2.0, 2.0, 2.0), seed=1), _vol((13, 12, 5), (2.0, 2.0, 4.5), (8, 0, 0), seed=2),
            _vol((10, 11, 12), (2.4, 2.4, 2.0), (0, 0, 15), (2, 1, 0), seed=3)]
    net = VisionNet(get_config("tiny").vision, embed_dim=64)
    phi = torch.randn(3, 32)
    perm = [2, 0, 1]
    with torch.no_grad():
        a, ea = net(vols, phi), net.encode(vols, phi)
        b, eb = net([vols[i] for i in perm], phi[perm]), net.encode([vols[i] for i in perm], phi[perm])
    for j, i in enumerate(perm):
        assert torch.allclose(b[j], a[i], atol=1e-5)
    assert torch.allclose(eb, ea[perm], atol=1e-5)
    with torch.no_grad():                             # and the volumes really interact
        c = net(vols, torch.cat([phi[:2], torch.randn(1, 32)]))
    assert not torch.allclose(c[0], a[0], atol=1e-6)


# ------------------------------------------------------------------------------- joint model
def test_dice_gradient_reaches_language_model(tok):
    model = _model(tok)
    out = model.loss(build_sequence(_example(), tok))
    assert out.n_masks == 1 and out.n_tokens > 0 and torch.isfinite(out.total)
    model.zero_grad()
    out.dice.backward(retain_graph=True)
    lm_grad = model.lm.llama.layers[0].self_attn.q_proj.weight.grad
    assert lm_grad is not None and lm_grad.abs().sum() > 0
    assert model.lm.phi_head[0].weight.grad.abs().sum() > 0
    model.zero_grad()
    out.ce.backward()                                  # CE reaches the encoder through ε
    assert model.vision.to_eps.weight.grad.abs().sum() > 0
    assert model.vision.enc[0].conv.weight.grad.abs().sum() > 0


@pytest.fixture(scope="module")
def overfit(tok):
    model = _model(tok, seed=1)
    seq = build_sequence(_example(), tok)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    hist = []
    for _ in range(60):
        out = model.loss(seq)
        opt.zero_grad()
        out.total.backward()
        opt.step()
        hist.append((out.ce.item(), out.dice.item()))
    return model, seq, hist


def test_overfit_one_example_drives_both_losses_down(overfit):
    _, _, hist = overfit
    (ce0, d0), (ce1, d1) = hist[0], hist[-1]
    assert ce1 < 0.2 * ce0, hist
    assert d1 < 0.75 * d0, hist


def test_kv_cache_generation_equals_no_cache(overfit, tok):
    model, seq, _ = overfit
    ex = _example()
    runs = []
    for use_cache in (True, False):
        state = model.lm.start(use_cache)
        model.lm.feed(state, header_ids(tok, ex.header()))
        runs.append(model.generate_step(state, max_tokens=60))
    (a, b) = runs
    assert a.ids == b.ids and torch.allclose(a.phi, b.phi, atol=1e-4)
    # the overfit model writes code with <MOD>s, and φ equals teacher forcing on what it wrote
    assert a.ids[-1] == tok.endstep_id and not a.stopped and not a.truncated
    assert tok.decode(a.ids).startswith("mask = segment(t1<MOD>")
    assert a.phi.shape == (a.ids.count(tok.mod_id), 32)
    ids = torch.tensor(header_ids(tok, ex.header()) + a.ids)
    with torch.no_grad():
        h = model.lm(model.lm.embed(ids)[None])[0]
    assert torch.allclose(a.phi, model.lm.phi_head(h[ids == tok.mod_id]), atol=1e-4)
    # a random model that never stops is cut at max_tokens, identically with and without cache
    rnd = _model(tok, seed=3)
    outs = []
    for use_cache in (True, False):
        state = rnd.lm.start(use_cache)
        rnd.lm.feed(state, header_ids(tok, ex.header()))
        outs.append(rnd.generate_step(state, max_tokens=25).ids)
    assert outs[0] == outs[1]


def test_batched_lm_loss_ignores_padding(tok):
    """The lm stage's right-padded batch gives each token the CE it has alone (no pad leaks in)."""
    model = _model(tok, seed=2).eval()
    ex = _example()
    short = dataclasses.replace(ex, steps=ex.steps[:1], vision_calls=ex.vision_calls[:1])
    seqs = [build_sequence(ex, tok), build_sequence(short, tok)]
    assert len(seqs[0]) != len(seqs[1])
    with torch.no_grad():
        batched = model.lm_loss(seqs)
        sums, counts = 0.0, 0
        for s in seqs:
            h = model.lm(model.lm.embed(s.ids)[None])[0]
            keep = s.labels != IGNORE
            sums += float(torch.nn.functional.cross_entropy(model.lm.head(h[keep]), s.labels[keep], reduction="sum"))
            counts += int(keep.sum())
    assert batched.n_tokens == counts and batched.n_masks == 0
    assert abs(float(batched.ce) - sums / counts) < 1e-4


def test_empty_target_gets_a_dense_mask_gradient():
    """On an empty target the Dice gradient nearly vanishes; the BCE term keeps pushing p → 0."""
    from voxelprompt.model import balanced_bce, soft_dice_loss
    logits = torch.full((16, 16, 16), 2.0, requires_grad=True)
    empty = torch.zeros(16, 16, 16)
    soft_dice_loss(torch.sigmoid(logits), empty).backward()
    g_dice = logits.grad.abs().mean().item()
    logits.grad = None
    balanced_bce(torch.sigmoid(logits), empty).backward()
    g_bce = logits.grad.abs().mean().item()
    assert g_bce > 1000 * g_dice
    assert float(balanced_bce(torch.full((4,), 0.5), torch.ones(4))) == pytest.approx(math.log(2), rel=1e-4)


def test_balanced_bce_weighs_a_small_target_like_the_background():
    """A 1-voxel target in 1000: missing it costs as much as 50 % false positives would."""
    from voxelprompt.model import balanced_bce
    t = torch.zeros(1000)
    t[0] = 1
    miss = torch.full((1000,), 0.01)                    # everything background, the target missed
    hit = miss.clone()
    hit[0] = 0.99
    assert float(balanced_bce(miss, t)) > 2.0           # ½·(−log 0.01) ≈ 2.3: the miss dominates
    assert float(balanced_bce(hit, t)) < 0.05
    # at an undecided output the target voxel's logit gets the gradient of the whole background
    logits = torch.zeros(1000, requires_grad=True)
    balanced_bce(torch.sigmoid(logits), t).backward()
    g = logits.grad
    assert abs(float(g[0])) == pytest.approx(float(g[1:].abs().sum()), rel=0.05)


def test_capped_bce_does_not_light_up_an_undecided_region():
    """The network has the background of a 50,000-voxel grid right (p ≈ 0) but cannot tell a
    100-voxel target from the 5,000-voxel region around it (2 % target). The best constant output
    over that region is ~0.9 with the fully balanced BCE (the over-segmentation of session 7) and
    below 0.5 when a target voxel weighs at most 10 background voxels; ratio 1 is the voxel-mean BCE."""
    import torch.nn.functional as F
    from voxelprompt.model import balanced_bce
    t = torch.zeros(50000)
    t[:100] = 1
    ps = torch.linspace(0.01, 0.99, 99)

    def best(**kw):
        def pred(p):
            x = torch.full_like(t, 1e-4)
            x[:5000] = p
            return x
        return float(ps[int(torch.stack([balanced_bce(pred(float(p)), t, **kw) for p in ps]).argmin())])

    w = 49900 / 100                                   # |bg| / |fg|: p* = w·f / (w·f + 1 − f)
    assert best() == pytest.approx(w * 0.02 / (w * 0.02 + 0.98), abs=0.01)        # ≈ 0.91
    assert best(max_ratio=10) == pytest.approx(10 * 0.02 / (10 * 0.02 + 0.98), abs=0.01) # ≈ 0.17
    pred = torch.rand(50000)
    assert float(balanced_bce(pred, t, max_ratio=1)) == pytest.approx(float(F.binary_cross_entropy(pred, t)), rel=1e-4)
    # a cap above |bg| / |fg| changes nothing: the balanced form
    assert float(balanced_bce(pred, t, max_ratio=1000)) == pytest.approx(float(balanced_bce(pred, t)), rel=1e-5)
    # an empty target: the background mean, whatever the cap
    assert float(balanced_bce(pred, torch.zeros(50000), max_ratio=10)) == pytest.approx(
        float(F.binary_cross_entropy(pred, torch.zeros(50000))), rel=1e-4)


def test_bce_max_ratio_round_trips_and_defaults_for_older_checkpoints():
    from voxelprompt.configs import CONFIGS, ModelConfig
    cfg = CONFIGS["cpu"]
    assert cfg.bce_max_ratio == 10.0
    d = cfg.to_dict()
    assert ModelConfig.from_dict(d) == cfg
    assert ModelConfig.from_dict({**d, "bce_max_ratio": None}).bce_max_ratio is None
    d.pop("bce_max_ratio")                            # a checkpoint saved before the field existed
    assert ModelConfig.from_dict(d).bce_max_ratio == 10.0


def test_batched_segment_loss_matches_the_sequential_one(tok):
    """lm_loss(segment=True): each segment call's mask loss, with φ from the batched pass, is the
    one :meth:`loss` computes for the sequence alone (here no ε precedes the call), and the
    Dice gradient reaches the vision network and the language model through φ."""
    model = _model(tok, seed=3).train()
    ex = _example()
    short = dataclasses.replace(ex, steps=ex.steps[:1], vision_calls=ex.vision_calls[:1])
    seqs = [build_sequence(ex, tok), build_sequence(short, tok)]
    batched = model.lm_loss(seqs, segment=True)
    assert batched.n_masks == 2
    with torch.no_grad():
        alone = [model.loss(s, segment=True) for s in seqs]
    assert float(batched.dice.detach()) == pytest.approx(sum(float(o.dice) for o in alone) / 2, abs=1e-4)
    batched.total.backward()
    assert model.vision.enc[0].conv.weight.grad.abs().sum() > 0
    assert model.lm.phi_head[0].weight.grad.abs().sum() > 0
    assert model.lm.llama.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert model.lm_loss(seqs).n_masks == 0            # the default stays language-model only


def test_batched_segment_loss_can_be_restricted_to_some_rois(tok):
    """--vision-rois: only the calls whose ROI matches get a mask loss."""
    import re
    model = _model(tok, seed=3)
    seq = build_sequence(_example(), tok)
    seq.calls[0].roi = "lesion:1"
    assert model.lm_loss([seq], segment=True, rois=re.compile("^lesion")).n_masks == 1
    assert model.lm_loss([seq], segment=True, rois=re.compile("^absent")).n_masks == 0


def test_anatomy_targets_are_sided_partitions_of_a_subject():
    """The anatomy heads' targets: FreeSurfer ids → classes, lobes and territories split by side."""
    import numpy as np

    from synth.subject import generate_subject
    from voxelprompt.anatomy_classes import IGNORE, LABEL_IDS, N_LOBES, SIZES, targets
    anat = generate_subject(3, anatomy="phantom", resolution=4.0, n_sessions=1).sessions[0].anatomy
    t = targets(anat)
    assert t.channels == len(SIZES) == 5 and t.shape == anat.shape and t.is_label
    assert not t.tensor[3:].any()                          # no lesions given: lesion partitions empty
    assert torch.allclose(t.affine, anat.labels.affine)
    lab, lobes, terr = (t.tensor[k].numpy() for k in range(3))
    known = lab != IGNORE
    assert known.mean() > 0.99
    ids = np.asarray(LABEL_IDS)[lab[known]]
    assert np.array_equal(ids, anat.array[known])          # the class index maps back to the id
    for k, n in enumerate(SIZES):
        assert t.tensor[k][t.tensor[k] != IGNORE].max() < n
    hemi = anat.hemispheres.tensor[0].numpy()
    frontal = anat.lobes.tensor[0].numpy() == 1
    assert (frontal & (hemi == 1)).any() and (frontal & (hemi == 2)).any()
    assert set(np.unique(lobes[frontal & (hemi == 1)])) == {1}
    assert set(np.unique(lobes[frontal & (hemi == 2)])) == {1 + N_LOBES}
    assert set(np.unique(lobes[anat.lobes.tensor[0].numpy() == 0])) == {0}
    assert terr.max() <= 6 and (terr[hemi == 2] != 0).any()


def test_lesion_partitions_paint_each_lesion_class_and_component():
    """The lesion partitions: a lesion's class on its mask (smaller lesions on top), its components."""
    import numpy as np

    import synth.lesion_classes
    from synth.subject import generate_subject
    from voxelprompt.anatomy_classes import COMPONENTS, LESION_CLASSES, targets
    assert LESION_CLASSES == synth.lesion_classes.LESION_CLASSES     # the torch-free copy is in step
    ses = generate_subject(3, anatomy="phantom", resolution=4.0, n_sessions=1, n_lesions=2,
                           lesion_classes=["glioma", "wmh"], protocols=[["t1w"]]).sessions[0]
    glioma, wmh = sorted(ses.lesions, key=lambda le: le.meta["cls"] != "glioma")
    assert glioma.meta["cls"] == "glioma" and wmh.meta["cls"] == "wmh" and glioma.components
    t = targets(ses.anatomy, ses.lesions).tensor.numpy()
    cls, comp = t[3], t[4]
    big, small = sorted(ses.lesions, key=lambda le: -int(le.mask.sum()))
    assert np.all(cls[small.mask] == 1 + LESION_CLASSES.index(small.meta["cls"]))
    only_big = big.mask & ~small.mask
    assert np.all(cls[only_big] == 1 + LESION_CLASSES.index(big.meta["cls"]))
    assert np.all(cls[~(big.mask | small.mask)] == 0)
    for name, m in glioma.components.items():
        own = m & ~wmh.mask if glioma is big else m
        assert np.all(comp[own] == 1 + COMPONENTS.index(name)), name
    assert np.all(comp[~glioma.mask & ~wmh.mask] == 0)


def test_grow_anatomy_keeps_the_trained_partitions(tok):
    """Growing the heads to more partitions leaves the trained ones' outputs and the mask unchanged."""
    from voxelprompt.anatomy_classes import SIZES
    m = _model(tok, anatomy_classes=SIZES[:3]).eval()
    net = m.vision
    v = _vol((10, 9, 8), (2.0, 2.0, 2.0), seed=3)
    phi = torch.randn(1, m.config.lm.phi_dim)
    with torch.no_grad():
        (mask0,), ((lp0, _, _),) = net([v], phi, anatomy=True)
        net.grow_anatomy(SIZES)
        (mask1,), ((lp1, _, _),) = net([v], phi, anatomy=True)
    assert net.cfg.anatomy_classes == SIZES and [x.shape[1] for x in lp1] == list(SIZES)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(lp0, lp1[:3]))
    assert float(net.select.bias.detach()[sum(SIZES[:3]):].max()) == -4.0
    assert float((mask1 - mask0).abs().max()) < 0.05       # new partitions select (almost) nothing yet
    with pytest.raises(ValueError, match="not a prefix"):
        net.grow_anatomy((3, 4))


def test_residual_anatomy_mlp_starts_at_zero_trains_and_round_trips(tok, tmp_path):
    """``anatomy_hidden``: growing a linear-head network a residual MLP leaves its outputs unchanged;
    the MLP's output layer then gets a gradient from the anatomy loss, growing to more partitions
    keeps it (new rows at zero), and saved weights load back with the MLP and its width."""
    from voxelprompt import checkpoint
    from voxelprompt.anatomy_classes import SIZES
    m = _model(tok, anatomy_classes=SIZES[:3]).eval()
    net = m.vision
    assert net.anatomy_mlp is None
    v = _vol((10, 9, 8), (2.0, 2.0, 2.0), seed=4)
    phi = torch.randn(1, m.config.lm.phi_dim)
    with torch.no_grad():
        (mask0,), ((lp0, _, _),) = net([v], phi, anatomy=True)
    net.grow_anatomy(SIZES[:3], hidden=12)
    assert net.cfg.anatomy_hidden == 12 and net.anatomy_mlp[0].out_features == 12
    fresh = VisionNet(net.cfg, m.config.lm.hidden, m.config.lm.phi_dim)   # the same parameter order
    assert [n for n, _ in net.named_parameters()] == [n for n, _ in fresh.named_parameters()]
    (mask1,), ((lp1, _, _),) = net([v], phi, anatomy=True)
    assert float((mask1 - mask0).detach().abs().max()) == 0.0
    assert all(torch.equal(a, b) for a, b in zip(lp0, lp1))
    lp1[0][:, 1].sum().backward()        # push every voxel towards class 1 of the first partition
    assert float(net.anatomy_mlp[2].weight.grad.abs().sum()) > 0
    with torch.no_grad():
        net.anatomy_mlp[2].weight.normal_()     # as if trained: the MLP now changes the outputs
        (_,), ((lp2, _, _),) = net([v], phi, anatomy=True)
        net.grow_anatomy(SIZES)
        (_,), ((lp3, _, _),) = net([v], phi, anatomy=True)
    assert net.anatomy_mlp[2].out_features == sum(SIZES) and [x.shape[1] for x in lp3] == list(SIZES)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(lp2, lp3[:3]))
    assert float(net.anatomy_mlp[2].weight.detach()[sum(SIZES[:3]):].abs().max()) == 0.0
    m.config = dataclasses.replace(m.config, vision=net.cfg)
    w = checkpoint.save_model(m, tmp_path / "mlp" / "model.safetensors")
    back = checkpoint.load_model(w)
    assert back.config.vision.anatomy_hidden == 12 and back.vision.anatomy_mlp is not None
    assert torch.allclose(back.vision.anatomy_mlp[0].weight, net.anatomy_mlp[0].weight.detach().to(back.vision.anatomy_mlp[0].weight), atol=1e-3)
    with torch.no_grad():
        net.grow_anatomy(SIZES, hidden=40)      # an MLP already there is kept
    assert net.cfg.anatomy_hidden == 12


def test_mask_source_gives_each_part_of_the_mask_alone(tok):
    """``mask_source``: the union is 1 − (1 − free)(1 − selected); "free" and "selection" give the
    parts; anything else is refused."""
    m = _model(tok).eval()
    net = m.vision
    with torch.no_grad():
        net.select.bias.fill_(0.0)                  # select something, so both parts are non-trivial
        v = _vol((10, 9, 8), (2.0, 2.0, 2.0), seed=3)
        phi = torch.randn(1, m.config.lm.phi_dim)
        parts = {}
        for src in ("union", "free", "selection"):
            net.mask_source = src
            (parts[src],) = net([v], phi)
    net.mask_source = "union"
    free, sel, union = parts["free"], parts["selection"], parts["union"]
    assert float(free.max()) > 0.01 and float(sel.max()) > 0.01
    assert torch.allclose(union, 1 - (1 - free) * (1 - sel), atol=1e-5)
    assert not torch.allclose(union, free) and not torch.allclose(union, sel)
    net.mask_source = "lesions"
    with pytest.raises(ValueError, match="mask_source 'lesions'"):
        net([v], phi)


def test_anatomy_heads_mask_is_the_selected_classes(tok):
    """A mask is the free head or'ed with the φ-selected anatomy classes; the heads' log-probabilities
    come back with anatomy=True."""
    m = _model(tok).eval()
    net = m.vision
    assert net.anatomy is not None
    v = _vol((10, 9, 8), (2.0, 2.0, 2.0), seed=3)
    phi = torch.zeros(1, m.config.lm.phi_dim)
    with torch.no_grad():
        net.out.bias.fill_(-30.0)                 # the free head says "nothing"
        net.select.weight.zero_()
        net.select.bias.fill_(-30.0)
        j = 5                                     # select label class 5 alone
        net.select.bias[j] = 30.0
        (mask,), ((logp, shape, aff),) = net([v], phi, anatomy=True)
    assert [lp.shape for lp in logp] == [(10 * 9 * 8, k) for k in m.config.vision.anatomy_classes]
    assert torch.allclose(logp[0].exp().sum(1), torch.ones(1), atol=1e-5)
    assert shape == (10, 9, 8) and torch.allclose(aff, v.affine.double())
    assert torch.allclose(mask.reshape(-1), logp[0][:, j].exp(), atol=1e-5)
    with torch.no_grad():
        net.select.bias.fill_(-30.0)
        assert float(net([v], phi)[0].max()) < 1e-6          # nothing selected, nothing free


def test_vision_loss_trains_phi_head_and_vision_not_the_language_model(tok):
    """The vision stage's loss: mask + anatomy CE; no gradient reaches the language model's body."""
    from voxelprompt.anatomy_classes import SIZES
    m = _model(tok)
    ex = _example()
    t1 = ex.volumes[0].volume
    lab = torch.zeros((3, *t1.shape), dtype=torch.uint8)
    lab[0, :6] = 1                                # two label classes, split along x
    lab[0, 6:] = 2
    ex.anatomy = {0: vl.Volume(lab, t1.affine, "label")}
    seq = build_sequence(ex, tok)
    assert set(seq.anatomy) == {0}
    out = m.vision_loss([seq])
    assert out.n_masks == 1 and out.anatomy is not None and float(out.ce) == 0.0
    assert float(out.total.detach()) > float(out.dice.detach()) + m.config.anatomy_weight * float(out.anatomy.detach())
    assert float(out.anatomy) > 0.5 * math.log(SIZES[0])           # untrained: near uniform
    out.total.backward()
    assert m.lm.phi_head[0].weight.grad is not None and float(m.lm.phi_head[0].weight.grad.abs().sum()) > 0
    assert all(p.grad is None for n, p in m.lm.named_parameters() if not n.startswith("phi_head"))
    assert float(m.vision.anatomy.weight.grad.abs().sum()) > 0
    assert float(m.vision.select.weight.grad.abs().sum()) > 0
    opt = torch.optim.Adam(m.vision.parameters(), lr=1e-2)
    first = float(out.anatomy)
    for _ in range(40):
        opt.zero_grad()
        o = m.vision_loss([seq])
        o.total.backward()
        opt.step()
    assert float(o.anatomy) < 0.5 * first                          # the dense heads fit the labels


def test_training_crop_cuts_every_volume_to_one_slab_keeping_left_right():
    """training_crop: one world slab (size along y and z, all of x) for every volume, oblique ones
    included; centred on the target when asked; the full volumes when the slab misses one."""
    import random

    from voxelprompt.model import training_crop
    ex = _example()
    t1, flair = (v.volume for v in ex.volumes)
    truth = ex.vision_calls[0].targets[0]
    grid = vl.Volume(torch.rand(12, 14, 10), vl.ras_grid((12, 14, 10), (2.0, 2.0, 2.0), (0, 0, 0)))
    for seed in range(4):
        c0, c1, c2 = training_crop([grid, t1, flair], [truth], 10.0, random.Random(seed), target_prob=1.0)
        assert c0.shape[0] == grid.shape[0] and 5 <= c0.shape[1] <= 6 and 5 <= c0.shape[2] <= 6   # 10 mm of 2 mm
        off = np.rint(grid.world_to_voxel(np.array([c0.origin]))[0]).astype(int)
        assert off[0] == 0 and torch.equal(c0.tensor, grid.tensor[:, :, off[1]:off[1] + c0.shape[1],
                                                                  off[2]:off[2] + c0.shape[2]])
        assert bool(_target_on(truth, c0.shape, c0.affine).gt(0.5).any())       # centred on the target
        # the oblique T1 and FLAIR keep every voxel of the slab (here: of the axis-aligned crop's span)
        w = c0.world_coordinates()
        lo, hi, zlo, zhi = w[1].min(), w[1].max(), w[2].min(), w[2].max()
        inside = lambda x: int(((x[1] >= lo) & (x[1] <= hi) & (x[2] >= zlo) & (x[2] <= zhi)).sum())  # noqa: E731
        for full, cut in ((t1, c1), (flair, c2)):
            assert inside(cut.world_coordinates()) == inside(full.world_coordinates()) > 0
            assert cut.tensor.numel() < full.tensor.numel()
    far = vl.Volume(torch.rand(6, 6, 6), vl.ras_grid((6, 6, 6), (2.0, 2.0, 2.0), (0, 500, 0)))
    vols = [t1, far]
    assert all(a is b for a, b in zip(training_crop(vols, [truth], 10.0, random.Random(0), target_prob=1.0), vols))


def test_vision_loss_on_crops_trains_the_heads_on_the_crop(tok, monkeypatch):
    """vision_loss(crop_mm=...): the network sees the crop, the mask and anatomy losses are scored
    on it, and the gradients reach the heads."""
    import random
    random.seed(0)                          # training_crop draws from the random module
    m = _model(tok)
    seq = build_sequence(_example_with_anatomy(), tok)
    shapes = []
    forward = VisionNet.forward
    monkeypatch.setattr(VisionNet, "forward",
                        lambda self, vols, phi, anatomy=False: shapes.append([v.shape for v in vols])
                        or forward(self, vols, phi, anatomy))
    out = m.vision_loss([seq], crop_mm=8.0)
    (t1s, fls), = shapes                    # T1 12 x 14 x 10 at 2 mm, 8° oblique; FLAIR 11 x 12 x 5
    assert t1s[0] == 12 and t1s[1] < 14 and t1s[2] < 10 and math.prod(t1s) < 1680 / 2
    assert math.prod(fls) < 11 * 12 * 5
    assert out.n_masks == 1 and out.anatomy is not None and math.isfinite(float(out.total.detach()))
    out.total.backward()
    assert float(m.vision.anatomy.weight.grad.abs().sum()) > 0


def test_anatomy_loss_teaches_the_selection_the_classes_a_target_covers(tok):
    """φ's selection learns from the truth directly: a class over half inside the call's target is
    wanted, the others not; the heads' soft Dice counts every present class alike."""
    m = _model(tok)
    ex = _example()
    t1 = ex.volumes[0].volume
    sphere = ex.vision_calls[0].targets[0].tensor[0].bool()
    lab = torch.zeros((3, *t1.shape), dtype=torch.uint8)
    lab[0, :6], lab[0, 6:] = 1, 2
    lab[0][sphere] = 3                            # class 3 is the call's target
    ex.anatomy = {0: vl.Volume(lab, t1.affine, "label")}
    seq = build_sequence(ex, tok)
    out = m.vision_loss([seq])
    assert out.select is not None and out.anatomy_dice is not None
    assert 0 < float(out.anatomy_dice) < 1 and float(out.select) > 0
    anatomy = m.config.anatomy_weight * float(out.anatomy + out.anatomy_dice + out.select)
    assert float(out.total.detach()) >= float(out.dice) + anatomy - 1e-4   # all three in the total (+ BCE)

    def selection():
        with torch.no_grad():
            h = m.lm(m.lm.embed(seq.ids[None]))[0]
            phi = m.lm.phi_head(h[seq.mod_positions[seq.calls[0].mods]])
            return torch.sigmoid(m.vision.select(phi[0]))[:4]
    before = selection()
    assert float(before.max()) < 0.05                        # bias −4: nothing selected at first
    opt = torch.optim.Adam(list(m.vision.select.parameters()) + list(m.lm.phi_head.parameters()), lr=5e-2)
    for _ in range(30):
        opt.zero_grad()
        o = m.vision_loss([seq])
        o.select.backward()
        opt.step()
    after = selection()
    assert float(after[3]) > 0.5 and float(after[1]) < 0.5 and float(after[2]) < 0.5
    assert float(o.select) < 0.5 * float(out.select)


def test_selection_loss_averages_over_the_calls_with_anatomy_truth_only(tok):
    """A call without selection truth adds nothing to the selection term (not a zero to its mean):
    the same batch with and without such sequences has the same ``select`` — one without anatomy,
    and one whose heads are scored but whose call has no selection targets."""
    m = _model(tok)
    ex = _example_with_anatomy()
    seq, bare, heads_only = (build_sequence(e, tok) for e in (ex, _example(), ex))
    targets = m.selection_targets
    m.selection_targets = lambda s, call: {} if s is heads_only else targets(s, call)
    with torch.no_grad():
        alone, mixed = m.vision_loss([seq]), m.vision_loss([seq, bare, heads_only])
    assert mixed.n_masks == 3 * alone.n_masks
    assert float(alone.select) > 0 and float(alone.anatomy) > 0
    assert abs(float(mixed.select) - float(alone.select)) < 1e-6


def test_selection_that_cannot_tell_calls_apart_settles_at_the_class_frequency(tok):
    """Ten calls each want a different one of ten present classes, and φ is the same for all (the
    selector can only learn its bias): each class's σ settles near its frequency, 1/10, not at
    ½ as a class-balanced BCE would put it — unwanted classes must stay low, since the selected
    classes are or'ed over every partition into the mask."""
    m = _model(tok)
    sizes = list(m.vision.cfg.anatomy_classes)
    n = 10
    present = torch.zeros(sizes[0], dtype=torch.bool)
    present[1:n + 1] = True
    rest = [(torch.zeros(k, dtype=torch.bool), torch.zeros(k, dtype=torch.bool)) for k in sizes[1:]]
    targets = []
    for c in range(1, n + 1):
        want = torch.zeros(sizes[0], dtype=torch.bool)
        want[c] = True
        targets.append({0: [(want, present), *rest]})
    phi = torch.zeros(1, m.vision.select.in_features)
    opt = torch.optim.Adam([m.vision.select.bias], lr=0.1)
    for _ in range(300):
        opt.zero_grad()
        loss = 0
        for t in targets:
            m.selection_targets = lambda seq, call, t=t: t
            loss = loss + m._selection_loss(None, None, phi, [0])
        loss.backward()
        opt.step()
    sigma = torch.sigmoid(m.vision.select.bias[1:n + 1].detach())
    assert float((sigma - 1 / n).abs().max()) < 0.03, sigma
    assert float(torch.sigmoid(m.vision.select.bias[0])) < 0.05          # absent: not scored, stays low


def test_lm_stage_teaches_the_language_model_the_selection(tok):
    """Without running the vision network, the lm stage's loss has the selection term, and its
    gradient reaches the language model's body (the target must get into φ) and the selector."""
    m = _model(tok)
    ex = _example_with_anatomy()
    seq = build_sequence(ex, tok)
    (want, present), *_ = m.selection_targets(seq, seq.calls[0])[0]
    assert want[:4].tolist() == [False, False, False, True]
    assert present[1:4].all() and not present[0] and not present[4:].any()       # classes 1–3 only
    out = m.lm_loss([seq], segment=False)
    assert out.n_masks == 0 and out.anatomy is None and out.select is not None
    assert float(out.total) > float(out.ce) + 0.5 * m.config.dice_weight * float(out.select)
    out.total.backward()
    assert float(m.vision.select.weight.grad.abs().sum()) > 0
    assert float(m.lm.llama.layers[0].self_attn.q_proj.weight.grad.abs().sum()) > 0
    assert m.vision.anatomy.weight.grad is None                   # the vision network did not run
    bare = build_sequence(_example(), tok)                         # no anatomy truth: CE only
    assert m.lm_loss([bare]).select is None
