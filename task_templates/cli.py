"""``voxelprompt tasks sample|stats|check|corpus``: look at, measure and verify the task catalog."""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time

import numpy as np

from .case import Case
from .catalog import CATEGORIES, T, TEMPLATE_GROUPS, Skip
from .grammar import count_forms, heldout_flags
from .sampler import CheckFailure, sample, sample_prompt
from .terms import ANATOMY, LESION_TERMS


#: a rich two-session protocol, so every category (DWI/ADC, T1c, longitudinal) can be sampled
RICH_PROTOCOL = [["t1w", "t2w", "flair", "t1c", "dwi", "adc"], ["t1w", "t2w", "flair"]]


def _cases(seed: int, n: int, sources: list[str], resolution: float = 3.0):
    """Synthetic cases for sampling: anatomy sources alternate; every other case has a rich protocol."""
    from synth.subject import generate_subject
    for i in range(n):
        src = sources[i % len(sources)]
        rich = (i // len(sources)) % 2 == 0
        subj = generate_subject(seed * 1000 + i, anatomy=src, resolution=resolution,
                                protocols=RICH_PROTOCOL if rich else None)
        yield Case.from_subject(subj)


def render(ex) -> str:
    """A readable text form of an example."""
    lines = [f"[{ex.category}] {ex.prompt}"]
    lines += [f"  {v.line()}" for v in ex.volumes]
    for k, st in enumerate(ex.steps):
        lines.append(f"  --- step {k + 1}")
        lines += ["  >>> " + ln for ln in st.code.splitlines()]
        lines += ["  " + ln for ln in st.output.rstrip().splitlines()]
    return "\n".join(lines)


def cmd_sample(args) -> int:
    rng = np.random.default_rng(args.seed)
    cats = [args.category] if args.category else CATEGORIES
    shown = 0
    for case in _cases(args.seed, max(1, args.n // len(cats) + 1), [args.anatomy]):
        for cat in cats:
            if shown >= args.n:
                return 0
            try:
                ex = sample(case, rng, cat, split=args.split)
            except Skip:
                continue
            print(render(ex) + "\n")
            shown += 1
    return 0


def cmd_check(args) -> int:
    """Oracle check: every program reproduces its expected results."""
    rng = np.random.default_rng(args.seed)
    per_case = max(1, args.per_case)
    passed, failed, skipped = collections.Counter(), collections.Counter(), collections.Counter()
    failures = []
    sources = ["phantom", "atlas"] if args.anatomy == "both" else [args.anatomy]
    t0 = time.time()
    total = 0
    n_cases = 0
    for case in _cases(args.seed, 10**9, sources, args.resolution):  # until n examples ran
        if total >= args.n:
            break
        n_cases += 1
        for cat in CATEGORIES:
            for _ in range(per_case):
                if total >= args.n:
                    break
                try:
                    sample(case, rng, cat, split="any")
                    passed[cat] += 1
                except Skip:
                    skipped[cat] += 1
                    continue
                except (CheckFailure, Exception) as exc:  # any failure of a template is a bug
                    failed[cat] += 1
                    failures.append({"category": cat, "source": case.source, "error": f"{type(exc).__name__}: {exc}"})
                total += 1
    rows = {c: {"passed": passed[c], "failed": failed[c], "skipped": skipped[c],
                "pass_rate": passed[c] / max(1, passed[c] + failed[c])} for c in CATEGORIES}
    out = {"n": total, "cases": n_cases, "seconds": time.time() - t0, "categories": rows,
           "passed": sum(passed.values()), "failed": sum(failed.values()), "failures": failures[:50]}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{'category':<22} {'passed':>7} {'failed':>7} {'skipped':>8} {'pass rate':>10}")
        for c, r in rows.items():
            print(f"{c:<22} {r['passed']:7d} {r['failed']:7d} {r['skipped']:8d} {100 * r['pass_rate']:9.1f}%")
        print(f"total: {out['passed']} passed, {out['failed']} failed on {n_cases} cases in {out['seconds']:.0f} s")
        for f in failures[:10]:
            print(f"  FAIL {f['category']} ({f['source']}): {f['error']}")
    return 0 if not failures else 1


def cmd_stats(args) -> int:
    """Templates per task, distinct prompts per task over many samples, ROI terms, token lengths."""
    rng = np.random.default_rng(args.seed)
    templates = TEMPLATE_GROUPS
    out = {"categories": {}}
    cases = list(_cases(args.seed, args.cases, ["phantom"], 3.0))
    prompts = collections.defaultdict(set)
    lengths = collections.defaultdict(list)
    per_cat = max(1, args.samples // len(CATEGORIES))
    t0 = time.time()
    for cat in CATEGORIES:
        for i in range(per_cat):
            case = cases[i % len(cases)]
            try:
                prompts[cat].add(sample_prompt(case, rng, cat, split="any"))
            except Skip:
                continue
        for i in range(args.programs):  # full examples for lengths
            try:
                ex = sample(cases[i % len(cases)], rng, cat, split="any")
            except Skip:
                continue
            lengths[cat].append(len(ex.header()) + sum(len(s.code) + len(s.output) for s in ex.steps))
    for cat in CATEGORIES:
        tl = [t for k in templates[cat] for t in T[k]]
        held = sum(f for k in templates[cat] for f in heldout_flags(T[k]))
        out["categories"][cat] = {
            "templates": len(tl), "heldout_templates": int(held),
            "template_forms": int(sum(count_forms(t) for t in tl)),
            "distinct_prompts": len(prompts[cat]), "samples": per_cat,
            "chars_median": float(np.median(lengths[cat])) if lengths[cat] else 0.0,
            "tokens_median": (float(np.median(lengths[cat])) / args.chars_per_token) if lengths[cat] else 0.0,
        }
    out["roi_terms"] = {"anatomy_keys": len(ANATOMY), "anatomy_terms": sum(len(v[1]) for v in ANATOMY.values()),
                        "lesion_terms": sum(len(v) for v in LESION_TERMS.values())}
    out["seconds"] = time.time() - t0
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"{'category':<22} {'templates':>9} {'held-out':>8} {'forms':>10} {'distinct':>9} {'chars':>7} {'tokens':>7}")
    for c, r in out["categories"].items():
        print(f"{c:<22} {r['templates']:9d} {r['heldout_templates']:8d} {r['template_forms']:10d} "
              f"{r['distinct_prompts']:9d} {r['chars_median']:7.0f} {r['tokens_median']:7.0f}")
    rt = out["roi_terms"]
    print(f"ROI terms: {rt['anatomy_keys']} anatomical keys with {rt['anatomy_terms']} names; "
          f"{rt['lesion_terms']} lesion terms; {per_cat} samples per category in {out['seconds']:.0f} s")
    return 0


def cmd_corpus(args) -> int:
    """Writes a text corpus (prompts, metadata lines, code, outputs) for tokenizer training."""
    from .corpus import write_corpus
    n = write_corpus(args.out, args.n, args.seed, cases=args.cases)
    print(f"wrote {n} examples to {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="voxelprompt tasks", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sample", help="print sampled examples")
    s.add_argument("--n", type=int, default=5)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--category", choices=CATEGORIES)
    s.add_argument("--anatomy", choices=["phantom", "atlas"], default="phantom")
    s.add_argument("--split", choices=["train", "eval", "any"], default="train")
    s.set_defaults(func=cmd_sample)
    c = sub.add_parser("check", help="oracle check: programs reproduce the expected results")
    c.add_argument("--n", type=int, default=2000)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--per-case", type=int, default=6, help="examples per category per case")
    c.add_argument("--anatomy", choices=["phantom", "atlas", "both"], default="both")
    c.add_argument("--resolution", type=float, default=3.0, help="working grid of the cases (mm)")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_check)
    st = sub.add_parser("stats", help="templates, distinct prompts, ROI terms, lengths")
    st.add_argument("--samples", type=int, default=100_000)
    st.add_argument("--cases", type=int, default=4)
    st.add_argument("--programs", type=int, default=20, help="full examples per category for lengths")
    st.add_argument("--chars-per-token", type=float, default=3.5,
                    help="token estimate until the trained tokenizer ships")
    st.add_argument("--seed", type=int, default=0)
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_stats)
    co = sub.add_parser("corpus", help="write a text corpus for tokenizer training")
    co.add_argument("--out", required=True)
    co.add_argument("--n", type=int, default=20000)
    co.add_argument("--cases", type=int, default=8)
    co.add_argument("--seed", type=int, default=0)
    co.set_defaults(func=cmd_corpus)
    args = p.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
