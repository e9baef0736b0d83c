"""``voxelprompt eval paraphrase``: accuracy on held-out phrasings vs training phrasings, per category.

Paired design: for each fresh synthetic case and task category, the same task is sampled twice
from the same random state, once with the training phrasing (``split="train"``) and once with
the held-out phrasing (``split="eval"``: synonyms and templates never seen in training), so the
two prompts differ only in wording. The model runs both as in ``voxelprompt eval synthetic``
(greedy decoding, in-process execution with the live network) and each is scored with
:func:`voxelprompt.evaluate.score_example`. Reported per category and overall, per split:

- program exact match, execution success,
- **correct**: executed, and every result right: QA answer equal to the truth, every
  measurement within 10 % relative error, every segment call with Dice ≥ 0.5,
- mean Dice of the segment calls,

and the held-out − training gap of "correct" with an exact two-sided sign test (McNemar on the
discordant pairs) per category, Benjamini-Hochberg across categories.

Prints the table; ``--out`` writes the JSON.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import defaultdict

import numpy as np
import torch


def correct(score: dict, dice_min: float = 0.5, rel_tol: float = 0.10) -> bool:
    """Whether an example's results are all right (see the module doc)."""
    if not score["executed"]:
        return False
    if score["qa"] is False:
        return False
    if any(not (e <= rel_tol) for e in score["measurements"].values()):
        return False
    if any(d["dice"] < dice_min for d in score["dice"]):
        return False
    return True


def paired_examples(n: int, seed: int, resolution: float, categories=None, progress: bool = True):
    """Yields ``(train example, eval example, lesion classes)`` pairs on fresh one-or-more-session cases."""
    from synth.anatomy import atlas_available
    from synth.subject import generate_subject
    from task_templates import CATEGORIES, Case, Skip, sample
    cats = list(categories or CATEGORIES)
    anatomy = "atlas" if atlas_available() else "phantom"
    made, k = 0, 0
    while made < n and k < 50 * n + 50:
        s = int(np.random.SeedSequence([seed, 515151, k]).generate_state(1)[0])
        k += 1
        rng = np.random.default_rng(s)
        try:
            subj = generate_subject(s, anatomy=anatomy, resolution=resolution, max_acquisitions=3,
                                    n_sessions=int(rng.integers(1, 3)))
            case = Case.from_subject(subj)
        except Exception as exc:  # noqa: BLE001
            print(f"subject {s}: generation failed: {exc}", file=sys.stderr)
            continue
        classes = {str(l.meta["id"]): l.cls for ses in case.sessions for l in ses.lesions}
        order = list(rng.permutation(len(cats)))
        for ci in order[:3]:
            if made >= n:
                break
            cat = cats[int(ci)]
            state = int(rng.integers(2**31))
            try:
                tr = sample(case, np.random.default_rng(state), cat, split="train", typos=False)
                ev = sample(case, np.random.default_rng(state), cat, split="eval", typos=False)
            except Skip:
                continue
            except Exception as exc:  # noqa: BLE001 - a generator bug: skip, say so
                print(f"subject {s}, {cat}: sampling failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                continue
            made += 1
            if progress:
                print(f"  pair {made}/{n}: {cat}: {tr.prompt!r} | {ev.prompt!r}", file=sys.stderr, flush=True)
            yield tr, ev, classes


def _run(model, tok, ex, classes):
    from task_templates import Report

    from .evaluate import run_example, score_example
    try:
        run = run_example(model, tok, ex)
    except Exception as exc:  # noqa: BLE001 - a model failure is a score
        run = {"steps": [], "errors": [f"{type(exc).__name__}: {exc}"], "stopped": False, "truncated": False,
               "report": Report(), "segments": [], "mod_mismatch": False}
    s = score_example(ex, run, classes)
    s["correct"] = correct(s)
    s["prompt"] = ex.prompt
    s["dice_mean"] = float(np.mean([d["dice"] for d in s["dice"]])) if s["dice"] else None
    s["measurements"] = {k: (None if math.isinf(v) else v) for k, v in s["measurements"].items()}
    return s


def sign_test(b: int, c: int) -> float:
    """Exact two-sided McNemar / sign test p-value on b vs c discordant pairs."""
    from scipy.stats import binomtest
    n = b + c
    return 1.0 if n == 0 else float(binomtest(b, n, 0.5).pvalue)


def summarize(pairs: list[tuple[dict, dict]]) -> dict:
    from voxel_lib.metrics import benjamini_hochberg
    by = defaultdict(list)
    for tr, ev in pairs:
        by[tr["category"]].append((tr, ev))
    by_all = {**dict(sorted(by.items())), "all": pairs}
    out = {}
    for cat, ps in by_all.items():
        row = {"n": len(ps)}
        for split, idx in (("train", 0), ("eval", 1)):
            ss = [p[idx] for p in ps]
            row[split] = {"exact": float(np.mean([s["exact"] for s in ss])),
                          "executed": float(np.mean([s["executed"] for s in ss])),
                          "correct": float(np.mean([s["correct"] for s in ss])),
                          "dice_mean": (float(np.mean([s["dice_mean"] for s in ss if s["dice_mean"] is not None]))
                                        if any(s["dice_mean"] is not None for s in ss) else None)}
        b = sum(1 for t, e in ps if t["correct"] and not e["correct"])
        c = sum(1 for t, e in ps if e["correct"] and not t["correct"])
        row["gap_correct"] = row["eval"]["correct"] - row["train"]["correct"]
        row["discordant"] = [b, c]
        row["p"] = sign_test(b, c)
        out[cat] = row
    cats = [c for c in out if c != "all"]
    if cats:
        q = benjamini_hochberg([out[c]["p"] for c in cats])
        for c, qq in zip(cats, q):
            out[c]["q"] = float(qq)
    out["all"]["q"] = out["all"]["p"]
    return out


def print_table(res: dict) -> None:
    print(f"paraphrase robustness: {res['n_pairs']} paired examples (train vs held-out phrasing), "
          f"checkpoint {res['checkpoint']}" + (f" (step {res['checkpoint_step']})" if res.get("checkpoint_step") else ""))
    print(f"{'category':>22} {'n':>3} | {'exact tr':>8} {'ev':>5} | {'exec tr':>7} {'ev':>5} | "
          f"{'correct tr':>10} {'ev':>5} {'gap':>6} {'q':>6} | {'Dice tr':>7} {'ev':>5}")
    f = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    for cat, r in res["per_category"].items():
        print(f"{cat:>22} {r['n']:>3} | {f(r['train']['exact']):>8} {f(r['eval']['exact']):>5} | "
              f"{f(r['train']['executed']):>7} {f(r['eval']['executed']):>5} | {f(r['train']['correct']):>10} "
              f"{f(r['eval']['correct']):>5} {r['gap_correct']:>+6.2f} {f(r.get('q')):>6} | "
              f"{f(r['train']['dice_mean']):>7} {f(r['eval']['dice_mean']):>5}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="voxelprompt eval paraphrase", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None,
                   help="a .safetensors file or training run dir (default: the shipped model)")
    p.add_argument("--n", type=int, default=40, help="paired examples (default 40)")
    p.add_argument("--seed", type=int, default=2468)
    p.add_argument("--categories", nargs="*", default=None, help="only these task categories")
    p.add_argument("--resolution", type=float, default=None,
                   help="synthetic working resolution, mm (default: the model's floor, else 2)")
    p.add_argument("--out", default=None, help="write the JSON results here")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1, see docs/benchmarks.md; 0 = torch's default)")
    return p


def run_paraphrase(model, tok, n: int = 16, seed: int = 2468, categories=None, resolution: float | None = None,
                   progress: bool = True) -> dict:
    t0 = time.time()
    res_mm = resolution or model.config.vision.min_spacing or 2.0
    pairs = []
    for tr, ev, classes in paired_examples(n, seed, res_mm, categories, progress):
        pairs.append((_run(model, tok, tr, classes), _run(model, tok, ev, classes)))
    return {"n_pairs": len(pairs), "seed": seed, "resolution_mm": res_mm, "per_category": summarize(pairs)
            if pairs else {}, "pairs": [{"train": a, "eval": b} for a, b in pairs], "wall_s": round(time.time() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from task_templates import CATEGORIES

    from .alignment import load_for_eval
    bad = [c for c in (args.categories or []) if c not in CATEGORIES]
    if bad:
        print(f"error: unknown categories {bad}; known: {', '.join(CATEGORIES)}", file=sys.stderr)
        return 2
    try:
        model, tok, step = load_for_eval(args.checkpoint, args.device)
    except FileNotFoundError as exc:
        print(f"error: {exc} (pass --checkpoint PATH)", file=sys.stderr)
        return 2
    res = run_paraphrase(model, tok, args.n, args.seed, args.categories, args.resolution)
    res["checkpoint"] = str(args.checkpoint or "default")
    res["checkpoint_step"] = step
    if res["n_pairs"]:
        print_table(res)
    else:
        print("no paired examples could be sampled")
    if args.out:
        from .bench_native import write_json
        write_json(args.out, res, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
