"""Transcripts: the versioned, auditable record of a conversation (see ``docs/transcripts.md``).

A transcript is one JSON document (``transcript.json``) plus the files it names, relative to its
folder: input copies (inputs given as in-memory volumes), output volumes (NIfTI), their PNG
previews, and the masks of every ``segment`` call. It records the prompt, the inputs (path,
sha256, shape, spacing, orientation, date), the model id and checkpoint sha256, every step (code,
output, error, duration, φ) and each question's answer and outputs. :class:`Transcript` reads,
writes (atomically) and renders it as Markdown and HTML; :data:`SCHEMA` is its JSON Schema and
:func:`validate` checks a document against it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import html
import json
import os
import tempfile
from pathlib import Path
from typing import Any

SCHEMA_ID = "voxelprompt.transcript"
SCHEMA_VERSION = 1

_num = {"type": "number"}
_str = {"type": "string"}
_nstr = {"type": ["string", "null"]}
_file = {"type": "object", "required": ["file", "sha256"],
         "properties": {"file": _str, "sha256": _str}}

#: JSON Schema (draft 2020-12 subset) of a transcript, version 1.
SCHEMA: dict = {
    "$id": SCHEMA_ID, "title": "VoxelPrompt transcript", "type": "object",
    "required": ["schema", "schema_version", "id", "created", "voxelprompt_version", "model", "vision",
                 "sandbox", "limits", "inputs", "turns"],
    "properties": {
        "schema": {"enum": [SCHEMA_ID]},
        "schema_version": {"enum": [SCHEMA_VERSION]},
        "id": _str, "created": _str, "voxelprompt_version": _str,
        "model": {"type": "object", "required": ["id", "policy", "checkpoint", "checkpoint_sha256"],
                  "properties": {"id": _str, "policy": _str, "checkpoint": _nstr, "checkpoint_sha256": _nstr}},
        "vision": {"type": "object", "required": ["backend"],
                   "properties": {"backend": {"enum": ["network", "masks"]}, "threshold": _num}},
        "sandbox": {"type": "object"},
        "limits": {"type": "object", "required": ["max_steps", "max_tokens", "max_seconds", "step_timeout",
                                                  "output_chars"]},
        "inputs": {"type": "array", "items": {
            "type": "object",
            "required": ["name", "stem", "modality", "date", "session", "path", "file", "sha256", "content_sha256",
                         "shape", "spacing", "orientation", "affine", "dtype"],
            "properties": {"name": _str, "stem": _str, "modality": _str, "date": _nstr, "session": {"type": "integer"},
                           "path": _nstr, "file": _nstr, "sha256": _str, "content_sha256": _str,
                           "shape": {"type": "array", "items": {"type": "integer"}},
                           "spacing": {"type": "array", "items": _num}, "orientation": _str,
                           "affine": {"type": "array"}, "dtype": _str}}},
        "turns": {"type": "array", "items": {
            "type": "object",
            "required": ["index", "prompt", "header", "started", "status", "message", "steps", "answer", "timing"],
            "properties": {
                "index": {"type": "integer"}, "prompt": _str, "header": _str, "started": _str,
                "status": {"enum": ["running", "done", "step_limit", "token_limit", "time_limit", "context_limit",
                                   "repeated_error", "error"]},
                "message": _nstr,
                "steps": {"type": "array", "items": {
                    "type": "object",
                    "required": ["index", "code", "output", "stdout", "stderr", "error", "duration_s",
                                 "generation_s", "tokens", "phi", "vision_calls"],
                    "properties": {
                        "index": {"type": "integer"}, "code": _str, "output": _str, "stdout": _str, "stderr": _str,
                        "error": {"type": ["object", "null"], "required": ["name", "message"],
                                  "properties": {"name": _str, "message": _str}},
                        "duration_s": _num, "generation_s": _num, "tokens": {"type": "integer"},
                        "phi": {"type": ["array", "null"]},
                        "vision_calls": {"type": "array", "items": {
                            "type": "object", "required": ["kind", "volumes", "sessions", "masks"],
                            "properties": {"kind": {"enum": ["segment", "encode"]},
                                           "volumes": {"type": "array", "items": _str},
                                           "sessions": {"type": "array", "items": {"type": "integer"}},
                                           "masks": {"type": "array", "items": _file}}}}}}},
                "answer": {"type": ["object", "null"], "required": ["text", "measurements", "outputs"],
                           "properties": {
                               "text": _nstr,
                               "measurements": {"type": "array", "items": {
                                   "type": "object", "required": ["name", "value", "unit"]}},
                               "outputs": {"type": "array", "items": {
                                   "type": "object", "required": ["name", "file", "sha256", "kind", "shape",
                                                                  "spacing", "orientation", "preview"]}}}},
                "timing": {"type": "object"}}}},
    },
}


# =================================================================================== validation
_TYPES = {"object": dict, "array": list, "string": str, "integer": int, "number": (int, float),
          "boolean": bool, "null": type(None)}


def validate(doc: Any, schema: dict | None = None, where: str = "$") -> list[str]:
    """Errors of ``doc`` against :data:`SCHEMA` (a small JSON-Schema subset: type, enum, required,
    properties, items). An empty list means valid."""
    schema = SCHEMA if schema is None else schema
    errs: list[str] = []
    t = schema.get("type")
    if t is not None:
        types = t if isinstance(t, list) else [t]
        ok = any(isinstance(doc, _TYPES[x]) and not (x in ("integer", "number") and isinstance(doc, bool))
                 for x in types)
        if not ok:
            return [f"{where}: expected {' or '.join(types)}, got {type(doc).__name__}"]
    if "enum" in schema and doc not in schema["enum"]:
        errs.append(f"{where}: {doc!r} is not one of {schema['enum']}")
    if isinstance(doc, dict):
        for k in schema.get("required", []):
            if k not in doc:
                errs.append(f"{where}: missing {k!r}")
        for k, sub in schema.get("properties", {}).items():
            if k in doc:
                errs += validate(doc[k], sub, f"{where}.{k}")
    if isinstance(doc, list) and "items" in schema:
        for i, x in enumerate(doc):
            errs += validate(x, schema["items"], f"{where}[{i}]")
    return errs


# ====================================================================================== hashing
def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def volume_sha256(volume) -> str:
    """sha256 of a volume's content: shape, dtype, voxel values and affine (rounded to 1e-4 mm).

    Independent of file compression and header fields, so a volume read back from its NIfTI file
    hashes like the one that was written.
    """
    import numpy as np
    t = volume.tensor.detach().cpu().contiguous()
    h = hashlib.sha256(b"voxelprompt-volume-1")
    h.update(json.dumps([list(t.shape), str(t.dtype).removeprefix("torch."), volume.kind]).encode())
    aff = np.round(np.asarray(volume.affine, dtype=np.float64), 4) + 0.0
    h.update(aff.tobytes())
    h.update(t.numpy().tobytes())
    return h.hexdigest()


# ======================================================================================== files
def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Writes a file atomically and durably (temporary file, fsync, rename, fsync of the folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# =================================================================================== transcript
class TranscriptError(ValueError):
    """A transcript file is unreadable, of another schema or version, or invalid."""


class Transcript:
    """A transcript document and the folder its files live in.

    Args:
        data: the JSON document.
        root: the folder that holds ``transcript.json`` and the files it names.
    """

    FILENAME = "transcript.json"

    def __init__(self, data: dict, root: str | os.PathLike):
        self.data = data
        self.root = Path(root)

    @classmethod
    def new(cls, root, *, model: dict, vision: dict, sandbox: dict, limits: dict, inputs: list[dict],
            id: str | None = None) -> "Transcript":
        import uuid

        from . import __version__
        data = {"schema": SCHEMA_ID, "schema_version": SCHEMA_VERSION, "id": id or uuid.uuid4().hex,
                "created": now_iso(), "voxelprompt_version": __version__, "model": model, "vision": vision,
                "sandbox": sandbox, "limits": limits, "inputs": inputs, "turns": []}
        return cls(data, root)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Transcript":
        """Reads ``transcript.json`` (or a folder holding one) and checks its schema and version."""
        path = Path(path)
        if path.is_dir():
            path = path / cls.FILENAME
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise TranscriptError(f"{path}: not a readable transcript ({exc})") from None
        if not isinstance(data, dict) or data.get("schema") != SCHEMA_ID:
            raise TranscriptError(f"{path}: not a VoxelPrompt transcript (schema {data.get('schema')!r})"
                                  if isinstance(data, dict) else f"{path}: not a VoxelPrompt transcript")
        if data.get("schema_version") != SCHEMA_VERSION:
            raise TranscriptError(f"{path}: transcript schema version {data.get('schema_version')!r}; this "
                                  f"VoxelPrompt reads version {SCHEMA_VERSION}")
        errs = validate(data)
        if errs:
            raise TranscriptError(f"{path}: invalid transcript: " + "; ".join(errs[:5]))
        return cls(data, path.parent)

    # ---- access ----
    @property
    def path(self) -> Path:
        return self.root / self.FILENAME

    @property
    def turns(self) -> list[dict]:
        return self.data["turns"]

    @property
    def id(self) -> str:
        return self.data["id"]

    def file(self, rel: str) -> Path:
        """Absolute path of a file named in the transcript (relative names only, inside the folder)."""
        p = (self.root / rel).resolve()
        if not p.is_relative_to(self.root.resolve()):
            raise TranscriptError(f"transcript file {rel!r} lies outside the transcript folder")
        return p

    # ---- writing ----
    def save(self) -> Path:
        """Writes ``transcript.json`` atomically."""
        return atomic_write_text(self.path, json.dumps(self.data, indent=1, allow_nan=True) + "\n")

    def write_renderings(self) -> tuple[Path, Path]:
        """Writes ``transcript.md`` and ``transcript.html`` beside the JSON."""
        md = atomic_write_text(self.root / "transcript.md", self.to_markdown())
        ht = atomic_write_text(self.root / "transcript.html", self.to_html())
        return md, ht

    # ---- rendering ----
    def to_markdown(self) -> str:
        d = self.data
        m = d["model"]
        out = [f"# VoxelPrompt transcript `{d['id']}`", "",
               f"- created: {d['created']} (VoxelPrompt {d['voxelprompt_version']})",
               f"- model: `{m['id']}` ({m['policy']})"
               + (f", checkpoint `{m['checkpoint']}` sha256 `{m['checkpoint_sha256']}`" if m.get("checkpoint") else ""),
               f"- vision: {d['vision']['backend']}"
               + (f" ({d['vision'].get('source')})" if d["vision"].get("source") else ""),
               f"- sandbox: {d['sandbox'].get('mode', '?')}, seccomp {d['sandbox'].get('seccomp', '?')}", "",
               "## Inputs", "", "| name | modality | date | shape | spacing (mm) | orientation | sha256 | path |",
               "|---|---|---|---|---|---|---|---|"]
        for i in d["inputs"]:
            out.append(f"| `{i['name']}` | {i['modality']} | {i['date'] or ''} | {'×'.join(map(str, i['shape']))} | "
                       f"{' × '.join(f'{s:.3g}' for s in i['spacing'])} | {i['orientation']} | `{i['sha256'][:16]}…` | "
                       f"{i['path'] or i['file'] or ''} |")
        for t in d["turns"]:
            out += ["", f"## Question {t['index'] + 1}", "", f"> {t['prompt']}", "", "```text", t["header"], "```", ""]
            for s in t["steps"]:
                out += [f"### Step {s['index'] + 1} ({s['duration_s']:.2f} s)", "", "```python", s["code"], "```"]
                if s["output"]:
                    out += ["", "```text", s["output"].rstrip("\n"), "```"]
                if s["error"]:
                    out += ["", f"**{s['error']['name']}**: {s['error']['message']}"]
                out.append("")
            out += [f"**Status**: {t['status']}" + (f" — {t['message']}" if t.get("message") else ""), ""]
            a = t.get("answer")
            if a:
                if a["text"]:
                    out += [f"**Answer**: {a['text']}", ""]
                if a["measurements"]:
                    out += ["| measurement | value | unit |", "|---|---|---|"]
                    out += [f"| {x['name']} | {format_value(x['value'])} | {x['unit'] or ''} |" for x in a["measurements"]]
                    out.append("")
                for o in a["outputs"]:
                    out.append(f"- output `{o['name']}`: [{o['file']}]({o['file']}) "
                               f"({'×'.join(map(str, o['shape']))}, {o['orientation']})")
                    if o.get("preview"):
                        out.append(f"  ![{o['name']}]({o['preview']})")
                out.append("")
        return "\n".join(out) + "\n"

    def to_html(self) -> str:
        e = html.escape
        d = self.data
        m = d["model"]
        parts = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'>",
                 f"<title>VoxelPrompt transcript {e(d['id'])}</title>",
                 "<style>body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}"
                 "pre{background:#f6f8fa;padding:.6rem;overflow-x:auto;border-radius:4px}"
                 "pre.out{background:#fffbe6}.err{color:#b00020}table{border-collapse:collapse}"
                 "td,th{border:1px solid #ddd;padding:.2rem .5rem;text-align:left}img{max-width:100%}"
                 ".meta{color:#555}</style></head><body>",
                 f"<h1>VoxelPrompt transcript</h1><p class='meta'>{e(d['id'])} · {e(d['created'])} · "
                 f"VoxelPrompt {e(d['voxelprompt_version'])}<br>model <code>{e(m['id'])}</code> ({e(m['policy'])})"
                 + (f", checkpoint sha256 <code>{e(m['checkpoint_sha256'] or '')}</code>" if m.get("checkpoint") else "")
                 + f" · vision {e(d['vision']['backend'])} · sandbox {e(str(d['sandbox'].get('mode', '?')))}</p>",
                 "<h2>Inputs</h2><table><tr><th>name</th><th>modality</th><th>date</th><th>shape</th>"
                 "<th>spacing (mm)</th><th>orientation</th><th>sha256</th></tr>"]
        for i in d["inputs"]:
            parts.append(f"<tr><td><code>{e(i['name'])}</code></td><td>{e(i['modality'])}</td><td>{e(i['date'] or '')}"
                         f"</td><td>{'×'.join(map(str, i['shape']))}</td><td>{' × '.join(f'{s:.3g}' for s in i['spacing'])}"
                         f"</td><td>{e(i['orientation'])}</td><td><code>{e(i['sha256'][:16])}…</code></td></tr>")
        parts.append("</table>")
        for t in d["turns"]:
            parts.append(f"<h2>Question {t['index'] + 1}</h2><blockquote>{e(t['prompt'])}</blockquote>")
            for s in t["steps"]:
                parts.append(f"<h3>Step {s['index'] + 1} <small class='meta'>{s['duration_s']:.2f} s</small></h3>"
                             f"<pre><code>{e(s['code'])}</code></pre>")
                if s["output"]:
                    parts.append(f"<pre class='out'>{e(s['output'])}</pre>")
                if s["error"]:
                    parts.append(f"<p class='err'><b>{e(s['error']['name'])}</b>: {e(s['error']['message'])}</p>")
            parts.append(f"<p><b>Status</b>: {e(t['status'])}" + (f" — {e(t['message'])}" if t.get("message") else "")
                         + "</p>")
            a = t.get("answer")
            if a:
                if a["text"]:
                    parts.append(f"<p><b>Answer</b>: {e(a['text'])}</p>")
                if a["measurements"]:
                    parts.append("<table><tr><th>measurement</th><th>value</th><th>unit</th></tr>"
                                 + "".join(f"<tr><td>{e(x['name'])}</td><td>{e(format_value(x['value']))}</td>"
                                           f"<td>{e(x['unit'] or '')}</td></tr>" for x in a["measurements"])
                                 + "</table>")
                for o in a["outputs"]:
                    parts.append(f"<p>output <a href='{e(o['file'])}'><code>{e(o['name'])}</code></a> "
                                 f"({'×'.join(map(str, o['shape']))}, {e(o['orientation'])})</p>")
                    if o.get("preview"):
                        parts.append(f"<img src='{e(o['preview'])}' alt='{e(o['name'])}'>")
        parts.append("</body></html>")
        return "\n".join(parts) + "\n"


def format_value(v) -> str:
    """A measurement value for people: 3 significant decimals, vectors and dicts spelled out."""
    if isinstance(v, dict):
        return ", ".join(f"{k}: {format_value(x)}" for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return "(" + ", ".join(format_value(x) for x in v) + ")"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    a = abs(float(v))
    if a == 0 or 0.01 <= a < 1e6:
        return f"{v:.2f}" if a >= 1 else f"{v:.3g}"
    return f"{v:.3e}"
