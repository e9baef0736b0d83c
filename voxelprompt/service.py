"""The REST service (FastAPI): sessions of scans, questions, streamed steps, transcripts, outputs.

``voxelprompt serve [--host 127.0.0.1] [--port 8000]`` with ``VOXELPROMPT_TOKEN`` set (required;
every ``/v1`` call but ``/v1/health`` needs ``Authorization: Bearer <token>``). OpenAPI docs at
``/docs``. See ``docs/usage.md`` for curl examples.

=======  ===============================================  ==========================================
method   path                                             what
=======  ===============================================  ==========================================
POST     /v1/sessions                                     new session: multipart NIfTI uploads (one
                                                          file field per volume, named ``t1`` or
                                                          ``t1@2021-03-01``) or JSON server-side
                                                          paths under the data root
GET      /v1/sessions/{id}                                inputs and messages
POST     /v1/sessions/{id}/messages                       ask: ``{"prompt": ...}``; answer,
                                                          measurements, outputs, steps; with
                                                          ``"stream": true`` (or ``Accept:
                                                          text/event-stream``) server-sent events
GET      /v1/sessions/{id}/transcript[.json|.html|.md]    the transcript
GET      /v1/sessions/{id}/turn-{n}/outputs/{file}        an output volume (NIfTI) or preview (PNG)
DELETE   /v1/sessions/{id}                                kernel, files and records gone
GET      /v1/health                                       liveness, kernels, queue (no token)
=======  ===============================================  ==========================================

Each session has its own sandboxed kernel; at most ``max_kernels`` are alive. A message that
needs a kernel when all are taken evicts the least recently used idle one (that session's
variables are rebuilt from its transcript at its next message) or waits in a queue
(``queue_timeout``, then 503). Sessions and messages are in SQLite (WAL) and the session folder,
written before the response is sent; after a restart a session continues where it was. A session
sees only its own files: uploads are stored under its folder with fixed names, output files are
served only when its transcript lists them, and kernels see none of the service's folders.
"""


import asyncio
import base64
import hmac
import json
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .agent import (AgentError, AgentLimits, Conversation, InputError, InputVolume, load_volume, make_pool,
                    parse_volume_key, prepare_inputs)
from .store import SESSION_ID, Store
from .transcript import Transcript, TranscriptError, file_sha256

TOKEN_ENV = "VOXELPROMPT_TOKEN"
STATE_ENV = "VOXELPROMPT_STATE_DIR"
MiB = 1 << 20


def default_state_dir() -> Path:
    """``$VOXELPROMPT_STATE_DIR`` or ``~/.local/share/voxelprompt/service`` (outside the repository,
    which kernels can read)."""
    env = os.environ.get(STATE_ENV)
    return Path(env) if env else Path.home() / ".local" / "share" / "voxelprompt" / "service"


@dataclass
class ServiceSettings:
    """Configuration of the service.

    Attributes:
        token: the bearer token clients must send.
        state_dir: database and session folders (keep it outside the repository).
        data_root: folder under which sessions may reference server-side files (None: uploads only).
        max_upload_bytes: largest request body (all files of one upload together).
        max_files: most volumes per session.
        max_voxels: largest volume accepted.
        max_kernels: live kernels (one per active session).
        queue_timeout: seconds a message waits for a kernel before a 503.
        pool_size: kernels started ahead of need.
        limits: limits of each question.
        policy: ``None``/``"model"`` (the checkpoint) or ``"module:function"`` (see
            :func:`voxelprompt.policy.policy_factory`).
        checkpoint: the model checkpoint (default: the shipped one).
    """

    token: str
    state_dir: Path = field(default_factory=default_state_dir)
    data_root: Path | None = None
    max_upload_bytes: int = 1024 * MiB
    max_files: int = 16
    max_voxels: int = 512 ** 3
    max_kernels: int = 4
    queue_timeout: float = 120.0
    pool_size: int = 1
    limits: AgentLimits = field(default_factory=AgentLimits)
    policy: str | None = None
    checkpoint: Path | None = None
    sandbox_config: Any = None


class BodyTooLarge(Exception):
    pass


class KernelsBusy(Exception):
    pass


class _LimitedReceive:
    """Wraps an ASGI ``receive`` and raises :class:`BodyTooLarge` past ``limit`` bytes."""

    def __init__(self, receive, limit: int):
        self.receive, self.limit, self.n, self.more = receive, limit, 0, True

    async def __call__(self):
        msg = await self.receive()
        if msg["type"] == "http.request":
            self.n += len(msg.get("body", b""))
            self.more = msg.get("more_body", False)
            if self.n > self.limit:
                raise BodyTooLarge()
        return msg

    async def drain(self, cap: int = 256 * MiB) -> None:
        """Reads and drops the rest of the body (so the client gets the 413 rather than a reset)."""
        drained = 0
        while self.more and drained < cap:
            msg = await self.receive()
            if msg["type"] != "http.request":
                break
            drained += len(msg.get("body", b""))
            self.more = msg.get("more_body", False)


# ===================================================================================== sessions
class SessionRuntime:
    """A session's in-memory side: its conversation (and kernel), a lock, LRU bookkeeping."""

    def __init__(self, sid: str, service: "Service"):
        self.sid = sid
        self.service = service
        self.lock = threading.Lock()
        self.busy = False
        self.conv: Conversation | None = None

    def conversation(self) -> Conversation:
        if self.conv is None:
            self.conv = self.service._open_conversation(self.sid)
        return self.conv

    def close(self) -> None:
        if self.conv is not None:
            self.conv.close()


class KernelSlots:
    """At most ``size`` sessions hold a live kernel; others queue or evict an idle one (LRU)."""

    def __init__(self, size: int):
        self.size = max(1, int(size))
        self.cond = threading.Condition()
        self.live: OrderedDict[str, SessionRuntime] = OrderedDict()
        self.waiting = 0

    def acquire(self, rt: SessionRuntime, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self.cond:
            rt.busy = True
            if rt.sid in self.live:
                self.live.move_to_end(rt.sid)
                return
            self.waiting += 1
            try:
                while True:
                    if len(self.live) < self.size:
                        self.live[rt.sid] = rt
                        return
                    victim = next((r for r in self.live.values() if not r.busy), None)
                    if victim is not None:
                        del self.live[victim.sid]
                        if victim.conv is not None:
                            victim.conv.suspend()
                        continue
                    left = deadline - time.monotonic()
                    if left <= 0:
                        rt.busy = False
                        raise KernelsBusy()
                    self.cond.wait(left)
            finally:
                self.waiting -= 1

    def done(self, rt: SessionRuntime) -> None:
        with self.cond:
            rt.busy = False
            self.cond.notify_all()

    def drop(self, rt: SessionRuntime) -> None:
        with self.cond:
            self.live.pop(rt.sid, None)
            rt.busy = False
            self.cond.notify_all()


class Service:
    """The service's logic, independent of HTTP (the FastAPI app wraps it)."""

    def __init__(self, settings: ServiceSettings, policy_factory: Callable | None = None,
                 checkpoint: Path | None = None):
        from .policy import policy_factory as make_factory
        self.settings = settings
        if policy_factory is None:
            policy_factory, checkpoint = make_factory(settings.policy, checkpoint=settings.checkpoint,
                                                      max_step_tokens=settings.limits.max_step_tokens)
        self.policy_factory = policy_factory
        self.checkpoint = checkpoint
        settings.state_dir = Path(settings.state_dir)
        self.store = Store(settings.state_dir)
        self.slots = KernelSlots(settings.max_kernels)
        self.pool = make_pool(settings.pool_size, checkpoint, settings.sandbox_config) if settings.pool_size > 0 else None
        self._runtimes: dict[str, SessionRuntime] = {}
        self._rt_lock = threading.Lock()

    def close(self) -> None:
        with self._rt_lock:
            rts = list(self._runtimes.values())
        for rt in rts:
            rt.close()
        if self.pool is not None:
            self.pool.close()
        self.store.close()

    # ------------------------------------------------------------------ sessions
    def runtime(self, sid: str) -> SessionRuntime | None:
        if self.store.get_session(sid) is None:
            return None
        with self._rt_lock:
            rt = self._runtimes.get(sid)
            if rt is None:
                rt = self._runtimes[sid] = SessionRuntime(sid, self)
            return rt

    def new_session_id(self) -> str:
        return secrets.token_hex(16)

    def create_session(self, sid: str, files: dict[str, Path], nbytes: int) -> dict:
        """Registers a session whose volumes are at ``files`` (``{key: path}``); validates them.

        Raises:
            InputError: a key is wrong or a file is not a readable NIfTI volume.
        """
        sdir = self.store.session_dir(sid)
        if len(files) > self.settings.max_files:
            raise InputError(f"{len(files)} volumes; at most {self.settings.max_files} per session")
        inputs = prepare_inputs(files, copy_dir=sdir, max_voxels=self.settings.max_voxels)
        policy = self.policy_factory(inputs)
        conv = Conversation(inputs, policy, out_dir=sdir, limits=self.settings.limits, pool=self.pool,
                            sandbox_config=self.settings.sandbox_config if self.pool is None else None,
                            vision_source=getattr(policy, "source", None))
        keys = {}
        for key, path in files.items():
            keys[str(Path(path).resolve())] = key
        recs = [{"key": keys.get(i.path, i.name), "name": i.name, "path": i.path, "sha256": i.sha256,
                 "uploaded": bool(i.path and Path(i.path).is_relative_to(sdir.resolve()))} for i in inputs]
        info = self.store.create_session(sid, recs, nbytes)
        rt = self.runtime(sid)
        rt.conv = conv
        return info

    def _open_conversation(self, sid: str) -> Conversation:
        """Rebuilds a session's conversation after a restart (or eviction): inputs checked by sha256,
        transcript loaded; the kernel's variables are restored at the next question."""
        info = self.store.get_session(sid)
        sdir = self.store.session_dir(sid)
        tr = Transcript.load(sdir)
        inputs = []
        for rec in tr.data["inputs"]:
            p = Path(rec["path"])
            if not p.is_file() or file_sha256(p) != rec["sha256"]:
                raise AgentError(f"input {rec['name']} of session {sid} is missing or changed")
            inputs.append(InputVolume(rec["name"], rec["stem"], rec["modality"], rec["date"], int(rec["session"]),
                                      load_volume(p, self.settings.max_voxels), rec["path"], rec["sha256"],
                                      rec.get("file")))
        assert info is not None
        policy = self.policy_factory(inputs)
        return Conversation(inputs, policy, out_dir=sdir, limits=self.settings.limits, pool=self.pool,
                            sandbox_config=self.settings.sandbox_config if self.pool is None else None,
                            transcript=tr)

    def delete_session(self, sid: str) -> bool:
        rt = self.runtime(sid)
        if rt is None:
            return False
        if not rt.lock.acquire(timeout=0.5):
            raise RuntimeError("busy")
        try:
            rt.close()
            self.slots.drop(rt)
            with self._rt_lock:
                self._runtimes.pop(sid, None)
            return self.store.delete_session(sid)
        finally:
            rt.lock.release()

    def session_info(self, sid: str, base: str = "") -> dict | None:
        info = self.store.get_session(sid)
        if info is None:
            return None
        msgs = self.store.messages(sid)
        return {"id": sid, "created": info["created"], "updated": info["updated"],
                "inputs": [{k: i[k] for k in ("key", "name", "sha256", "uploaded")} for i in info["inputs"]],
                "messages": [{"index": m["idx"], "prompt": m["prompt"], "status": m["status"], "message": m["message"],
                              "answer": (m["answer"] or {}).get("answer")} for m in msgs],
                "transcript_url": f"{base}/v1/sessions/{sid}/transcript"}

    # ------------------------------------------------------------------ messages
    def ask(self, sid: str, prompt: str, on_event: Callable[[dict], None] | None = None, base: str = "") -> dict:
        """Runs one question in a session; the response is persisted before it is returned.

        Raises:
            KeyError: no such session. RuntimeError("busy"): a message is running. KernelsBusy.
        """
        rt = self.runtime(sid)
        if rt is None:
            raise KeyError(sid)
        if not rt.lock.acquire(blocking=False):
            raise RuntimeError("busy")
        try:
            self.slots.acquire(rt, self.settings.queue_timeout)
            try:
                conv = rt.conversation()
                idx = len(conv.transcript.turns)
                self.store.add_message(sid, idx, prompt)
                conv.on_event = (lambda ev: on_event(ev) if ev.get("event") != "answer" else None) if on_event else None
                ans = conv.ask(prompt)
                body = self.response(sid, ans, base)
                self.store.finish_message(sid, idx, ans.status, ans.message, body)
                if not conv.kernel_live:   # the run lost its kernel: free the slot
                    self.slots.drop(rt)
                return body
            finally:
                self.slots.done(rt)
        finally:
            rt.lock.release()

    @staticmethod
    def response(sid: str, ans, base: str = "") -> dict:
        turn = ans.transcript.turns[ans.turn]
        url = f"{base}/v1/sessions/{sid}"
        outs = []
        for o in turn["answer"]["outputs"]:
            outs.append({"name": o["name"], "kind": o["kind"], "shape": o["shape"], "spacing": o["spacing"],
                         "orientation": o["orientation"], "sha256": o["sha256"],
                         "nifti_url": f"{url}/{o['file']}", "png_url": f"{url}/{o['preview']}" if o["preview"] else None})
        return {"session": sid, "index": ans.turn, "status": ans.status, "message": ans.message, "answer": ans.text,
                "measurements": [{"name": m.name, "value": m.value, "unit": m.unit} for m in ans.measurements],
                "outputs": outs,
                "steps": [{"index": s["index"], "code": s["code"], "output": s["output"], "error": s["error"] and
                           {"name": s["error"]["name"], "message": s["error"]["message"]},
                           "duration_s": s["duration_s"]} for s in turn["steps"]],
                "timing": turn["timing"], "transcript_url": f"{url}/transcript"}


# ========================================================================================== app
def _inline_images(html_text: str, root: Path) -> str:
    def repl(m):
        rel = m.group(1)
        p = (root / rel).resolve()
        if p.is_relative_to(root.resolve()) and p.is_file() and p.suffix == ".png":
            return f"<img src='data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}'"
        return m.group(0)
    return re.sub(r"<img src='([^']+)'", repl, html_text)


def create_app(settings: ServiceSettings, policy_factory: Callable | None = None, checkpoint: Path | None = None):
    """The FastAPI application (``service = app.state.service``)."""
    from contextlib import asynccontextmanager

    from fastapi import Depends, FastAPI, HTTPException, Request
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
    from pydantic import BaseModel, Field
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import UploadFile

    from . import __version__

    if not settings.token:
        raise ValueError(f"the service needs a bearer token (set {TOKEN_ENV})")
    service = Service(settings, policy_factory, checkpoint)

    @asynccontextmanager
    async def lifespan(app):
        yield
        await run_in_threadpool(service.close)

    app = FastAPI(title="VoxelPrompt", version=__version__, lifespan=lifespan,
                  description="Ask questions about brain scans; the answers are code that runs in a sandbox. "
                              "Authenticate with `Authorization: Bearer <token>`.")
    app.state.service = service
    bearer = HTTPBearer(auto_error=False)

    @app.exception_handler(AgentError)
    async def agent_error(request: Request, exc: AgentError):
        return JSONResponse({"detail": str(exc)}, status_code=500)

    def auth(cred: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if cred is None or cred.scheme.lower() != "bearer" or not hmac.compare_digest(
                cred.credentials.encode(), settings.token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    def base_url(request: Request) -> str:
        return str(request.base_url).rstrip("/")

    def need_session(sid: str) -> None:
        if not SESSION_ID.match(sid) or service.store.get_session(sid) is None:
            raise HTTPException(404, f"no session {sid}")

    class PathSession(BaseModel):
        volumes: dict[str, str] = Field(..., description="volume key (t1, t1@2021-03-01, ...) -> path under the "
                                                          "service's data root", examples=[{"t1": "sub-01/anat/t1.nii.gz"}])

    class Message(BaseModel):
        prompt: str = Field(..., min_length=1, max_length=4000, examples=["what is the volume of the left hippocampus?"])
        stream: bool = Field(False, description="answer with server-sent events (step by step)")

    upload_doc = {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "additionalProperties": {"type": "string", "format": "binary"},
                                           "description": "one NIfTI file per volume; the field name is the volume "
                                                          "key: t1, flair, t1@2021-03-01, ..."}},
        "application/json": {"schema": PathSession.model_json_schema()}}}}

    @app.get("/v1/health")
    def health() -> dict:
        return {"status": "ok", "version": __version__, "live_kernels": len(service.slots.live),
                "max_kernels": service.slots.size, "queued": service.slots.waiting}

    @app.post("/v1/sessions", status_code=201, dependencies=[Depends(auth)], openapi_extra=upload_doc)
    async def create_session(request: Request):
        """Creates a session from uploaded NIfTI files (multipart) or server-side paths (JSON)."""
        limit = settings.max_upload_bytes
        clen = request.headers.get("content-length")
        limited = _LimitedReceive(request.receive, limit)
        req = Request(request.scope, limited)
        ctype = request.headers.get("content-type", "")
        sid = service.new_session_id()
        sdir = service.store.session_dir(sid)
        files: dict[str, Path] = {}
        try:
            if clen is not None and clen.isdigit() and int(clen) > limit:
                raise BodyTooLarge()
            if ctype.startswith("multipart/form-data"):
                form = await req.form(max_files=settings.max_files, max_fields=settings.max_files)
                try:
                    for key, value in form.multi_items():
                        if not isinstance(value, UploadFile):
                            raise HTTPException(422, f"field {key!r} is not a file: send one NIfTI file per volume")
                        try:
                            parse_volume_key(key)
                        except InputError as exc:
                            raise HTTPException(422, str(exc)) from None
                        if key in files:
                            raise HTTPException(422, f"volume {key!r} given twice")
                        head = await value.read(2)
                        await value.seek(0)
                        safe = re.sub(r"[^A-Za-z0-9_@.-]", "_", key)
                        dst = sdir / "uploads" / (safe + (".nii.gz" if head == b"\x1f\x8b" else ".nii"))
                        dst.parent.mkdir(parents=True, exist_ok=True)
                        with open(dst, "wb") as f:
                            while chunk := await value.read(MiB):
                                f.write(chunk)
                            f.flush()
                            os.fsync(f.fileno())
                        files[key] = dst
                finally:
                    await form.close()
            elif ctype.startswith("application/json"):
                try:
                    body = PathSession.model_validate(await req.json())
                except ValueError as exc:
                    raise HTTPException(422, f"bad JSON body: {exc}") from None
                root = settings.data_root
                if root is None:
                    raise HTTPException(403, "this service has no data root: upload the files instead")
                root = Path(root).resolve()
                for key, rel in body.volumes.items():
                    p = (root / rel).resolve()
                    if not p.is_relative_to(root):
                        raise HTTPException(403, f"{rel!r} is outside the data root")
                    if not p.is_file():
                        raise HTTPException(404, f"{rel!r} does not exist under the data root")
                    files[key] = p
            else:
                raise HTTPException(415, "send multipart/form-data (file uploads) or application/json (paths)")
            if not files:
                raise HTTPException(422, "no volumes: send at least one NIfTI file (e.g. field t1)")
            nbytes = sum(p.stat().st_size for p in files.values())
            try:
                info = await run_in_threadpool(service.create_session, sid, files, nbytes)
            except InputError as exc:
                raise HTTPException(422, str(exc)) from None
        except BodyTooLarge:
            await limited.drain()
            _rm(sdir)
            return JSONResponse({"detail": f"the upload is larger than the limit of {limit:,} bytes"}, status_code=413)
        except BaseException:
            _rm(sdir)
            raise
        return service.session_info(sid, base_url(request)) | {"created": info["created"]}

    @app.get("/v1/sessions/{sid}", dependencies=[Depends(auth)])
    def get_session(sid: str, request: Request) -> dict:
        need_session(sid)
        return service.session_info(sid, base_url(request))

    @app.delete("/v1/sessions/{sid}", status_code=204, dependencies=[Depends(auth)])
    def delete_session(sid: str):
        need_session(sid)
        try:
            service.delete_session(sid)
        except RuntimeError:
            raise HTTPException(409, "a message is running in this session") from None
        return PlainTextResponse(status_code=204)

    @app.post("/v1/sessions/{sid}/messages", dependencies=[Depends(auth)])
    async def post_message(sid: str, msg: Message, request: Request):
        """Asks a question. The answer (text, measurements, outputs, steps) is persisted before it is sent."""
        need_session(sid)
        base = base_url(request)
        stream = msg.stream or "text/event-stream" in request.headers.get("accept", "")
        if not stream:
            try:
                return await run_in_threadpool(service.ask, sid, msg.prompt, None, base)
            except RuntimeError as exc:
                if str(exc) == "busy":
                    raise HTTPException(409, "a message is already running in this session") from None
                raise
            except KernelsBusy:
                raise HTTPException(503, "all kernels are busy; try again later") from None
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def on_event(ev: dict) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, ("event", ev))

        def work() -> None:
            try:
                body = service.ask(sid, msg.prompt, on_event, base)
                loop.call_soon_threadsafe(queue.put_nowait, ("answer", body))
            except KernelsBusy:
                loop.call_soon_threadsafe(queue.put_nowait, ("error", {"status": 503, "detail": "all kernels are busy"}))
            except RuntimeError as exc:
                detail = "a message is already running in this session" if str(exc) == "busy" else str(exc)
                loop.call_soon_threadsafe(queue.put_nowait, ("error", {"status": 409 if str(exc) == "busy" else 500,
                                                                       "detail": detail}))
            except Exception as exc:  # reported to the client as an event
                loop.call_soon_threadsafe(queue.put_nowait, ("error", {"status": 500, "detail": f"{type(exc).__name__}: {exc}"}))

        threading.Thread(target=work, name=f"message-{sid[:8]}", daemon=True).start()

        async def events():
            while True:
                kind, data = await queue.get()
                name = data.get("event", "event") if kind == "event" else kind
                yield f"event: {name}\ndata: {json.dumps(data, default=str)}\n\n"
                if kind in ("answer", "error"):
                    return

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def transcript_of(sid: str) -> Transcript:
        need_session(sid)
        try:
            return Transcript.load(service.store.session_dir(sid))
        except TranscriptError as exc:
            raise HTTPException(500, str(exc)) from None

    @app.get("/v1/sessions/{sid}/transcript", dependencies=[Depends(auth)])
    def get_transcript(sid: str, format: str = "json"):
        """The transcript as JSON (default), HTML (images inline) or Markdown."""
        tr = transcript_of(sid)
        if format == "json":
            return JSONResponse(tr.data)
        if format == "html":
            return HTMLResponse(_inline_images(tr.to_html(), tr.root))
        if format in ("md", "markdown"):
            return PlainTextResponse(tr.to_markdown(), media_type="text/markdown")
        raise HTTPException(422, "format must be json, html or md")

    @app.get("/v1/sessions/{sid}/transcript.json", dependencies=[Depends(auth)], include_in_schema=False)
    def get_transcript_json(sid: str):
        return get_transcript(sid, "json")

    @app.get("/v1/sessions/{sid}/transcript.html", dependencies=[Depends(auth)], include_in_schema=False)
    def get_transcript_html(sid: str):
        return get_transcript(sid, "html")

    @app.get("/v1/sessions/{sid}/transcript.md", dependencies=[Depends(auth)], include_in_schema=False)
    def get_transcript_md(sid: str):
        return get_transcript(sid, "md")

    @app.get("/v1/sessions/{sid}/turn-{turn}/outputs/{filename}", dependencies=[Depends(auth)])
    def get_output(sid: str, turn: int, filename: str):
        """An output volume (``.nii.gz``) or its preview (``.png``), as listed in the transcript."""
        tr = transcript_of(sid)
        rel = f"turn-{turn}/outputs/{filename}"
        if not 1 <= turn <= len(tr.turns):
            raise HTTPException(404, f"no question {turn} in this session")
        listed = {x for o in (tr.turns[turn - 1].get("answer") or {}).get("outputs", [])
                  for x in (o["file"], o["preview"]) if x}
        if rel not in listed:
            raise HTTPException(404, f"no output {filename!r} in question {turn}")
        path = tr.file(rel)
        media = "image/png" if filename.endswith(".png") else "application/gzip"
        return FileResponse(path, media_type=media, filename=filename)

    return app


def _rm(path: Path) -> None:
    import shutil
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)


def serve(host: str = "127.0.0.1", port: int = 8000, settings: ServiceSettings | None = None,
          log_level: str = "info") -> None:
    """Runs the service with uvicorn (blocking)."""
    import uvicorn
    app = create_app(settings)
    print(f"VoxelPrompt service on http://{host}:{port} (docs at /docs); state in {settings.state_dir}", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10)
