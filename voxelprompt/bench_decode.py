"""``voxelprompt bench decode``: language-model tokens per second, with and without the KV cache.

For each config (default ``cpu`` and ``paper``) a language model α with random weights is built
(tokens/s does not depend on the weights) and fed a prompt of ``--prompt`` random tokens in one
call (prefill), then ``--gen`` tokens are generated greedily one at a time, the way
:meth:`~voxelprompt.model.LanguageModel.generate_step` does: with the KV cache (each step feeds one
token) and, for contrast, without it (each step re-runs the whole sequence). Median of
``--repeats`` runs after one warm-up.

Example::

    voxelprompt bench decode --configs cpu paper --prompt 256 --gen 64 --json decode.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="voxelprompt bench decode", description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=["cpu", "paper"], help="model configs (default cpu paper)")
    p.add_argument("--prompt", type=int, default=256, help="prompt tokens (default 256)")
    p.add_argument("--gen", type=int, default=64, help="generated tokens (default 64)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs, median reported (default 3)")
    p.add_argument("--no-uncached", action="store_true", help="skip the run without the KV cache")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a small shared machine more threads oversubscribe; 0 = torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_path", default=None, help="also write the results as JSON here")
    return p


def _gen(lm, prompt_ids, n_gen: int, use_cache: bool) -> tuple[float, float]:
    """(prefill seconds, generation seconds) for one run."""
    import torch
    state = lm.start(use_cache=use_cache)
    dev = lm.head.weight.device
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)  # noqa: E731
    t = time.perf_counter()
    lm.feed(state, ids=prompt_ids)
    sync()
    t_pre = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(n_gen):
        tok = int(state.logits.argmax())
        lm.feed(state, ids=[tok])
    sync()
    return t_pre, time.perf_counter() - t


def bench_config(name: str, prompt: int = 256, gen: int = 64, repeats: int = 3, uncached: bool = True,
                 device: str = "cpu", seed: int = 0) -> dict:
    import torch

    from .configs import get_config
    from .model import LanguageModel

    torch.manual_seed(seed)
    cfg = get_config(name).lm
    lm = LanguageModel(cfg).to(device).eval()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, cfg.vocab_size, (prompt,), generator=g).tolist()
    out = {"config": name, "params_m": sum(p.numel() for p in lm.parameters()) / 1e6, "layers": cfg.layers,
           "hidden": cfg.hidden, "vocab": cfg.vocab_size, "prompt_tokens": prompt, "gen_tokens": gen}
    with torch.no_grad():
        _gen(lm, ids[:16], 4, True)   # warm-up
        runs = [_gen(lm, ids, gen, True) for _ in range(repeats)]
        pre = statistics.median(r[0] for r in runs)
        dec = statistics.median(r[1] for r in runs)
        out.update(prefill_s=pre, prefill_tok_s=prompt / pre, gen_cached_s=dec, gen_cached_tok_s=gen / dec,
                   ms_per_token_cached=1000 * dec / gen)
        if uncached:
            runs = [_gen(lm, ids, gen, False) for _ in range(max(1, repeats - 2))]
            dec_u = statistics.median(r[1] for r in runs)
            out.update(gen_uncached_s=dec_u, gen_uncached_tok_s=gen / dec_u, cache_speedup=dec_u / dec)
    return out


def print_table(res: dict) -> None:
    print(f"language-model decode speed (random weights, {res['device']}, {res['threads']} threads, "
          f"prompt {res['prompt']} tokens, {res['gen']} generated, greedy)")
    print(f"{'config':>7} {'params':>8} {'prefill tok/s':>13} {'gen tok/s (KV cache)':>21} {'ms/token':>9} "
          f"{'gen tok/s (no cache)':>21} {'cache speed-up':>15}")
    for r in res["results"]:
        unc = f"{r['gen_uncached_tok_s']:.1f}" if "gen_uncached_tok_s" in r else "-"
        sp = f"{r['cache_speedup']:.1f}x" if "cache_speedup" in r else "-"
        print(f"{r['config']:>7} {r['params_m']:>7.1f}M {r['prefill_tok_s']:>13.0f} {r['gen_cached_tok_s']:>21.1f} "
              f"{r['ms_per_token_cached']:>9.1f} {unc:>21} {sp:>15}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from .bench_native import machine, write_json
    from .configs import CONFIGS
    bad = [c for c in args.configs if c not in CONFIGS]
    if bad:
        print(f"error: unknown config(s) {bad}; known: {', '.join(CONFIGS)}", file=sys.stderr)
        return 2
    if args.prompt < 1 or args.gen < 1 or args.repeats < 1:
        print("error: --prompt, --gen and --repeats must be >= 1", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    results = []
    for c in args.configs:
        results.append(bench_config(c, args.prompt, args.gen, args.repeats, not args.no_uncached, args.device,
                                    args.seed))
        print(f"  {c}: done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    res = {"device": args.device, "threads": torch.get_num_threads(), "prompt": args.prompt, "gen": args.gen,
           "repeats": args.repeats, "results": results, "machine": machine(), "wall_s": time.perf_counter() - t0}
    print_table(res)
    if args.json_path:
        write_json(args.json_path, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
