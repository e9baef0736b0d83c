"""The agent loop and the Python API: ``Assistant.load(...).ask(prompt, volumes=...)``.

One question runs as (seeds/004 §3, ``docs/agent_api.md``)::

    state = prompt + one line per volume (name, modality, date)
    loop:  step = policy.next_step(state)            # greedy KV-cache decoding, or a script
           parse the step (strip <MOD>, ast.parse)   # a syntax error is fed back, never run
           put the step's φ (or masks) into the kernel; run the step in the sandbox
           printed output (truncated), errors and ε go back into the state
    until <STOP>, or a limit on steps, tokens or time (the answer says which)
    collect report(): answer text, measurements (with units), output volumes (NIfTI + PNG)

A :class:`Conversation` owns one sandboxed kernel; follow-up questions keep its variables. Every
step is written to the transcript (``transcript.json``, see :mod:`voxelprompt.transcript`) as soon
as it has run. :func:`replay` re-runs a transcript's code in a fresh kernel and checks every output.
"""

from __future__ import annotations

import ast
import dataclasses
import datetime as dt
import json
import math
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

import voxel_lib as vl
from task_templates.api import count_mod, strip_mod
from task_templates.example import VolumeInfo
from task_templates.terms import CONTRAST_STEM, MODALITIES

from . import kernel_api
from .policy import ModelPolicy, Policy, ScriptedPolicy, Step, checkpoint_threshold, load_checkpoint
from .transcript import (Transcript, TranscriptError, file_sha256, format_value, now_iso,
                         volume_sha256)

#: names accepted for each kernel variable stem (``-v t1=...``, ``volumes={"t1w": ...}``)
STEM_ALIASES = {**{s: s for s in MODALITIES}, **CONTRAST_STEM, "t1ce": "t1c", "t1gd": "t1c", "t1post": "t1c",
                "t2flair": "flair", "pdw": "pd", "t2star": "gre", "trace": "dwi"}
MAX_EPS_ROWS = 256


def _repeats_a_failure(steps: list[dict]) -> bool:
    """Whether the last step repeats the code of an earlier step of the turn that failed the same way."""
    last = steps[-1]
    key = (last["code"].strip(), last["error"]["name"], last["error"]["message"])
    return any(s["error"] and (s["code"].strip(), s["error"]["name"], s["error"]["message"]) == key
               for s in steps[:-1])


class AgentError(RuntimeError):
    """The agent cannot run: bad inputs, a missing checkpoint, a broken kernel."""


class InputError(AgentError, ValueError):
    """An input volume is missing, unreadable or named wrongly."""


# ========================================================================================= inputs
@dataclass
class InputVolume:
    """One input volume as the agent uses it.

    Attributes:
        name: the kernel variable (``t1``; ``t1_2`` for the second session's T1).
        stem: the acquisition (``t1``, ``flair``, ...).
        modality: the modality word of the metadata line (``T1w``).
        date: ISO date of the session, or None.
        session: session index in date order.
        volume: the loaded volume (native geometry and intensities, float32).
        path: the file it came from (None for an in-memory volume).
        sha256: sha256 of the file's bytes.
        file: a copy inside the transcript folder (in-memory inputs), relative to it.
    """

    name: str
    stem: str
    modality: str
    date: str | None
    session: int
    volume: vl.Volume
    path: str | None = None
    sha256: str = ""
    file: str | None = None

    def line(self) -> str:
        """The metadata line of the model's initial state (``t1_2: T1w, 2023-04-02``)."""
        return VolumeInfo(self.name, self.modality, self.date, self.session).line()

    def record(self) -> dict:
        v = self.volume
        return {"name": self.name, "stem": self.stem, "modality": self.modality, "date": self.date,
                "session": self.session, "path": self.path, "file": self.file, "sha256": self.sha256,
                "content_sha256": volume_sha256(v), "shape": list(v.shape),
                "spacing": [round(float(s), 6) for s in v.spacing], "orientation": v.orientation,
                "affine": [[round(float(x), 6) for x in row] for row in v.affine.tolist()],
                "dtype": str(v.tensor.dtype).removeprefix("torch.")}


def parse_volume_key(key: str) -> tuple[str, str | None]:
    """``"t1"`` → ``("t1", None)``; ``"t1@2021-03-01"`` → ``("t1", "2021-03-01")``; ``"flair_2"`` → ``("flair", None)``."""
    base, _, date = str(key).partition("@")
    base = base.strip().lower()
    stem = STEM_ALIASES.get(base) or STEM_ALIASES.get(base.rsplit("_", 1)[0] if "_" in base else "")
    if stem is None:
        raise InputError(f"unknown volume name {key!r}: use one of {', '.join(MODALITIES)} "
                         "(optionally with @YYYY-MM-DD for a dated session)")
    return stem, (parse_date(date, key) if date else None)


def parse_date(text: str, what: str = "date") -> str:
    """An ISO date (``YYYY-MM-DD``; ``YYYYMMDD`` and ISO date-times are accepted)."""
    t = str(text).strip()
    for fmt in ("%Y-%m-%d", "%Y%m%d"):
        try:
            return dt.datetime.strptime(t[:10] if fmt == "%Y-%m-%d" else t, fmt).date().isoformat()
        except ValueError:
            continue
    raise InputError(f"{what}: {text!r} is not a date (use YYYY-MM-DD)")


def load_volume(path: str | Path, max_voxels: int | None = None) -> vl.Volume:
    """Loads an input scan as a float32 image volume (native geometry and intensities)."""
    try:
        v = vl.load(path, kind="image", max_voxels=max_voxels)
    except vl.VolumeError as exc:
        raise InputError(str(exc)) from None
    if v.channels != 1:
        raise InputError(f"{path}: {v.channels} channels; the agent takes single-channel 3D scans")
    return v.float()


def prepare_inputs(volumes: dict[str, Any], dates: dict[str, str] | None = None, *,
                   copy_dir: str | Path | None = None, max_voxels: int | None = None) -> list[InputVolume]:
    """Names, dates and sessions of the input volumes.

    Args:
        volumes: ``{key: path or Volume}``; a key is a modality stem (``t1``, ``flair``, ...),
            optionally with a date (``t1@2021-03-01``) or a suffix (``t1_pre``).
        dates: ``{key: date}`` for keys without ``@date``.
        copy_dir: where in-memory volumes are saved (so that transcripts can be replayed).
        max_voxels: refuse larger files.

    Volumes sharing a date form a session; with several sessions every variable gets the session
    number in date order (``t1_1``, ``t1_2``), as in training.
    """
    if not volumes:
        raise InputError("no input volumes: give at least one scan (e.g. t1=scan.nii.gz)")
    dates = dict(dates or {})
    items = []
    for key, src in volumes.items():
        stem, date = parse_volume_key(key)
        if date is None and key in dates and dates[key]:
            date = parse_date(dates[key], f"date of {key}")
        items.append((key, stem, date, src))
    dated = [d for _, _, d, _ in items if d]
    if dated and len(dated) != len(items):
        undated = [k for k, _, d, _ in items if not d]
        raise InputError(f"some volumes have dates and some do not ({', '.join(undated)}): "
                         "give every volume a date, or none")
    sessions = sorted(set(dated))
    multi = len(sessions) > 1
    seen = set()
    out: list[InputVolume] = []
    for key, stem, date, src in items:
        s = sessions.index(date) if date else 0
        name = f"{stem}_{s + 1}" if multi else stem
        if name in seen:
            raise InputError(f"two {MODALITIES[stem][0]} volumes in the same session ({name}); "
                             "give them different dates or keep one")
        seen.add(name)
        if isinstance(src, vl.Volume):
            vol, path, sha, file = src.as_image().float(), None, "", None
            if vol.channels != 1:
                raise InputError(f"{key}: {vol.channels} channels; the agent takes single-channel 3D scans")
            if copy_dir is not None:
                p = vl.save(vol, Path(copy_dir) / "inputs" / f"{name}.nii.gz")
                file, sha = f"inputs/{name}.nii.gz", file_sha256(p)
            else:
                sha = volume_sha256(vol)
        else:
            p = Path(src).expanduser()
            if not p.is_file():
                raise InputError(f"{key}: {p} is not a file")
            vol, path, sha, file = load_volume(p, max_voxels), str(p.resolve()), file_sha256(p), None
        out.append(InputVolume(name, stem, MODALITIES[stem][0], date, s, vol, path, sha, file))
    out.sort(key=lambda i: i.session)
    return out


# ========================================================================================= limits
@dataclass
class AgentLimits:
    """Limits of one question.

    Attributes:
        max_steps: code steps before the agent gives up.
        max_step_tokens: tokens of one code step.
        max_tokens: generated tokens of one question.
        max_seconds: wall-clock time of one question.
        step_timeout: seconds one step may run in the kernel.
        output_chars: printed output kept per step (fed back to the model and recorded).
    """

    max_steps: int = 12
    max_step_tokens: int = 512
    max_tokens: int = 4096
    max_seconds: float = 600.0
    step_timeout: float = 120.0
    output_chars: int = 2000


# ========================================================================================== state
@dataclass
class ExecutedStep:
    """A step after it ran, as the policy sees it."""

    index: int
    code: str
    output: str                       # what is fed back: printed output (+ the error), truncated
    error: dict | None = None
    eps: torch.Tensor | None = None   # (n, b) ε of the step's encode() calls


@dataclass
class AgentState:
    """The state of one question, passed to :meth:`Policy.next_step`."""

    turn: int
    prompt: str
    header: str
    inputs: list[InputVolume]
    steps: list[ExecutedStep] = field(default_factory=list)
    tokens: int = 0
    token_budget: int = 0


# ========================================================================================= answer
@dataclass
class Measurement:
    name: str
    value: Any           # a number, a list (centre of mass, RAS mm) or a dict (extents)
    unit: str | None

    def __str__(self) -> str:
        return f"{self.name}: {format_value(self.value)}{' ' + self.unit if self.unit else ''}"


@dataclass
class OutputVolume:
    """An output volume: NIfTI in its own (input) geometry, and a PNG preview."""

    name: str
    volume: vl.Volume
    path: Path
    preview: Path | None
    sha256: str


@dataclass
class Answer:
    """The result of one question.

    Attributes:
        text: the answer (``report(answer=...)``, else the measurements spelled out).
        measurements: name, value, unit.
        outputs: output volumes by name.
        status: ``done``, ``step_limit``, ``token_limit``, ``time_limit``, ``context_limit``,
            ``repeated_error`` (the model wrote a step that had already failed, with the same error:
            greedy decoding would loop) or ``error``.
        message: why it stopped, when not ``done``.
        transcript: the conversation's transcript (all questions so far).
        turn: index of this question in the transcript.
    """

    text: str | None
    measurements: list[Measurement]
    outputs: dict[str, OutputVolume]
    status: str
    message: str | None
    transcript: Transcript
    turn: int

    @property
    def ok(self) -> bool:
        return self.status == "done"

    @property
    def steps(self) -> list[dict]:
        return self.transcript.turns[self.turn]["steps"]

    def measurement(self, name: str) -> Measurement:
        for m in self.measurements:
            if m.name == name:
                return m
        raise KeyError(f"no measurement {name!r}; have {[m.name for m in self.measurements]}")

    def to_dict(self) -> dict:
        """``{answer, status, message, measurements, outputs, transcript}`` (JSON-able)."""
        return {"answer": self.text, "status": self.status, "message": self.message,
                "measurements": [dataclasses.asdict(m) for m in self.measurements],
                "outputs": [{"name": o.name, "path": str(o.path), "preview": str(o.preview) if o.preview else None,
                             "sha256": o.sha256, "shape": list(o.volume.shape), "kind": o.volume.kind}
                            for o in self.outputs.values()],
                "transcript": str(self.transcript.path)}

    def __str__(self) -> str:
        lines = [self.text or "(no answer)"]
        if self.status != "done":
            lines.append(f"[{self.status}] {self.message}")
        return "\n".join(lines)


# ========================================================================================= kernel
def kernel_checkpoint(checkpoint: str | Path) -> Path:
    """A world-readable copy of a checkpoint in a folder of its own, for binding into kernels.

    The kernel runs under its own user id and sees only what is bound into it: binding a private
    copy (``$VOXELPROMPT_CACHE`` or ``~/.cache/voxelprompt``, else the temporary folder) exposes
    neither the checkpoint's neighbours nor its permissions. Copies are keyed by sha256.
    """
    import os
    src = Path(checkpoint).resolve()
    sha = file_sha256(src)
    roots = [os.environ.get("VOXELPROMPT_CACHE"), str(Path.home() / ".cache" / "voxelprompt"), tempfile.gettempdir()]
    last = None
    for root in [r for r in roots if r]:
        d = Path(root) / "kernel-checkpoints" / sha[:24]
        dst = d / src.name
        try:
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o755)
            for f in (src, src.with_suffix(".json")):     # the weights and their config
                out = d / f.name
                if f.is_file() and (not out.is_file() or out.stat().st_size != f.stat().st_size
                                    or (f.suffix == ".json" and out.read_bytes() != f.read_bytes())):
                    tmp = d / f".{f.name}.{os.getpid()}.tmp"
                    shutil.copyfile(f, tmp)
                    os.chmod(tmp, 0o644)
                    os.replace(tmp, out)
            return dst
        except OSError as exc:
            last = exc
    raise AgentError(f"cannot stage the checkpoint for the sandbox: {last}")


def kernel_config(checkpoint: str | Path | None = None, base=None, threshold: float | None = None):
    """The sandbox configuration of an agent kernel: the agent API in the preamble and, for the
    network backend, a read-only copy of the checkpoint bound in and its vision network loaded."""
    from sandbox import SandboxConfig
    base = base if base is not None else SandboxConfig()
    ro = tuple(base.extra_ro_paths)
    if checkpoint is not None:
        checkpoint = kernel_checkpoint(checkpoint)
        ro += (str(checkpoint.parent),)
    return dataclasses.replace(base, preamble=tuple(base.preamble) + kernel_api.preamble(checkpoint, threshold),
                               extra_ro_paths=ro)


def make_pool(size: int = 1, checkpoint: str | Path | None = None, base=None):
    """A :class:`sandbox.KernelPool` of agent kernels (pre-started in the background)."""
    from sandbox import KernelPool
    return KernelPool(size=size, config=kernel_config(checkpoint, base))


def _safe_name(name: str, taken: set) -> str:
    s = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("._")[:64] or "output"
    out, k = s, 2
    while out in taken:
        out, k = f"{s}_{k}", k + 1
    taken.add(out)
    return out


def _truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + "\n... [output truncated]"


class Conversation:
    """Questions about one set of volumes, answered in one persistent kernel.

    Args:
        inputs: from :func:`prepare_inputs`.
        policy: writes the steps (:class:`~voxelprompt.policy.ModelPolicy` or
            :class:`~voxelprompt.policy.ScriptedPolicy`).
        out_dir: where the transcript, outputs, previews and masks are written (a new temporary
            folder if omitted).
        limits: :class:`AgentLimits`.
        sandbox_config: base :class:`sandbox.SandboxConfig` (limits, isolation); the agent API
            and checkpoint are added to it.
        pool: take the kernel from this :class:`sandbox.KernelPool` (made by :func:`make_pool`
            with the same checkpoint).
        record_masks: save the masks of every ``segment`` call (needed to restore a kernel and to
            replay runs of the masks backend).
        previews: write PNG previews of output volumes.
        transcript: continue an existing transcript (restores the kernel's state on first use).
        on_event: called with event dicts (``turn``, ``step``, ``answer``) as they happen.
    """

    def __init__(self, inputs: list[InputVolume], policy: Policy, *, out_dir: str | Path | None = None,
                 limits: AgentLimits | None = None, sandbox_config=None, pool=None, record_masks: bool = True,
                 previews: bool = True, transcript: Transcript | None = None,
                 on_event: Callable[[dict], None] | None = None, vision_source: str | None = None):
        self.inputs = list(inputs)
        self.policy = policy
        self.limits = limits or AgentLimits()
        self.out_dir = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="voxelprompt-"))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.record_masks = record_masks
        self.previews = previews
        self.on_event = on_event
        self._pool = pool
        self._config = None if pool is not None else kernel_config(
            policy.checkpoint if policy.vision == "network" else None, sandbox_config)
        self._sb = None
        self._lock = threading.RLock()
        self._restore_turns = 0
        if transcript is None:
            model = policy.describe()
            thr = checkpoint_threshold(policy.checkpoint) if policy.vision == "network" else 0.5
            vision = {"backend": policy.vision, "threshold": thr,
                      "source": vision_source or ("checkpoint" if policy.vision == "network" else
                                                  getattr(policy, "source", "given"))}
            transcript = Transcript.new(self.out_dir, model=model, vision=vision, sandbox={},
                                        limits=dataclasses.asdict(self.limits),
                                        inputs=[i.record() for i in self.inputs])
            transcript.save()
        else:
            self._restore_turns = len(transcript.turns)
        self.transcript = transcript
        self.timing: dict[str, float] = {}

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Stops the kernel (the transcript stays)."""
        with self._lock:
            if self._sb is not None:
                self._sb.close()
                self._sb = None
            self._restore_turns = len(self.transcript.turns)

    suspend = close   # a suspended conversation restores its kernel state at the next question

    @property
    def kernel_live(self) -> bool:
        return self._sb is not None

    def __enter__(self) -> "Conversation":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _emit(self, event: dict) -> None:
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:  # an observer never breaks the run
                pass

    # ------------------------------------------------------------------ kernel
    def _silent(self, code: str, what: str) -> None:
        r = self._sb.execute(code, timeout=self.limits.step_timeout)
        if not r.ok:
            raise AgentError(f"the agent API failed ({what}): {r.error}")

    def _ensure_kernel(self, timing: dict) -> None:
        from sandbox import Sandbox
        if self._sb is not None:
            return
        t = time.perf_counter()
        self._sb = self._pool.sandbox() if self._pool is not None else Sandbox(self._config)
        self._sb.start()
        timing["kernel_start_s"] = time.perf_counter() - t
        iso = self._sb.isolation()
        self.transcript.data["sandbox"] = {"mode": iso["mode"], "seccomp": iso["seccomp"],
                                           "own_user": iso["own_user"], "limits": iso["limits"]}
        t = time.perf_counter()
        self._setup_inputs()
        timing["inputs_s"] = time.perf_counter() - t
        if self._restore_turns:
            t = time.perf_counter()
            self._restore()
            timing["restore_s"] = time.perf_counter() - t

    def _setup_inputs(self) -> None:
        for i in self.inputs:
            self._sb.put(i.name, i.volume)
        self._silent(f"{kernel_api.API}.bind({ {i.name: i.session for i in self.inputs}!r})", "bind")
        if self.policy.vision == "network":
            self._silent(f"__vp_vs = {kernel_api.API}.vision_status()", "vision status")
            vs = self._sb.get("__vp_vs")
            if not (isinstance(vs, dict) and vs.get("loaded")):
                raise AgentError(f"the kernel has no vision network: {vs.get('error') if isinstance(vs, dict) else vs}")

    def _restore(self) -> None:
        """Re-runs the code of earlier questions (recorded masks, else recorded φ) to rebuild the variables."""
        for turn in self.transcript.turns[:self._restore_turns]:
            self._silent(f"{kernel_api.API}.begin_turn()", "begin_turn")
            for s in turn["steps"]:
                if s["error"] and s["error"]["name"] == "SyntaxError":
                    continue
                seg = [c for c in s["vision_calls"] if c["kind"] == "segment"]
                have_masks = all(c["masks"] for c in seg)
                if have_masks or self.policy.vision != "network" or s.get("phi") is None:
                    masks = [[vl.load(self.transcript.file(m["file"])) for m in c["masks"]] for c in seg]
                    self._prepare_vision(Step(s["code"], masks=masks), "masks", s["index"])
                else:
                    self._prepare_vision(Step(s["code"], phis=torch.tensor(s["phi"], dtype=torch.float32)),
                                         "network", s["index"])
                self._sb.execute(strip_mod(s["code"]), timeout=self.limits.step_timeout)
        self._restore_turns = 0

    def _prepare_vision(self, step: Step, mode: str, index: int) -> None:
        api = kernel_api.API
        if mode == "network":
            if step.phis is not None and len(step.phis):
                self._sb.put(kernel_api.PHI, step.phis.detach().float().cpu().contiguous())
            self._silent(f"{api}.begin_step({index}, 'network')", "begin_step")
        else:
            names = []
            for k, call in enumerate(step.masks or []):
                row = []
                for j, m in enumerate(call):
                    var = f"__vp_in_{k}_{j}"
                    self._sb.put(var, m)
                    row.append(var)
                names.append(row)
            self._silent(f"{api}.begin_step({index}, 'masks', {names!r})", "begin_step")

    # ------------------------------------------------------------------ one question
    def ask(self, prompt: str) -> Answer:
        """Answers one question; earlier questions' variables are still defined."""
        prompt = str(prompt).strip()
        if not prompt:
            raise AgentError("the prompt is empty")
        with self._lock:
            return self._ask(prompt)

    def _ask(self, prompt: str) -> Answer:
        lim = self.limits
        t_start = time.perf_counter()
        deadline = t_start + lim.max_seconds
        timing: dict[str, float] = {}
        header = prompt + "\n" + "\n".join(i.line() for i in self.inputs)
        index = len(self.transcript.turns)
        turn = {"index": index, "prompt": prompt, "header": header, "started": now_iso(), "status": "running",
                "message": None, "steps": [], "answer": None, "timing": timing}
        self.transcript.turns.append(turn)
        self._emit({"event": "turn", "turn": index, "prompt": prompt})
        state = AgentState(index, prompt, header, self.inputs, token_budget=lim.max_tokens)
        status, message = "done", None
        try:
            self._ensure_kernel(timing)
            self.transcript.save()
            self._silent(f"{kernel_api.API}.begin_turn()", "begin_turn")
            while True:
                if len(state.steps) >= lim.max_steps:
                    status, message = "step_limit", (f"stopped after {lim.max_steps} steps without an answer "
                                                     "(limit max_steps)")
                    break
                if time.perf_counter() > deadline:
                    status, message = "time_limit", f"stopped after {lim.max_seconds:g} s (limit max_seconds)"
                    break
                if state.token_budget <= 0:
                    status, message = "token_limit", (f"stopped after {state.tokens} generated tokens "
                                                      f"(limit max_tokens = {lim.max_tokens})")
                    break
                t = time.perf_counter()
                step = self.policy.next_step(state)
                gen_s = time.perf_counter() - t
                state.tokens += step.tokens
                state.token_budget -= step.tokens
                if step.stop and not step.code.strip():
                    reason = getattr(self.policy, "stop_reason", None) if step.truncated else None
                    if reason == "context":
                        status, message = "context_limit", "stopped: the model's context is full"
                    elif reason == "tokens" or (step.truncated and state.token_budget <= 0):
                        status, message = "token_limit", (f"stopped after {state.tokens} generated tokens "
                                                          f"(limit max_tokens = {lim.max_tokens})")
                    break
                rec = self._run_step(state, step, gen_s, deadline)
                turn["steps"].append(rec)
                self.transcript.save()
                self._emit({"event": "step", "turn": index, **{k: rec[k] for k in (
                    "index", "code", "output", "error", "duration_s", "generation_s", "tokens")}})
                if step.stop:
                    break
                if rec["error"] and _repeats_a_failure(turn["steps"]):
                    err = rec["error"]
                    status, message = "repeated_error", (f"stopped: the model wrote a step that had already "
                                                         f"failed, again ({err['name']}: {err['message']})")
                    break
                if step.truncated:   # as in evaluation: a step cut at the token limit ends the question
                    status, message = "token_limit", (f"stopped: a code step reached {lim.max_step_tokens} tokens "
                                                      "without ending (limit max_step_tokens)")
                    break
            answer = self._collect(turn, timing)
        except Exception as exc:
            status, message = "error", f"{type(exc).__name__}: {exc}"
            answer = {"text": None, "measurements": [], "outputs": []}
            if isinstance(exc, AgentError) or "Sandbox" in type(exc).__name__:
                self.close()   # the kernel is in an unknown state; the next question restores it
                self._restore_turns = index
        timing["total_s"] = time.perf_counter() - t_start
        timing["generation_s"] = sum(s["generation_s"] for s in turn["steps"])
        timing["execution_s"] = sum(s["duration_s"] for s in turn["steps"])
        turn.update(status=status, message=message, answer=answer)
        if answer["text"] is None:
            answer["text"] = _default_text(answer, status, message, turn["steps"])
        self.transcript.save()
        self.transcript.write_renderings()
        result = self._answer(turn)
        self._emit({"event": "answer", "turn": index, **result.to_dict()})
        return result

    def _run_step(self, state: AgentState, step: Step, gen_s: float, deadline: float) -> dict:
        lim = self.limits
        code = step.code
        exec_code = strip_mod(code)
        mode = self.policy.vision
        rec = {"index": len(state.steps), "code": code, "output": "", "stdout": "", "stderr": "", "error": None,
               "state_lost": False, "truncated": bool(step.truncated), "duration_s": 0.0,
               "generation_s": round(gen_s, 6), "tokens": int(step.tokens),
               "phi": step.phis.tolist() if step.phis is not None and len(step.phis) else None,
               "vision_calls": [], "overhead_s": 0.0}
        eps = None
        try:
            ast.parse(exec_code)
        except SyntaxError as exc:
            rec["error"] = {"name": "SyntaxError", "message": f"{exc.msg} (line {exc.lineno})", "traceback": []}
            rec["output"] = f"SyntaxError: {exc.msg} (line {exc.lineno})\n"
        else:
            t = time.perf_counter()
            if mode == "network" and step.phis is not None and len(step.phis) != count_mod(code):
                raise AgentError(f"step has {count_mod(code)} <MOD> markers but {len(step.phis)} φ vectors")
            self._prepare_vision(step, mode, rec["index"])
            overhead = time.perf_counter() - t
            timeout = max(1.0, min(lim.step_timeout, deadline - time.perf_counter()))
            r = self._sb.execute(exec_code, timeout=timeout)
            t = time.perf_counter()
            rec.update(stdout=r.stdout, stderr=_truncate(r.stderr, lim.output_chars), duration_s=round(r.duration, 6),
                       state_lost=bool(r.state_lost))
            out = r.stdout
            if r.error is not None:
                rec["error"] = {"name": r.error.name, "message": r.error.message,
                                "traceback": list(r.error.traceback)[-20:]}
                out = (out if out.endswith("\n") or not out else out + "\n") + f"{r.error.name}: {r.error.message}\n"
            if r.state_lost:
                out += "\n[the kernel was restarted: variables from earlier steps are lost]"
                self._setup_inputs()
                self._silent(f"{kernel_api.API}.begin_turn()", "begin_turn")
            else:
                rec["vision_calls"], eps = self._end_step(step, mode, state.turn, rec["index"])
            rec["output"] = _truncate(out, lim.output_chars)
            rec["overhead_s"] = round(overhead + time.perf_counter() - t, 6)
        state.steps.append(ExecutedStep(rec["index"], code, rec["output"], rec["error"], eps))
        return rec

    def _end_step(self, step: Step, mode: str, turn: int, index: int) -> tuple[list[dict], torch.Tensor | None]:
        self._silent(f"{kernel_api.API}.end_step()", "end_step")
        summary = self._sb.get(kernel_api.SUMMARY)
        if not isinstance(summary, dict) or not isinstance(summary.get("calls"), list):
            raise AgentError("the kernel returned no step summary (was the agent API overwritten?)")
        calls, seg_k = [], 0
        for k, c in enumerate(summary["calls"][:64]):
            kind = c.get("kind") if isinstance(c, dict) else None
            if kind not in ("segment", "encode"):
                raise AgentError("malformed vision call record from the kernel")
            rec = {"kind": kind, "volumes": [str(x) for x in c.get("volumes", [])][:64],
                   "sessions": [int(x) for x in c.get("sessions", [])][:64], "masks": []}
            if kind == "segment":
                if mode == "masks":
                    masks = list((step.masks or [])[seg_k]) if seg_k < len(step.masks or []) else []
                else:
                    masks = [self._sb.get(str(v)) for v in c.get("masks", [])[:16]]
                seg_k += 1
                if self.record_masks:
                    for j, m in enumerate(masks):
                        if not isinstance(m, vl.Volume):
                            raise AgentError("the kernel returned a mask that is not a volume")
                        rel = f"turn-{turn + 1}/calls/step-{index + 1}-call-{k + 1}-{j + 1}.nii.gz"
                        vl.save(m, self.transcript.root / rel)
                        rec["masks"].append({"file": rel, "sha256": volume_sha256(m)})
            calls.append(rec)
        eps = None
        if summary.get("eps"):
            eps = self._sb.get(kernel_api.EPS)
            if (not isinstance(eps, torch.Tensor) or eps.ndim != 2 or eps.shape[0] > MAX_EPS_ROWS
                    or not torch.isfinite(eps).all()):
                raise AgentError("the kernel returned malformed image embeddings")
        return calls, eps

    def _collect(self, turn: dict, timing: dict) -> dict:
        t = time.perf_counter()
        self._silent(f"{kernel_api.API}.collect()", "collect")
        res = self._sb.get(kernel_api.RESULT)
        if not isinstance(res, dict):
            raise AgentError("the kernel returned no result (was the agent API overwritten?)")
        text = res.get("answer")
        text = None if text is None else str(text)[:10000]
        meas = []
        for name, m in list((res.get("measurements") or {}).items())[:256]:
            if isinstance(m, dict):
                meas.append({"name": str(name), "value": m.get("value"),
                             "unit": None if m.get("unit") is None else str(m.get("unit"))})
        timing["report_s"] = time.perf_counter() - t
        t = time.perf_counter()
        outputs, taken = [], set()
        for item in list(res.get("volumes") or [])[:32]:
            v = self._sb.get(str(item.get("var")))
            if not isinstance(v, vl.Volume):
                raise AgentError("the kernel returned an output that is not a volume")
            name = str(item.get("name"))
            fname = _safe_name(name, taken)
            rel = f"turn-{turn['index'] + 1}/outputs/{fname}.nii.gz"
            vl.save(v, self.transcript.root / rel)
            prev = None
            if self.previews:
                from .preview import preview_output
                prev = f"turn-{turn['index'] + 1}/outputs/{fname}.png"
                preview_output(self.transcript.root / prev, v, self.inputs, title=name)
            outputs.append({"name": name, "file": rel, "sha256": volume_sha256(v), "kind": v.kind,
                            "shape": list(v.shape), "spacing": [round(float(s), 6) for s in v.spacing],
                            "orientation": v.orientation, "preview": prev})
        timing["outputs_s"] = time.perf_counter() - t
        return {"text": text, "measurements": meas, "outputs": outputs}

    def _answer(self, turn: dict) -> Answer:
        a = turn["answer"]
        outs = {}
        for o in a["outputs"]:
            p = self.transcript.root / o["file"]
            outs[o["name"]] = OutputVolume(o["name"], vl.load(p), p,
                                           self.transcript.root / o["preview"] if o["preview"] else None, o["sha256"])
        return Answer(a["text"], [Measurement(m["name"], m["value"], m["unit"]) for m in a["measurements"]], outs,
                      turn["status"], turn["message"], self.transcript, turn["index"])


def _default_text(answer: dict, status: str, message: str | None, steps: list[dict]) -> str | None:
    """The answer text when ``report(answer=...)`` gave none: the measurements, else the outputs."""
    if answer["measurements"]:
        return "; ".join(str(Measurement(m["name"], m["value"], m["unit"])) for m in answer["measurements"])
    if answer["outputs"]:
        return "wrote " + ", ".join(o["name"] for o in answer["outputs"])
    return None


# ====================================================================================== assistant
PolicyFactory = Callable[[list[InputVolume]], Policy]


class Assistant:
    """The Python API: questions about scans, answered by writing and running code.

    Example::

        from voxelprompt.agent import Assistant
        with Assistant.load() as a:                       # the shipped checkpoint, on the CPU
            ans = a.ask("what is the volume of the left hippocampus?", volumes={"t1": "t1.nii.gz"})
            print(ans.text, ans.measurements, ans.outputs, ans.transcript.path)
            a.ask("and the right one?")                   # follow-up: same kernel, same variables

    Args:
        policy_factory: ``inputs -> Policy`` (one policy per conversation).
        limits: :class:`AgentLimits`.
        sandbox_config: base sandbox configuration.
        pool_size: kernels kept started in the background (0: start one per conversation).
        pool: use this :class:`sandbox.KernelPool` instead (made by :func:`make_pool` with the same
            checkpoint; it is not closed with the assistant).
        checkpoint: the checkpoint whose vision network the kernels load (network policies).
    """

    def __init__(self, policy_factory: PolicyFactory, *, limits: AgentLimits | None = None, sandbox_config=None,
                 pool_size: int = 0, pool=None, checkpoint: str | Path | None = None, record_masks: bool = True,
                 previews: bool = True):
        self.policy_factory = policy_factory
        self.limits = limits or AgentLimits()
        self.sandbox_config = sandbox_config
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.record_masks = record_masks
        self.previews = previews
        self._own_pool = pool is None and pool_size > 0
        self.pool = pool if pool is not None else (make_pool(pool_size, self.checkpoint, sandbox_config)
                                                   if pool_size > 0 else None)
        self.current: Conversation | None = None

    @classmethod
    def load(cls, checkpoint: str | Path | None = None, device: str = "cpu", **kwargs) -> "Assistant":
        """The trained model (default: the checkpoint shipped in ``voxelprompt/assets/``).

        Raises:
            voxelprompt.policy.CheckpointError: no checkpoint is shipped and none was given.
        """
        model = load_checkpoint(checkpoint, device)
        limits = kwargs.get("limits") or AgentLimits()

        def factory(inputs):
            return ModelPolicy(model, max_step_tokens=limits.max_step_tokens)

        a = cls(factory, checkpoint=model.path, **kwargs)
        a.model = model
        return a

    @classmethod
    def scripted(cls, script, *, vision: str = "masks", checkpoint=None, source: str = "given",
                 **kwargs) -> "Assistant":
        """Runs given programs instead of a model (see :class:`~voxelprompt.policy.ScriptedPolicy`)."""
        def factory(inputs):
            return ScriptedPolicy(script, vision=vision, checkpoint=checkpoint, source=source)
        return cls(factory, checkpoint=checkpoint if vision == "network" else None, **kwargs)

    def conversation(self, volumes: dict[str, Any], dates: dict | None = None, *, out: str | Path | None = None,
                     on_event=None) -> Conversation:
        """A new conversation about ``volumes`` (see :func:`prepare_inputs`)."""
        out_dir = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="voxelprompt-"))
        inputs = prepare_inputs(volumes, dates, copy_dir=out_dir)
        policy = self.policy_factory(inputs)
        return Conversation(inputs, policy, out_dir=out_dir, limits=self.limits, sandbox_config=self.sandbox_config,
                            pool=self.pool, record_masks=self.record_masks, previews=self.previews,
                            on_event=on_event, vision_source=getattr(policy, "source", None))

    def ask(self, prompt: str, volumes: dict[str, Any] | None = None, dates: dict | None = None, *,
            out: str | Path | None = None) -> Answer:
        """Answers ``prompt``. With ``volumes`` a new conversation starts; without, it is a
        follow-up in the current one (the kernel keeps its variables)."""
        if volumes is not None:
            if self.current is not None:
                self.current.close()
            self.current = self.conversation(volumes, dates, out=out)
        elif self.current is None:
            raise AgentError("the first question needs volumes (e.g. volumes={'t1': 'scan.nii.gz'})")
        return self.current.ask(prompt)

    def close(self) -> None:
        if self.current is not None:
            self.current.close()
            self.current = None
        if self.pool is not None and self._own_pool:
            self.pool.close()
        self.pool = None

    def __enter__(self) -> "Assistant":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ========================================================================================= replay
class ReplayError(AgentError):
    """A transcript cannot be replayed (inputs or checkpoint missing or changed)."""


@dataclass
class ReplayReport:
    """What :func:`replay` compared: one check per step output, vision mask and final output."""

    transcript: Path
    replay_dir: Path
    checks: list[dict] = field(default_factory=list)

    @property
    def matches(self) -> bool:
        return bool(self.checks) and all(c["ok"] for c in self.checks)

    @property
    def mismatches(self) -> list[dict]:
        return [c for c in self.checks if not c["ok"]]

    def add(self, what: str, expected, got, ok: bool | None = None) -> None:
        self.checks.append({"what": what, "expected": expected, "got": got,
                            "ok": bool(expected == got) if ok is None else bool(ok)})

    def summary(self) -> str:
        n, bad = len(self.checks), self.mismatches
        head = (f"replay of {self.transcript}: {'every output matches' if not bad else f'{len(bad)} mismatch(es)'} "
                f"({n} checks)")
        lines = [head] + [f"  MISMATCH {c['what']}: expected {_short(c['expected'])}, got {_short(c['got'])}"
                          for c in bad]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"transcript": str(self.transcript), "replay": str(self.replay_dir), "matches": self.matches,
                "checks": self.checks}


def _short(v) -> str:
    s = json.dumps(v, default=str) if not isinstance(v, str) else repr(v)
    return s if len(s) < 120 else s[:117] + "..."


def _close(a, b, rel: float = 1e-6) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], rel) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y, rel) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return abs(a - b) <= rel * max(abs(a), abs(b)) + 1e-12
    return a == b


def inputs_from_transcript(tr: Transcript, overrides: dict[str, str] | None = None) -> list[InputVolume]:
    """The recorded inputs, loaded and checked against their recorded sha256."""
    out = []
    for rec in tr.data["inputs"]:
        src = (overrides or {}).get(rec["name"])
        p = Path(src) if src else (tr.file(rec["file"]) if rec.get("file") else
                                   Path(rec["path"]) if rec.get("path") else None)
        if p is None or not p.is_file():
            raise ReplayError(f"input {rec['name']}: {p or 'no file was recorded'} is missing")
        sha = file_sha256(p)
        if sha != rec["sha256"]:
            raise ReplayError(f"input {rec['name']}: {p} changed since the run (sha256 {sha[:12]}… != "
                              f"recorded {rec['sha256'][:12]}…)")
        out.append(InputVolume(rec["name"], rec["stem"], rec["modality"], rec["date"], int(rec["session"]),
                               load_volume(p), rec.get("path"), sha, rec.get("file")))
    return out


def replay(path: str | Path, *, checkpoint: str | Path | None = None, out: str | Path | None = None,
           inputs: dict[str, str] | None = None, sandbox_config=None, pool=None) -> ReplayReport:
    """Re-runs a transcript's recorded code in a fresh kernel and compares every output.

    The vision calls get what the original run used: for the network backend the recorded φ
    through the same checkpoint (its sha256 must match), for the masks backend the recorded masks.
    Compared: each step's fed-back output and error, each ``segment`` mask, each answer text,
    measurement (relative 1e-6) and output volume (content sha256).

    Raises:
        ReplayError: an input or the checkpoint is missing or changed.
    """
    tr = Transcript.load(path)
    backend = tr.data["vision"]["backend"]
    ckpt = None
    if backend == "network":
        ckpt = Path(checkpoint or tr.data["model"].get("checkpoint") or "")
        if not ckpt.is_file():
            raise ReplayError(f"the checkpoint {ckpt} of this transcript is missing (pass --checkpoint)")
        sha = file_sha256(ckpt)
        if sha != tr.data["model"].get("checkpoint_sha256"):
            raise ReplayError(f"checkpoint {ckpt} has sha256 {sha[:12]}…, the run used "
                              f"{str(tr.data['model'].get('checkpoint_sha256'))[:12]}…")
    ins = inputs_from_transcript(tr, inputs)
    turns = []
    for t in tr.turns:
        steps = []
        for s in t["steps"]:
            if backend == "network":
                phis = torch.tensor(s["phi"], dtype=torch.float32) if s.get("phi") else None
                steps.append(Step(s["code"], phis=phis))
            else:
                masks = []
                for c in s["vision_calls"]:
                    if c["kind"] == "segment":
                        masks.append([vl.load(tr.file(m["file"])) for m in c["masks"]])
                steps.append(Step(s["code"], masks=masks))
        turns.append(steps)
    policy = ScriptedPolicy(turns, vision=backend, checkpoint=ckpt, model=tr.data["model"], source="replay")
    out_dir = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="voxelprompt-replay-"))
    lim = dict(tr.data["limits"])
    lim["max_steps"] = max([int(lim.get("max_steps", 12))] + [len(t["steps"]) + 1 for t in tr.turns])
    lim["max_seconds"] = max(float(lim.get("max_seconds", 600)), 3600.0)
    limits = AgentLimits(**{k: v for k, v in lim.items() if k in {f.name for f in dataclasses.fields(AgentLimits)}})
    report = ReplayReport(tr.path, out_dir)
    conv = Conversation(ins, policy, out_dir=out_dir, limits=limits, sandbox_config=sandbox_config, pool=pool,
                        vision_source="replay")
    try:
        for t in tr.turns:
            ans = conv.ask(t["prompt"])
            new = conv.transcript.turns[ans.turn]
            q = f"question {t['index'] + 1}"
            report.add(f"{q}: number of steps", len(t["steps"]), len(new["steps"]))
            for a, b in zip(t["steps"], new["steps"]):
                w = f"{q} step {a['index'] + 1}"
                report.add(f"{w} output", a["output"], b["output"])
                report.add(f"{w} error", (a["error"] or {}).get("name"), (b["error"] or {}).get("name"))
                if backend == "network":
                    ma = [m["sha256"] for c in a["vision_calls"] for m in c["masks"]]
                    mb = [m["sha256"] for c in b["vision_calls"] for m in c["masks"]]
                    report.add(f"{w} segment masks", ma, mb)
            ea, eb = t["answer"] or {}, new["answer"] or {}
            report.add(f"{q} answer", ea.get("text"), eb.get("text"))
            ma = {m["name"]: (m["value"], m["unit"]) for m in ea.get("measurements", [])}
            mb = {m["name"]: (m["value"], m["unit"]) for m in eb.get("measurements", [])}
            report.add(f"{q} measurement names", sorted(ma), sorted(mb))
            for k in sorted(set(ma) & set(mb)):
                report.add(f"{q} measurement {k!r}", ma[k], mb[k], ma[k][1] == mb[k][1] and _close(ma[k][0], mb[k][0]))
            oa = {o["name"]: o["sha256"] for o in ea.get("outputs", [])}
            ob = {o["name"]: o["sha256"] for o in eb.get("outputs", [])}
            report.add(f"{q} output names", sorted(oa), sorted(ob))
            for k in sorted(set(oa) & set(ob)):
                report.add(f"{q} output {k!r} sha256", oa[k], ob[k])
    finally:
        conv.close()
    return report


__all__ = ["Assistant", "Conversation", "Answer", "Measurement", "OutputVolume", "AgentLimits", "AgentState",
           "ExecutedStep", "InputVolume", "AgentError", "InputError", "prepare_inputs", "parse_volume_key",
           "kernel_config", "make_pool", "replay", "ReplayReport", "ReplayError", "inputs_from_transcript",
           "TranscriptError"]
