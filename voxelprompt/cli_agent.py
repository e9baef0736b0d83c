"""The agent's subcommands: ``ask``, ``replay``, ``serve``, ``batch``, ``demo``.

``register(subparsers)`` adds them to ``voxelprompt``'s parser (see :mod:`voxelprompt.cli`).
Errors a user can fix (a missing checkpoint, a bad volume, a changed input) print one
``error: ...`` line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def _volume_arg(text: str) -> tuple[str, str]:
    key, sep, path = text.partition("=")
    if not sep or not key or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: use NAME=PATH, e.g. t1=scan.nii.gz or t1@2021-03-01=a.nii.gz")
    return key.strip(), path.strip()


def _limits(args):
    from .agent import AgentLimits
    lim = AgentLimits()
    for k in ("max_steps", "max_tokens", "max_seconds", "step_timeout"):
        v = getattr(args, k, None)
        if v is not None:
            setattr(lim, k, v)
    return lim


def _add_limits(p) -> None:
    g = p.add_argument_group("limits")
    g.add_argument("--max-steps", type=int, help="code steps per question (default 12)")
    g.add_argument("--max-tokens", type=int, help="generated tokens per question (default 4096)")
    g.add_argument("--max-seconds", type=float, help="wall-clock seconds per question (default 600)")
    g.add_argument("--step-timeout", type=float, help="seconds one step may run in the sandbox (default 120)")


def _add_policy(p) -> None:
    p.add_argument("--checkpoint", help="model checkpoint (default: the one shipped in voxelprompt/assets/)")
    p.add_argument("--policy", default=None, metavar="model|MODULE:FUNCTION",
                   help="what writes the code: the trained model (default) or a Python factory "
                        "inputs -> Policy (e.g. a scripted policy with ground-truth masks)")


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


# ============================================================================================ ask
def cmd_ask(args) -> int:
    """Answers one question about scans; writes the transcript, outputs and previews to --out."""
    from .agent import AgentError, Conversation, prepare_inputs
    from .policy import CheckpointError, policy_factory
    out = Path(args.out or f"voxelprompt-out/ask-{time.strftime('%Y%m%d-%H%M%S')}")
    volumes = {}
    for key, path in args.volume:
        if key in volumes:
            return _fail(f"volume {key!r} given twice")
        volumes[key] = path
    try:
        factory, _ = policy_factory(args.policy, checkpoint=args.checkpoint)
        inputs = prepare_inputs(volumes, copy_dir=out)
        policy = factory(inputs)
        with Conversation(inputs, policy, out_dir=out, limits=_limits(args),
                          vision_source=getattr(policy, "source", None)) as conv:
            ans = conv.ask(args.prompt)
    except (CheckpointError, AgentError) as exc:
        return _fail(str(exc))
    if args.json:
        print(json.dumps(ans.to_dict(), indent=1, default=str))
    else:
        print(ans.text or "(no answer)")
        if ans.status != "done":
            print(f"[{ans.status}] {ans.message}")
        for m in ans.measurements:
            print(f"  {m}")
        for o in ans.outputs.values():
            print(f"  output {o.name}: {o.path} (preview {o.preview})")
        print(f"transcript: {ans.transcript.path} (.md, .html beside it)")
    return 0 if ans.status != "error" else 1


# ========================================================================================= replay
def cmd_replay(args) -> int:
    """Re-runs a transcript in a fresh sandbox; exit status 0 when every output matches, 1 otherwise."""
    from .agent import ReplayError, replay
    from .transcript import TranscriptError
    try:
        rep = replay(args.transcript, checkpoint=args.checkpoint, out=args.out)
    except (ReplayError, TranscriptError) as exc:
        return _fail(str(exc))
    if args.json:
        print(json.dumps(rep.to_dict(), indent=1, default=str))
    else:
        print(rep.summary())
    return 0 if rep.matches else 1


# ========================================================================================== serve
def cmd_serve(args) -> int:
    """Runs the REST service (needs VOXELPROMPT_TOKEN)."""
    from .policy import CheckpointError
    from .service import TOKEN_ENV, ServiceSettings, default_state_dir, serve
    token = os.environ.get(TOKEN_ENV, "")
    if not token:
        return _fail(f"set {TOKEN_ENV} to the bearer token clients must send (e.g. "
                     f"export {TOKEN_ENV}=$(python -c 'import secrets; print(secrets.token_urlsafe(32))'))")
    settings = ServiceSettings(
        token=token, state_dir=Path(args.state_dir) if args.state_dir else default_state_dir(),
        data_root=Path(args.data_root).resolve() if args.data_root else None,
        max_upload_bytes=int(args.max_upload_mb * (1 << 20)), max_kernels=args.max_kernels,
        queue_timeout=args.queue_timeout, pool_size=args.pool_size, limits=_limits(args), policy=args.policy,
        checkpoint=Path(args.checkpoint) if args.checkpoint else None)
    try:
        serve(args.host, args.port, settings, log_level=args.log_level)
    except CheckpointError as exc:
        return _fail(f"{exc} (or serve a scripted policy with --policy MODULE:FUNCTION)")
    return 0


# ========================================================================================== batch
def cmd_batch(args) -> int:
    """Runs prompts over a BIDS dataset or a CSV manifest into a tidy CSV (resumable)."""
    from .agent import AgentError
    from .batch import run_batch
    from .policy import CheckpointError
    try:
        summary = run_batch(args.dataset, args.prompt, args.out, workers=args.workers, mode=args.mode,
                            policy=args.policy, checkpoint=args.checkpoint, limits=_limits(args),
                            progress=not args.no_progress)
    except (CheckpointError, AgentError, FileNotFoundError, ValueError) as exc:
        return _fail(str(exc))
    print(summary)
    return 0 if summary.failed == 0 else 1


# =========================================================================================== demo
def cmd_demo(args) -> int:
    """Representative questions on the MNI152 T1 and a synthetic two-session subject."""
    from .policy import CheckpointError
    from .demo import run_demo
    try:
        run_demo(args.out, checkpoint=args.checkpoint, scripted=True if args.scripted else None,
                 resolution=args.resolution)
    except CheckpointError as exc:
        return _fail(str(exc))
    return 0


# ======================================================================================= register
def register(sub) -> None:
    """Adds ``ask``, ``replay``, ``serve``, ``batch`` and ``demo`` to an argparse subparsers object."""
    a = sub.add_parser("ask", help="ask a question about scans (writes answer, transcript, outputs, previews)",
                       description="Ask a question about one or more scans. The model writes Python that runs in "
                                   "a sandbox; the transcript, output volumes and PNG previews go to --out.")
    a.add_argument("prompt", help="the question, e.g. \"what is the volume of the left hippocampus?\"")
    a.add_argument("-v", "--volume", action="append", type=_volume_arg, required=True, metavar="NAME=PATH",
                   help="an input scan: t1=scan.nii.gz, flair=f.nii.gz; dated series t1@2021-03-01=a.nii.gz")
    a.add_argument("--out", help="output folder (default voxelprompt-out/ask-<time>)")
    a.add_argument("--json", action="store_true", help="print {answer, measurements, outputs, transcript} as JSON")
    _add_policy(a)
    _add_limits(a)
    a.set_defaults(func=cmd_ask)

    r = sub.add_parser("replay", help="re-run a transcript in a fresh sandbox and check every output",
                       description="Re-runs the recorded code of a transcript with the same checkpoint (recorded "
                                   "conditioning) or the recorded masks, and the same inputs (checked by sha256); "
                                   "exit status 0 when every output matches.")
    r.add_argument("transcript", help="transcript.json (or its folder)")
    r.add_argument("--checkpoint", help="the checkpoint, if it moved (its sha256 must match)")
    r.add_argument("--out", help="folder for the replay's transcript (default: a temporary folder)")
    r.add_argument("--json", action="store_true", help="print every check as JSON")
    r.set_defaults(func=cmd_replay)

    s = sub.add_parser("serve", help="run the REST service (bearer token from VOXELPROMPT_TOKEN)",
                       description="The REST service: sessions, questions, streamed steps, transcripts, outputs. "
                                   "OpenAPI docs at /docs.")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--state-dir", help="database and session files (default $VOXELPROMPT_STATE_DIR or "
                                       "~/.local/share/voxelprompt/service)")
    s.add_argument("--data-root", help="sessions may reference server-side files under this folder")
    s.add_argument("--max-upload-mb", type=float, default=1024, help="largest upload request (default 1024 MB)")
    s.add_argument("--max-kernels", type=int, default=4, help="live kernels (default 4)")
    s.add_argument("--queue-timeout", type=float, default=120, help="seconds a message waits for a kernel")
    s.add_argument("--pool-size", type=int, default=1, help="kernels started ahead of need (default 1)")
    s.add_argument("--log-level", default="info")
    _add_policy(s)
    _add_limits(s)
    s.set_defaults(func=cmd_serve)

    b = sub.add_parser("batch", help="run prompts over a BIDS dataset or CSV manifest into a tidy CSV",
                       description="Runs each prompt on each subject (longitudinal prompts: all sessions in date "
                                   "order; others: each session). Resumable: done runs are skipped.")
    b.add_argument("dataset", help="a BIDS folder (sub-*/ses-*/anat/*.nii.gz) or a CSV manifest "
                                   "(subject,session,date,volume,path)")
    b.add_argument("--prompt", action="append", required=True, help="a question (repeat for several)")
    b.add_argument("--out", required=True, help="the results CSV")
    b.add_argument("--workers", type=int, default=1, help="runs in parallel (default 1)")
    b.add_argument("--mode", choices=("auto", "longitudinal", "cross-sectional"), default="auto",
                   help="auto: longitudinal prompts (growth, change, ...) get all sessions, others each session")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_policy(b)
    _add_limits(b)
    b.set_defaults(func=cmd_batch)

    d = sub.add_parser("demo", help="representative questions on the MNI152 T1 and a synthetic subject",
                       description="Volume, asymmetry, lesion growth, characterisation and crop questions; writes "
                                   "answers, transcripts and previews and prints a summary.")
    d.add_argument("--out", default="voxelprompt-demo", help="output folder (default voxelprompt-demo)")
    d.add_argument("--checkpoint", help="model checkpoint (default: the shipped one)")
    d.add_argument("--scripted", action="store_true",
                   help="run the ground-truth programs with oracle masks instead of the model")
    d.add_argument("--resolution", type=float, default=2.0, help="synthetic subject's grid (mm, default 2)")
    d.set_defaults(func=cmd_demo)
