"""Joint training of the language model and the vision network (seeds/004 §3.3, A.4).

``voxelprompt train --config cpu --out DIR [--resume] [--max-hours H] [--device cpu|cuda]``

Each example is a sampled task (prompt, volumes, ground-truth program) made on the fly from a
synthetic subject by a worker process (:class:`voxelprompt.datagen.ExampleStream`). The loss is
teacher-forced cross-entropy on the code tokens, ``<ENDSTEP>`` and ``<STOP>`` (execution outputs
are inputs, not targets) plus λ × soft Dice of the live vision network's masks.

Ground-truth code is not re-executed during training: each :class:`~task_templates.VisionCall`
of an example carries the truth masks of that call (recorded when the sampler ran the program
with the oracle backend), so :meth:`VoxelPrompt.loss` applies the live network per call with the
φ read at the call's ``<MOD>`` s, scores its masks against those targets and, for ``encode``
calls, splices the live ε into the sequence. The recorded step outputs are what the program
printed with the oracle; this is equivalent to executing the code with the live network except
that the printed numbers are the truth's rather than the live masks' (teacher forcing).

Optimisation: Adam (lr 1e-4 by default, as in the paper; ``--vision-lr-mult`` scales the vision
network's rate), gradient accumulation over
``--accum`` examples, gradient clipping, a linear warm-up, and LR halving when the validation
loss (CE + λ·Dice on a fixed held-out set) has not improved for ``--patience`` evaluations.
bf16 autocast on CUDA. Checkpoints are written atomically every ``--ckpt-minutes`` (and at the
end) to ``DIR/ckpt/``: ``model.safetensors`` + ``model.json`` + ``state.pt`` (optimizer, step,
LR, plateau state, RNG states, data-seed counter); ``--resume`` continues from there. Every
optimizer step appends a line to ``DIR/metrics.jsonl``; validations add ``"kind": "val"`` lines.

``--stage lm`` trains the language model alone on right-padded batches of ``--batch`` examples
(:meth:`VoxelPrompt.lm_loss`): no vision call runs and the ε slots stay zero. On two CPU cores it
sees ~10x more programs per hour than the joint stage (10–13 vs 0.9–1.4 examples/s); a run goes ``lm`` first (grammar,
structure names, stopping), then ``joint`` (φ, ε and the masks) with ``--init`` or ``--resume``.

``--stage vision`` freezes the language model: each step runs the batched language-model pass of
``--batch`` examples that have segment calls without gradients and trains φ's head and the vision
network on their mask loss, plus, for a network with anatomy heads (``VisionConfig.anatomy_classes``),
the heads' cross-entropy against each subject's anatomy (voxelprompt/anatomy_classes.py). With
``--reinit-vision`` the fresh vision network takes ``--config`` 's design, so a new network can
be trained under a language model that already writes the programs. ``--grow-heads`` instead keeps
the trained network and extends its anatomy heads to ``--config`` 's partitions (new partitions,
e.g. the lesion ones, start fresh) and gives them ``--config`` 's residual MLP if they have none
(``VisionConfig.anatomy_hidden``; it starts at zero: :meth:`VisionNet.grow_anatomy`).

``--crop-mm MM`` (vision stage) runs each segment call on a random crop of its volumes: MM along y
and z, the whole left-right extent, centred on the target half of the time
(:func:`voxelprompt.model.training_crop`); validation stays on whole volumes.

``--vision-prob p`` runs the segment calls (the Dice term) on a random share p of the examples
only; the others give the language model a CE-only step (``encode`` calls still run). On two
CPU cores the vision network costs ~20x the language model per example, so p = 0.3 lets the
language model see ~3x more programs per hour at about the same number of vision updates.

On resume the data stream restarts with a fresh seed (``data_round`` in the state is
incremented), so no subject is seen twice; a run started with ``--init`` offsets ``data_round`` by
the number of examples the given weights were trained on (from their ``model.json``), so a new
stage does not replay its parent's stream. Validation subjects come from a separate seed range.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import random
import re
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from .configs import get_config
from .datagen import DataConfig, ExampleStream, examples_from_subject
from .sequence import build_sequence
from .tokenizer import Tokenizer

VAL_SEED_BASE = 900_000_000      # validation subjects: far from the training seeds
DATA_SEED_BASE = 1_000           # training stream seed = DATA_SEED_BASE + run seed * 1000 + data_round


def data_config_for(model_cfg, **kw) -> DataConfig:
    """Training data matched to a model: synthesised on the vision network's working grid."""
    res = model_cfg.vision.min_spacing or 2.0
    base = dict(resolution=res, max_acquisitions=3, rich_max_acquisitions=3)
    base.update(kw)
    return DataConfig(**base)


def validation_set(data_cfg: DataConfig, n_subjects: int, cache: Path | None = None) -> list:
    """A fixed held-out list of examples (seeds ``VAL_SEED_BASE + i``), cached as a pickle."""
    if cache is not None and cache.exists():
        try:
            with open(cache, "rb") as f:
                d = pickle.load(f)
            if d["n"] == n_subjects and d["cfg"] == asdict(data_cfg):
                return d["examples"]
        except Exception:
            pass
    exs = []
    i = 0
    while len(exs) < 4 * n_subjects and i < 4 * n_subjects:
        try:
            exs.extend(examples_from_subject(VAL_SEED_BASE + i, replace(data_cfg, examples_per_subject=4)))
        except Exception as exc:  # noqa: BLE001 - a generator bug: take the next subject
            print(f"validation subject {VAL_SEED_BASE + i} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        i += 1
    if cache is not None:
        tmp = cache.with_name(cache.name + ".tmp")
        with open(tmp, "wb") as f:
            pickle.dump({"n": n_subjects, "cfg": asdict(data_cfg), "examples": exs}, f)
        os.replace(tmp, cache)
    return exs


@torch.no_grad()
def validate(model, examples, tok, device, segment: bool = True, rois=None) -> dict:
    """Mean CE (per example), soft-Dice loss and total over a fixed set of examples.

    ``segment=False`` skips the segment calls (no Dice; the total is the CE); ``rois`` (a compiled
    pattern) scores only the segment calls whose ROI it matches, as in training.
    """
    model.eval()
    ces, dices, anats, adices, sels, tot, ok = [], [], [], [], [], [], 0
    for ex in examples:
        try:
            with _autocast(device):
                out = model.loss(build_sequence(ex, tok), segment=segment, rois=rois)
        except Exception:
            continue
        ok += 1
        ces.append(float(out.ce))
        tot.append(float(out.total))
        if out.n_masks:
            dices.append(float(out.dice))
        if out.anatomy is not None:
            anats.append(float(out.anatomy))
            adices.append(float(out.anatomy_dice))
        if out.select is not None:
            sels.append(float(out.select))
    model.train()
    mean = lambda v: float(np.mean(v)) if v else float("nan")  # noqa: E731
    return {"ce": mean(ces), "dice_loss": mean(dices), "anatomy_ce": mean(anats), "anatomy_dice": mean(adices),
            "select_bce": mean(sels), "loss": mean(tot), "n": ok}


def _autocast(device):
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    import contextlib
    return contextlib.nullcontext()


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])


def param_names(model) -> list[str]:
    """The parameters' names in the optimizer's flat order (language model, then vision network)."""
    return ([f"lm.{n}" for n, _ in model.lm.named_parameters()]
            + [f"vision.{n}" for n, _ in model.vision.named_parameters()])


def remap_optimizer_state(osd: dict, saved: list[str], current: list[str]) -> dict:
    """An optimizer state dict saved for parameters ``saved`` (names, flat order) re-indexed for
    ``current``: the moments follow their parameter by name, so a network whose modules were
    registered in another order (e.g. grown heads) resumes with the right state; parameters new
    since the save start fresh."""
    where = {n: i for i, n in enumerate(saved)}
    state = {}
    for i, n in enumerate(current):
        j = where.get(n)
        if j is not None and j in osd["state"]:
            state[i] = osd["state"][j]
    return {**osd, "state": state}


def save_checkpoint(out: Path, model, opt, state: dict) -> None:
    """Writes ``out/ckpt`` atomically: files go to ``ckpt.tmp``, then the directories are swapped."""
    from .checkpoint import save_model
    tmp, cur, old = out / "ckpt.tmp", out / "ckpt", out / "ckpt.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, tmp / "model.safetensors", info={"step": state["step"], "examples": state["examples"],
                                                       "wall_s": state["wall_s"]})
    torch.save({"optimizer": opt.state_dict(), "param_names": param_names(model), "rng": _rng_state(), **state},
               tmp / "state.pt")
    shutil.rmtree(old, ignore_errors=True)
    if cur.exists():
        os.replace(cur, old)
    os.replace(tmp, cur)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(out: Path) -> Path | None:
    for d in (out / "ckpt", out / "ckpt.old"):
        if (d / "state.pt").exists() and (d / "model.safetensors").exists():
            return d
    return None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="voxelprompt train", description="Joint training of VoxelPrompt.")
    p.add_argument("--config", default="cpu", help="model config name (cpu, paper, tiny)")
    p.add_argument("--out", required=True, help="run directory (checkpoints, metrics.jsonl)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt")
    p.add_argument("--init", default=None, metavar="WEIGHTS",
                   help="start from these model weights (.safetensors) with a fresh optimizer, e.g. the "
                        "weights committed in training/ when a run's optimizer state is gone")
    vision_init = p.add_mutually_exclusive_group()
    vision_init.add_argument("--reinit-vision", action="store_true",
                   help="with --init: a freshly initialised vision network (and φ head), keeping the language "
                        "model, e.g. when the vision weights are saturated (every output ~0) and cannot recover")
    vision_init.add_argument("--grow-heads", action="store_true",
                   help="with --init: keep the trained vision network and extend its anatomy heads to --config's "
                        "partitions (the trained ones must be a prefix), e.g. to add the lesion partitions, "
                        "and give them --config's residual MLP (anatomy_hidden) if they have none")
    p.add_argument("--bce-max-ratio", type=float, default=None, metavar="R",
                   help="mask BCE: a target voxel weighs at most R background voxels (ModelConfig.bce_max_ratio; "
                        "0 = fully balanced; default: the config's or the loaded weights')")
    p.add_argument("--max-hours", type=float, default=None, help="stop (with a checkpoint) after this long")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps (total)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--min-lr", type=float, default=1e-6)
    p.add_argument("--warmup", type=int, default=100, help="linear LR warm-up (optimizer steps)")
    p.add_argument("--stage", default="joint", choices=["joint", "lm", "vision"],
                   help="joint: CE + Dice with the live vision network, one example at a time; lm: batched "
                        "CE with the ε slots zero (no encode calls), for fast program learning; with "
                        "--vision-prob > 0 its segment calls run too, φ read from the batched pass; vision: "
                        "the language model frozen, φ's head and the vision network trained on the segment "
                        "calls of --batch examples per step (mask loss + anatomy heads)")
    p.add_argument("--batch", type=int, default=16, help="examples per optimizer step in the lm and vision stages")
    p.add_argument("--accum", type=int, default=4, help="examples per optimizer step (gradient accumulation)")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping")
    p.add_argument("--vision-lr-mult", type=float, default=1.0,
                   help="learning-rate multiplier of the vision network (relative to --lr)")
    p.add_argument("--vision-prob", type=float, default=None,
                   help="share of examples (joint) or batches (lm) whose segment calls run (Dice term); the "
                        "rest train the LM only. Default: 1 for joint, 0 for lm")
    p.add_argument("--vision-rois", default=None, metavar="REGEX",
                   help="lm stage: run only the segment calls whose ROI matches, e.g. '^(lesion|absent)' "
                        "(lesions are learnt from far fewer calls than 100+ anatomical structures)")
    p.add_argument("--crop-mm", type=float, default=None, metavar="MM",
                   help="vision stage: each segment call on a random crop of its volumes, MM along the "
                        "anterior-posterior and inferior-superior axes, the whole left-right extent "
                        "(model.training_crop; validation stays on whole volumes)")
    p.add_argument("--workers", type=int, default=1, help="data worker processes (0: in-process)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the training process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt-minutes", type=float, default=10.0)
    p.add_argument("--val-every", type=int, default=250, help="validate every N optimizer steps")
    p.add_argument("--val-subjects", type=int, default=6, help="held-out subjects (4 examples each)")
    p.add_argument("--patience", type=int, default=3, help="validations without improvement before halving LR")
    p.add_argument("--examples-per-subject", type=int, default=8)
    p.add_argument("--max-acquisitions", type=int, default=3)
    p.add_argument("--recovery-prob", type=float, default=0.15,
                   help="share of examples with a failing step, its error and the corrected step "
                        "(voxelprompt/recovery.py), so the model learns to read errors")
    p.add_argument("--data-resolution", type=float, default=None, help="synthetic grid (mm); default: the model's floor")
    p.add_argument("--vocab-from-tokenizer", action="store_true",
                   help="set the LM vocabulary to the tokenizer's size (for configs sized otherwise)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.vision_prob is None:
        args.vision_prob = 0.0 if args.stage == "lm" else 1.0
    rois = re.compile(args.vision_rois) if args.vision_rois else None
    if args.crop_mm is not None and (args.stage != "vision" or args.crop_mm <= 0):
        print(f"error: --crop-mm {args.crop_mm}: needs --stage vision and a size > 0 mm", file=sys.stderr)
        return 2
    from tqdm import tqdm

    from .model import VoxelPrompt

    torch.set_num_threads(args.threads)
    import signal

    def _term(signum, frame):   # SIGTERM: stop like Ctrl-C, writing a final checkpoint
        raise KeyboardInterrupt
    try:
        signal.signal(signal.SIGTERM, _term)
    except ValueError:          # not the main thread
        pass
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    tok = Tokenizer()

    init_examples = 0               # with --init: the examples the given weights were trained on
    ck = find_checkpoint(out) if args.resume else None
    if args.resume and ck is None:
        print(f"error: --resume but no checkpoint in {out}", file=sys.stderr)
        return 2
    if ck is not None:
        from .checkpoint import load_model
        model = load_model(ck / "model.safetensors", device).train()
        st = torch.load(ck / "state.pt", map_location="cpu", weights_only=False)
    elif args.init:
        from .checkpoint import config_path, load_model
        model = load_model(Path(args.init), device).train()
        st = None
        if args.reinit_vision:      # a fresh vision network of --config's design (e.g. new heads)
            from .model import VisionNet
            torch.manual_seed(args.seed)
            vcfg = replace(get_config(args.config).vision, mask_threshold=0.5)
            model.config = replace(model.config, vision=vcfg)
            model.vision = VisionNet(vcfg, model.config.lm.hidden, model.config.lm.phi_dim).to(device).train()
            for mod in model.lm.phi_head:
                if hasattr(mod, "reset_parameters"):
                    mod.reset_parameters()
        elif args.grow_heads:
            want = get_config(args.config).vision
            try:
                model.vision.grow_anatomy(want.anatomy_classes, hidden=want.anatomy_hidden)
            except ValueError as e:
                print(f"error: --grow-heads: {e}", file=sys.stderr)
                return 2
            model.config = replace(model.config, vision=model.vision.cfg)
        try:    # a stage started from saved weights draws fresh subjects, not its parent's stream again
            init_examples = int(json.loads(config_path(Path(args.init)).read_text()).get("examples", 0))
        except (OSError, ValueError):
            init_examples = 0
    else:
        cfg = get_config(args.config)
        if args.vocab_from_tokenizer or cfg.lm.vocab_size < tok.vocab_size:
            cfg = replace(cfg, lm=replace(cfg.lm, vocab_size=tok.vocab_size))
        torch.manual_seed(args.seed)
        model = VoxelPrompt(cfg).to(device).train()
        st = None
    if args.bce_max_ratio is not None:
        if args.bce_max_ratio < 0:
            print(f"error: --bce-max-ratio {args.bce_max_ratio}: expected ≥ 0 (0 = fully balanced)", file=sys.stderr)
            return 2
        model.config = replace(model.config, bce_max_ratio=args.bce_max_ratio or None)
    if model.config.lm.vocab_size < tok.vocab_size:
        print(f"error: model vocabulary {model.config.lm.vocab_size} < tokenizer's {tok.vocab_size}", file=sys.stderr)
        return 2

    # two groups, language model first then vision network: the flat parameter order of
    # model.parameters(), so a single-group optimizer state (older runs) maps onto it by index
    opt = torch.optim.Adam([{"params": list(model.lm.parameters()), "mult": 1.0},
                            {"params": list(model.vision.parameters()), "mult": args.vision_lr_mult}], lr=args.lr)
    state = {"step": 0, "examples": 0, "wall_s": 0.0, "lr": args.lr, "best_val": math.inf, "bad_vals": 0,
             "data_round": init_examples, "skipped": 0, "seed": args.seed, "args": vars(args)}
    if st is not None:
        osd = st["optimizer"]
        if len(osd["param_groups"]) != len(opt.param_groups):
            cur = opt.state_dict()
            cur["state"] = osd["state"]
            osd = cur
        if st.get("param_names") and st["param_names"] != param_names(model):
            osd = remap_optimizer_state(osd, st["param_names"], param_names(model))
            osd["param_groups"] = opt.state_dict()["param_groups"]
        opt.load_state_dict(osd)
        for g, m in zip(opt.param_groups, (1.0, args.vision_lr_mult)):
            g["mult"] = m
        _set_rng_state(st["rng"])
        state.update({k: st[k] for k in state if k in st and k != "args"})
        state["data_round"] = int(st.get("data_round", 0)) + 1
        state["args"] = vars(args)
        print(f"resumed from {ck} at step {state['step']} ({state['examples']} examples, "
              f"{state['wall_s'] / 3600:.2f} h, lr {state['lr']:.2e})", flush=True)
    else:
        torch.manual_seed(args.seed + 1)
        np.random.seed(args.seed)
        random.seed(args.seed)

    data_cfg = data_config_for(model.config, examples_per_subject=args.examples_per_subject,
                               max_acquisitions=args.max_acquisitions, rich_max_acquisitions=args.max_acquisitions,
                               recovery_prob=args.recovery_prob,
                               anatomy_targets=bool(model.config.vision.anatomy_classes),
                               **({"resolution": args.data_resolution} if args.data_resolution else {}))
    (out / "run.json").write_text(json.dumps({"model": model.config.to_dict(), "data": asdict(data_cfg),
                                              "params": model.num_parameters(), "args": vars(args)}, indent=2))
    print(f"model {model.config.name}: {model.num_parameters()}; data {asdict(data_cfg)}", flush=True)
    t0 = time.time()
    val = validation_set(data_cfg, args.val_subjects, out / "val.pkl") if args.val_subjects > 0 else []
    print(f"validation set: {len(val)} examples ({time.time() - t0:.0f} s)", flush=True)

    log = open(out / "metrics.jsonl", "a")

    def logline(d):
        log.write(json.dumps(d) + "\n")
        log.flush()

    def set_lr(lr):
        for g in opt.param_groups:
            g["lr"] = lr * g.get("mult", 1.0)

    deadline = time.time() + args.max_hours * 3600 if args.max_hours else math.inf
    seed = DATA_SEED_BASE + args.seed * 1000 + state["data_round"]
    start_wall, last_ckpt = time.time(), time.time()
    wall0 = state["wall_s"]
    bar = tqdm(initial=state["step"], total=args.max_steps, desc="train", unit="step", disable=args.quiet,
               mininterval=1.0 if sys.stderr.isatty() else 60.0, dynamic_ncols=True)
    stop_reason = "done"
    pending: list = []              # lm stage: length-bucketed batches waiting to be used
    with ExampleStream(data_cfg, seed=seed, workers=args.workers) as stream:
        try:
            while True:
                if args.max_steps is not None and state["step"] >= args.max_steps:
                    stop_reason = "max-steps"
                    break
                if time.time() >= deadline:
                    stop_reason = "max-hours"
                    break
                ts = time.time()
                warm = min(1.0, (state["step"] + 1) / max(1, args.warmup))
                set_lr(state["lr"] * warm)
                ces, dices, anats, adices, sels, n_ok, n_tok = [], [], [], [], [], 0, 0
                if args.stage in ("lm", "vision"):   # one batched step over --batch examples
                    if not pending:         # draw 8 batches' worth, bucket by length (less padding)
                        pool = []
                        while len(pool) < 8 * args.batch:
                            ex = next(stream)
                            if args.stage == "vision" and not any(
                                    c.kind == "segment" and (rois is None or rois.search(c.roi))
                                    for c in ex.vision_calls):
                                continue    # the vision stage needs a segment call to train on
                            try:
                                pool.append(build_sequence(ex, tok))
                            except Exception as exc:  # a malformed example must not stop a run
                                state["skipped"] += 1
                                print(f"skipped an example ({ex.category}): {type(exc).__name__}: {exc}",
                                      file=sys.stderr, flush=True)
                        pool.sort(key=len)
                        pending = [pool[i:i + args.batch] for i in range(0, len(pool), args.batch)]
                        random.shuffle(pending)
                    seqs = pending.pop()
                    seg = args.vision_prob >= 1.0 or random.random() < args.vision_prob
                    with _autocast(device):
                        o = (model.vision_loss(seqs, rois=rois, crop_mm=args.crop_mm) if args.stage == "vision"
                             else model.lm_loss(seqs, segment=seg, rois=rois))
                    if o.total.requires_grad:
                        o.total.backward()
                    n_ok, n_tok = len(seqs), o.n_tokens
                    ces.append(float(o.ce.detach()))
                    if o.n_masks:
                        dices.append(float(o.dice.detach()))
                    if o.anatomy is not None:
                        anats.append(float(o.anatomy.detach()))
                        adices.append(float(o.anatomy_dice.detach()))
                    if o.select is not None:
                        sels.append(float(o.select.detach()))
                while args.stage == "joint" and n_ok < args.accum:
                    ex = next(stream)
                    try:
                        seq = build_sequence(ex, tok)
                        seg = args.vision_prob >= 1.0 or random.random() < args.vision_prob
                        with _autocast(device):
                            o = model.loss(seq, segment=seg)
                        (o.total / args.accum).backward()
                    except Exception as exc:  # a malformed example must not stop a run
                        state["skipped"] += 1
                        print(f"skipped an example ({ex.category}): {type(exc).__name__}: {exc}",
                              file=sys.stderr, flush=True)
                        continue
                    n_ok += 1
                    n_tok += o.n_tokens
                    ces.append(float(o.ce.detach()))
                    if o.n_masks:
                        dices.append(float(o.dice.detach()))
                    if o.anatomy is not None:
                        anats.append(float(o.anatomy.detach()))
                        adices.append(float(o.anatomy_dice.detach()))
                    if o.select is not None:
                        sels.append(float(o.select.detach()))
                gn = float(torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip))
                opt.step()
                opt.zero_grad(set_to_none=True)
                state["step"] += 1
                state["examples"] += n_ok
                now = time.time()
                state["wall_s"] = wall0 + (now - start_wall)
                rec = {"kind": "train", "step": state["step"], "examples": state["examples"],
                       "ce": float(np.mean(ces)), "dice_loss": float(np.mean(dices)) if dices else None,
                       "anatomy_ce": float(np.mean(anats)) if anats else None,
                       "anatomy_dice": float(np.mean(adices)) if adices else None,
                       "select_bce": float(np.mean(sels)) if sels else None,
                       "lr": opt.param_groups[0]["lr"], "vision_lr": opt.param_groups[1]["lr"], "grad_norm": gn, "tokens": n_tok,
                       "ex_per_s": n_ok / (now - ts), "wall_s": round(state["wall_s"], 1)}
                logline(rec)
                bar.update(1)
                bar.set_postfix(ce=f"{rec['ce']:.3f}", dice=f"{rec['dice_loss'] or 0:.3f}",
                                lr=f"{rec['lr']:.1e}", ex_s=f"{rec['ex_per_s']:.2f}", refresh=False)
                if val and state["step"] % args.val_every == 0:
                    v = validate(model, val, tok, device, segment=args.vision_prob > 0, rois=rois)
                    v.update(kind="val", step=state["step"], examples=state["examples"], lr=state["lr"],
                             wall_s=round(state["wall_s"], 1))
                    if v["loss"] < state["best_val"] * 0.995:
                        state["best_val"], state["bad_vals"] = v["loss"], 0
                    else:
                        state["bad_vals"] += 1
                        if state["bad_vals"] >= args.patience and state["lr"] > args.min_lr:
                            state["lr"] = max(args.min_lr, state["lr"] / 2)
                            state["bad_vals"] = 0
                            v["lr_halved_to"] = state["lr"]
                    logline(v)
                    print(f"step {state['step']}: val ce {v['ce']:.4f} dice-loss {v['dice_loss']:.4f} "
                          f"lr {state['lr']:.2e}", file=sys.stderr, flush=True)
                if time.time() - last_ckpt >= args.ckpt_minutes * 60:
                    save_checkpoint(out, model, opt, state)
                    last_ckpt = time.time()
        except KeyboardInterrupt:
            stop_reason = "interrupted"
        finally:
            bar.close()
            state["wall_s"] = wall0 + (time.time() - start_wall)
            save_checkpoint(out, model, opt, state)
            log.close()
    print(f"stopped ({stop_reason}) at step {state['step']} ({state['examples']} examples, "
          f"{state['wall_s'] / 3600:.2f} h); checkpoint {out / 'ckpt'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
