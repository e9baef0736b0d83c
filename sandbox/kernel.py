"""One kernel process and the host's connection to it: start, run a step, interrupt, kill.

The host talks to the kernel over jupyter_client's messaging on ZeroMQ ``ipc`` sockets. Its
sockets refuse messages over ``Limits.message_bytes`` and never reconnect: once connected, the
host never looks up a socket path again, so nothing the kernel later puts there is followed.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import os
import queue
import select
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
import uuid
import warnings

import zmq
from jupyter_client.blocking import BlockingKernelClient
from jupyter_client.session import Session

from . import fdsync, isolation, seccomp
from .config import SandboxConfig
from .kernel_side import MARKER
from .result import ErrorInfo, ExecutionResult, SandboxError, strip_ansi

_PORTS = {"shell_port": 1, "iopub_port": 2, "stdin_port": 3, "control_port": 4, "hb_port": 5}
_IDLE_AFTER_REPLY = 2.0   # seconds to wait for the last output once the reply is in
_POLL = 0.1               # seconds between liveness checks while waiting
_SEND_TIMEOUT_MS = 5000
_MARKER_HEAD = MARKER.split("{")[0]


class _Spawner:
    """Starts every kernel from one long-lived thread.

    Linux delivers the parent-death signal when the *thread* that forked exits, so a kernel started
    from a short-lived thread (a pool's worker, a request handler) would die with that thread.
    """

    def __init__(self):
        self._jobs: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def popen(self, *args, **kwargs) -> subprocess.Popen:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="sandbox-spawner", daemon=True)
                self._thread.start()
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((fut, args, kwargs))
        return fut.result()

    def _run(self) -> None:
        while True:
            fut, args, kwargs = self._jobs.get()
            try:
                fut.set_result(subprocess.Popen(*args, **kwargs))
            except BaseException as exc:  # handed to the caller
                fut.set_exception(exc)


_spawner = _Spawner()


class Kernel:
    """A started, connected kernel. Create with :meth:`Kernel.start`.

    Attributes:
        config: the configuration it was started with.
        mode: ``"bwrap"`` or ``"none"`` (the unisolated fallback).
        seccomp: whether the syscall filter is active (read from ``/proc`` once started).
        start_seconds: how long the start took (process launch, preamble, handshake).
    """

    def __init__(self, config: SandboxConfig):
        self.config = config
        self.mode = ""
        self.seccomp = False
        self.start_seconds = 0.0
        self.uid: int | None = None         # the kernel's own user id when started by root
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None          # the sandbox's first process (bwrap's init), host view
        self.client: BlockingKernelClient | None = None
        self._ctx: zmq.Context | None = None
        self._host_run: str | None = None
        self._host_workspace: str | None = None
        self._workspace_fd: int | None = None
        self._log: collections.deque = collections.deque(maxlen=200)
        self._log_lines = 0
        self._log_thread: threading.Thread | None = None
        self._closed = False
        self._control_lock = threading.Lock()
        # tokens of recent steps whose markers did not arrive: if they come later, they are removed
        self._stale_tokens: collections.deque = collections.deque(maxlen=8)

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def start(cls, config: SandboxConfig) -> "Kernel":
        """Launches a kernel and waits until it answers (preamble done).

        Raises:
            IsolationUnavailable: no bubblewrap and the fallback was not allowed.
            SandboxError: the kernel failed to start; the message holds its log.
        """
        k = cls(config)
        t0 = time.monotonic()
        try:
            k._launch()
            k._connect(t0 + config.start_timeout)
        except BaseException:
            k.kill()
            raise
        k.start_seconds = time.monotonic() - t0
        return k

    def _launch(self) -> None:
        cfg = self.config
        self.mode = isolation.choose_mode(cfg)
        if self.mode == "none":
            warnings.warn(isolation.FALLBACK_WARNING, RuntimeWarning, stacklevel=4)
        want = {None: "auto", True: "require", False: "off"}[cfg.seccomp]
        self.seccomp = want != "off" and seccomp.available()
        if want == "require" and not self.seccomp:
            raise SandboxError("seccomp=True but libseccomp is not available")
        self._host_run = tempfile.mkdtemp(prefix="voxelprompt-sandbox-")
        uid = isolation.kernel_uid() if self.mode == "bwrap" else None
        self.uid = uid and uid[0]
        if self.mode == "bwrap":
            kernel_run, workspace = isolation.KERNEL_RUN, isolation.WORKSPACE
        else:
            self._host_workspace = tempfile.mkdtemp(prefix="voxelprompt-workspace-")
            kernel_run, workspace = self._host_run, self._host_workspace
        self._connection = {"transport": "ipc", "ip": f"{kernel_run}/ipc", "key": uuid.uuid4().hex,
                            "signature_scheme": "hmac-sha256", **_PORTS}
        lim = cfg.limits
        launch = {
            "connection": self._connection, "connection_file": f"{kernel_run}/kernel.json",
            "rlimits": {"memory_bytes": lim.memory_bytes, "cpu_seconds": lim.cpu_seconds,
                        "file_size_bytes": lim.file_size_bytes, "open_files": lim.open_files,
                        "core_bytes": 0,
                        # RLIMIT_NPROC counts every task of the user id: only meaningful when the
                        # kernel has an id (or a user namespace) of its own, as under bubblewrap.
                        "processes": lim.processes if self.mode == "bwrap" else None},
            "uid": uid and uid[0], "gid": uid and uid[1], "seccomp": want,
            "preamble": list(cfg.preamble), "output_chars": lim.output_chars, "workspace": workspace,
            "parent_pid": os.getpid() if self.mode == "none" else None,
        }
        launch_file = os.path.join(self._host_run, "launch.json")
        with open(launch_file, "w", encoding="utf-8") as f:
            json.dump(launch, f)
        info_r = info_w = None
        if self.mode == "bwrap":
            info_r, info_w = os.pipe()
            plan = isolation.plan_bwrap(cfg, self._host_run, launch_file, info_w, uid)
        else:
            plan = isolation.plan_fallback(cfg, self._host_run, launch_file, self._host_workspace)
        if uid is not None:
            for name in ("", "launch.json"):
                os.chown(os.path.join(self._host_run, name), *uid)
        try:
            self.proc = _spawner.popen(plan.argv, env=plan.env, cwd=plan.cwd, stdin=subprocess.DEVNULL,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       pass_fds=(info_w,) if info_w is not None else (),
                                       start_new_session=True)
        finally:
            if info_w is not None:
                os.close(info_w)
        self._log_thread = threading.Thread(target=self._read_log, args=(self.proc.stdout,),
                                            daemon=True, name="sandbox-kernel-log")
        self._log_thread.start()
        if info_r is not None:
            try:
                self.pid = self._read_child_pid(info_r, time.monotonic() + 30)
            finally:
                os.close(info_r)
        else:
            self.pid = self.proc.pid
        self._kernel_run = plan.kernel_run.format(pid=self.pid)
        self._workspace_path = plan.workspace.format(pid=self.pid)

    def _read_child_pid(self, fd: int, deadline: float) -> int:
        data = b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                chunk = os.read(fd, 4096)
                data += chunk
                try:
                    return int(json.loads(data)["child-pid"])
                except (ValueError, KeyError):
                    if not chunk:
                        break
            elif self.proc.poll() is not None:
                break
        raise SandboxError(f"bubblewrap did not start the kernel:\n{self.log_tail()}")

    def _connect(self, deadline: float) -> None:
        # The kernel writes its connection file once all its sockets listen; connecting only then
        # lets the host's sockets go without reconnection.
        ready_file = os.path.join(self._kernel_run, "kernel.json")
        while not (self._root_is_set_up() and os.path.exists(ready_file)):
            self._check_starting(deadline)
            time.sleep(0.02)
        for channel in ("shell_port", "iopub_port", "control_port"):
            path = f"{self._kernel_run}/ipc-{_PORTS[channel]}"
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise SandboxError(f"kernel socket {path} is not a socket")
        ctx = zmq.Context()
        ctx.setsockopt(zmq.MAXMSGSIZE, self.config.limits.message_bytes)
        ctx.setsockopt(zmq.RECONNECT_IVL, -1)
        ctx.setsockopt(zmq.LINGER, 0)
        ctx.setsockopt(zmq.SNDTIMEO, _SEND_TIMEOUT_MS)  # a cut connection fails a send, never hangs it
        ctx.setsockopt(zmq.IMMEDIATE, 1)
        self._ctx = ctx
        info = dict(self._connection, ip=f"{self._kernel_run}/ipc")
        session = Session(key=info["key"].encode(), signature_scheme=info["signature_scheme"])
        kc = BlockingKernelClient(context=ctx, session=session)
        kc.load_connection_info(info)
        kc.start_channels(shell=True, iopub=True, stdin=False, hb=False, control=True)
        self.client = kc
        while True:  # kernel_info until both the reply and some iopub traffic arrived
            msg_id = kc.kernel_info()
            while not self._shell_reply(msg_id, 0.2):
                self._check_starting(deadline)
            if kc.iopub_channel.socket.poll(200):
                break
            self._check_starting(deadline)
        while kc.iopub_channel.msg_ready():
            kc.iopub_channel.get_msg(timeout=0)
        self._workspace_fd = os.open(self._workspace_path, os.O_RDONLY | os.O_DIRECTORY)
        active = self._seccomp_active()
        if active is not None:
            self.seccomp = active
        if self.config.seccomp and not self.seccomp:
            raise SandboxError(f"seccomp=True but the filter is not active:\n{self.log_tail()}")

    def _seccomp_active(self) -> bool | None:
        """Reads from Linux whether the kernel process runs under a seccomp filter (None: unknown)."""
        try:
            pid = self.pid
            if self.mode == "bwrap":  # the kernel is the child of bwrap's init
                with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as f:
                    pid = int(f.read().split()[0])
            with open(f"/proc/{pid}/status", encoding="ascii") as f:
                return "\nSeccomp:\t2\n" in f.read()
        except (OSError, ValueError, IndexError):
            return None

    def _root_is_set_up(self) -> bool:
        """Under bubblewrap: whether the sandbox has its own root yet (until then, paths through
        ``/proc/<pid>/root`` would lead into the host's)."""
        if self.mode != "bwrap":
            return True
        try:
            own, host = os.stat(f"/proc/{self.pid}/root"), os.stat("/")
        except OSError:
            return False  # gone: the caller's liveness check reports it
        return (own.st_dev, own.st_ino) != (host.st_dev, host.st_ino)

    def _shell_reply(self, msg_id: str, timeout: float) -> bool:
        sock = self.client.shell_channel.socket
        if not sock.poll(int(timeout * 1000)):
            return False
        msg = self.client.shell_channel.get_msg(timeout=0)
        return msg["parent_header"].get("msg_id") == msg_id

    def _check_starting(self, deadline: float) -> None:
        if not self.alive():
            raise SandboxError(f"the kernel exited during start ({self.exit_description()}):\n"
                               f"{self.log_tail()}")
        if time.monotonic() > deadline:
            raise SandboxError(f"the kernel did not start within {self.config.start_timeout:g} s:\n"
                               f"{self.log_tail()}")

    def _read_log(self, pipe) -> None:
        """Keeps the tail of what the process prints outside the kernel's streams, in bounded memory."""
        fd, partial = pipe.fileno(), b""
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            *lines, partial = (partial + chunk).split(b"\n")
            partial = partial[-2000:]
            for line in lines[-200:]:
                self._log.append(line[:2000].decode(errors="replace"))
                self._log_lines += 1
        if partial:
            self._log.append(partial.decode(errors="replace"))
            self._log_lines += 1
        pipe.close()

    def log_tail(self, lines: int = 40) -> str:
        """The last lines the kernel process printed outside any step (start errors, crashes)."""
        return "\n".join(list(self._log)[-lines:]) if lines > 0 else ""

    def _log_since(self, count: int) -> list[str]:
        """Lines logged after the ``count``-th one (waits briefly for a dead kernel's last words)."""
        if self._log_thread is not None and not self.alive():
            self._log_thread.join(timeout=1)
        new = min(self._log_lines - count, 40)
        return list(self._log)[-new:] if new > 0 else []

    def alive(self) -> bool:
        """Whether the kernel process is still running."""
        return self.proc is not None and self.proc.poll() is None

    def exit_description(self) -> str:
        """How the process ended, e.g. ``"killed by SIGSEGV"``."""
        if self.proc is None or self.proc.returncode is None:
            return "still running"
        rc = self.proc.returncode
        sig = -rc if rc < 0 else (rc - 128 if self.mode == "bwrap" and 128 < rc < 160 else 0)
        if sig:
            try:
                return f"killed by {signal.Signals(sig).name}"
            except ValueError:
                return f"killed by signal {sig}"
        return f"exit status {rc}"

    def interrupt(self) -> None:
        """Asks the kernel to raise ``KeyboardInterrupt`` in the running step."""
        with self._control_lock:
            if self.client is not None and self.alive() and not self._closed:
                msg = self.client.session.msg("interrupt_request", content={})
                try:
                    self.client.control_channel.send(msg)
                except zmq.ZMQError:
                    pass  # connection cut: the step's timeout handling kills the kernel

    def stop_process(self) -> None:
        """Kills the kernel's processes, leaving the connection alone (safe from any thread)."""
        if self.proc is not None and self.proc.poll() is None:
            if self.pid and self.pid != self.proc.pid:
                try:  # the sandbox's pid 1: its death ends every process inside; bwrap still waits on it,
                    # so the pid cannot have been reused
                    os.kill(self.pid, signal.SIGKILL)
                except OSError:
                    pass
            self.proc.kill()

    def kill(self) -> None:
        """Ends the kernel at once and frees everything it held; safe to call twice."""
        with self._control_lock:  # no interrupt is sent on a closing connection
            if self._closed:
                return
            self._closed = True
        self.stop_process()
        if self.proc is not None:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        if self.client is not None:
            self.client.stop_channels()
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
        if self._workspace_fd is not None:
            os.close(self._workspace_fd)
            self._workspace_fd = None
        for path in (self._host_run, self._host_workspace):
            if path:
                shutil.rmtree(path, ignore_errors=True)

    @property
    def workspace_fd(self) -> int:
        """An open descriptor of the workspace folder (for no-follow file access from the host)."""
        if self._workspace_fd is None:
            raise SandboxError("the kernel is not running")
        return self._workspace_fd

    # ------------------------------------------------------------------ steps
    def execute(self, code: str, timeout: float, *, silent: bool = False) -> tuple[ExecutionResult, bool]:
        """Runs one step. Returns the result and whether the kernel is still usable.

        A step past ``timeout`` is interrupted; if it has not stopped ``interrupt_grace`` seconds
        later the kernel is killed. A dead kernel or a lost connection is reported as an error.
        The step ends once its reply, its ``idle`` status and its end-of-step report or markers
        (see :mod:`sandbox.fdsync`) are in, or ``fdsync.HOST_WAIT`` seconds after ``idle``.
        """
        if not isinstance(code, str):
            raise ValueError(f"code {code!r} must be a string")
        lim = self.config.limits
        token = fdsync.new_token()
        out = _Collector(lim.output_chars, lim.display_chars, token, self._stale_tokens)
        kc = self.client
        t0 = time.monotonic()
        log_start = self._log_lines
        try:
            content = {"code": code, "silent": silent, "store_history": not silent,
                       "user_expressions": {}, "allow_stdin": False, "stop_on_error": False}
            msg = kc.session.msg("execute_request", content, metadata={fdsync.META_KEY: token})
            kc.shell_channel.send(msg)
            msg_id = msg["header"]["msg_id"]
        except zmq.ZMQError:
            self.kill()
            out.error = ErrorInfo("ConnectionLost", "the kernel no longer accepts steps (its end of the "
                                  "connection was closed); it was restarted and its variables are lost")
            res = out.result(time.monotonic() - t0)
            res.state_lost = True
            return res, False
        poller = zmq.Poller()
        poller.register(kc.shell_channel.socket, zmq.POLLIN)
        poller.register(kc.iopub_channel.socket, zmq.POLLIN)
        reply = None
        idle = lost = False
        reply_at = interrupted_at = idle_at = None
        last_iopub = t0
        healthy = True
        # done: the reply and the idle status are in, and the end-of-step markers (fdsync) too, or
        # they stopped being worth a wait
        while not (reply is not None and idle and (out.synced() or reply.get("status") == "aborted")):
            now = time.monotonic()
            if reply is not None and not idle and (now - max(reply_at, last_iopub) > _IDLE_AFTER_REPLY
                                                   or now - t0 > timeout + self.config.interrupt_grace):
                lost = True  # the reply came but the output stream went silent (or never ends)
                healthy = False
                break
            if reply is not None and idle and now - max(reply_at, idle_at) > fdsync.HOST_WAIT:
                break  # the markers did not come: output written below Python may be incomplete
            if not self.alive():
                out.error = ErrorInfo("KernelDied", f"the kernel died ({self.exit_description()}); "
                                      "its variables are lost and the next step starts a fresh kernel",
                                      self._log_since(log_start))
                healthy = False
                break
            if reply is None and interrupted_at is None and now - t0 > timeout:
                self.interrupt()
                interrupted_at = now
            grace = self.config.interrupt_grace
            if interrupted_at is not None and reply is None and now - interrupted_at > grace:
                self.kill()
                out.error = ErrorInfo("TimeoutError", f"the step ran past its {timeout:g} s timeout and "
                                      "ignored the interrupt; the kernel was restarted and its "
                                      "variables are lost")
                healthy = False
                break
            try:
                events = dict(poller.poll(_POLL * 1000))
                if kc.iopub_channel.socket in events:
                    last_iopub = time.monotonic()
                    while kc.iopub_channel.msg_ready():
                        msg = kc.iopub_channel.get_msg(timeout=0)
                        if msg["parent_header"].get("msg_id") == msg_id and out.add(msg) and not idle:
                            idle, idle_at = True, time.monotonic()
                if kc.shell_channel.socket in events:
                    while kc.shell_channel.msg_ready():
                        msg = kc.shell_channel.get_msg(timeout=0)
                        if msg["parent_header"].get("msg_id") == msg_id:
                            reply, reply_at = dict(msg["content"]), time.monotonic()
                            out.take_report(msg.get("metadata"))
            except (zmq.ZMQError, ValueError, TypeError, KeyError, AttributeError) as exc:
                self.kill()  # a kernel that breaks the protocol is not trusted with another step
                out.error = ErrorInfo("ProtocolError", "the kernel sent a malformed message "
                                      f"({type(exc).__name__}); it was restarted and its variables are lost")
                reply, healthy = None, False
                break
        if reply is not None:
            out.set_reply(reply)
        if lost:
            out.lost_output()
        elif healthy and reply is not None and reply.get("status") != "aborted":
            out.check_synced()
        if interrupted_at is not None and healthy:
            tb = out.error.traceback if out.error else []
            out.error = ErrorInfo("TimeoutError", f"the step ran past its {timeout:g} s timeout and "
                                  "was interrupted; variables are kept", tb)
        res = out.result(time.monotonic() - t0)
        res.state_lost = not healthy
        return res, healthy


class _Collector:
    """Gathers a step's messages into an :class:`ExecutionResult`, enforcing the output caps."""

    def __init__(self, output_limit: int, display_limit: int, token: str = "",
                 stale_tokens: collections.deque | None = None):
        self.streams: dict[str, list[str]] = {"stdout": [], "stderr": []}
        # the step's end-of-step markers (see fdsync), and those of earlier steps that never came
        self.token = token
        self.stale_tokens = stale_tokens if stale_tokens is not None else collections.deque()
        marks = {fdsync.marker(old): "stale" for old in self.stale_tokens}
        marks[fdsync.marker(token)] = "ok"
        self.scanners = {name: fdsync.Scanner(marks) for name in self.streams}
        self.sync: dict[str, str | None] = {name: None for name in self.streams}  # None: pending
        self.sizes = {"stdout": 0, "stderr": 0}
        self.cut = {"stdout": False, "stderr": False}
        # the kernel adds its own marker at output_limit; leave room for it before cutting here
        self.limit = output_limit
        self.output_limit = output_limit + len(MARKER) + 20
        self.display_limit = display_limit
        self.display_size = 0
        self.display_dropped = False
        self.display: list[dict] = []
        self.value: dict | None = None
        self.error: ErrorInfo | None = None
        self.truncated = False

    def add(self, msg: dict) -> bool:
        """Takes one iopub message; returns True when it is the step's final ``idle`` status."""
        kind, content = msg["msg_type"], msg["content"]
        if kind == "status":
            return content.get("execution_state") == "idle"
        if kind == "stream":
            name = "stderr" if content.get("name") == "stderr" else "stdout"
            for text, label in self.scanners[name].feed(str(content.get("text", ""))):
                if label is None:
                    self._append(name, text)
                elif label == "ok":
                    self.sync[name] = "ok"
        elif kind in ("display_data", "update_display_data", "execute_result"):
            data = dict(content.get("data") or {})
            size = sum(len(v) if isinstance(v, str) else len(json.dumps(v)) for v in data.values())
            if self.display_size + size > self.display_limit:
                if not self.display_dropped:
                    self.streams["stderr"].append(f"\n[sandbox: display output dropped after "
                                                  f"{self.display_limit:,} characters]\n")
                self.display_dropped = self.truncated = True
            else:
                self.display_size += size
                if kind == "execute_result":
                    self.value = data
                else:
                    self.display.append(data)
        elif kind == "error" and self.error is None:
            self.error = ErrorInfo(str(content.get("ename", "Error")), str(content.get("evalue", "")),
                                   [strip_ansi(str(t)) for t in content.get("traceback", [])])
        return False

    def _append(self, name: str, text: str) -> None:
        if _MARKER_HEAD in text:
            self.truncated = True  # already cut by the kernel's own cap
        if self.cut[name]:
            return
        room = self.output_limit - self.sizes[name]
        if len(text) <= room:
            self.streams[name].append(text)
            self.sizes[name] += len(text)
            return
        self.streams[name].append(text[:room] + MARKER.format(limit=self.limit))
        self.cut[name] = self.truncated = True

    def take_report(self, metadata) -> None:
        """Reads the kernel's end-of-step report from the reply's metadata (see fdsync)."""
        report = metadata.get(fdsync.META_KEY) if isinstance(metadata, dict) else None
        if isinstance(report, dict):
            for name in self.sync:
                if report.get(name) in ("ok", "failed") and self.sync[name] is None:
                    self.sync[name] = report[name]

    def synced(self) -> bool:
        """Whether both streams are settled: marker taken out in the kernel or arrived, or failed."""
        return None not in self.sync.values()

    def check_synced(self) -> None:
        """At the end of a healthy step: notes when output written below Python may be incomplete."""
        self._flush_withheld()
        if all(label == "ok" for label in self.sync.values()):
            return
        if not self.synced():
            self.stale_tokens.append(self.token)  # its markers may still come, in a later step
        missing = ", ".join(f"fd {1 + (name == 'stderr')}" for name, label in self.sync.items()
                            if label != "ok")
        self._append("stderr", f"\n[sandbox: output written directly to {missing} (os.write, C "
                     "extensions) may be incomplete: part of it may be missing here or appear in the "
                     "next step]\n")

    def lost_output(self) -> None:
        self.truncated = True
        own = f" (the step itself ended with {self.error})" if self.error else ""
        self.error = ErrorInfo("OutputLost", "the kernel's output channel was cut (a message over the "
                               f"size limit?); the kernel was restarted and its variables are lost{own}")

    def set_reply(self, reply: dict) -> None:
        status = reply.get("status")
        if status == "error":
            self.error = ErrorInfo(str(reply.get("ename", "Error")), str(reply.get("evalue", "")),
                                   [strip_ansi(str(t)) for t in reply.get("traceback", [])])
        elif status == "aborted":
            self.error = ErrorInfo("Aborted", "the kernel aborted the step")

    def _flush_withheld(self) -> None:
        for name, scanner in self.scanners.items():  # a withheld end that was no marker after all
            rest = scanner.flush()
            if rest:
                self._append(name, rest)

    def result(self, duration: float) -> ExecutionResult:
        self._flush_withheld()
        return ExecutionResult(stdout="".join(self.streams["stdout"]),
                               stderr="".join(self.streams["stderr"]), error=self.error,
                               display=self.display, value=self.value, duration=duration,
                               truncated=self.truncated,
                               output_synced=all(label == "ok" for label in self.sync.values()))
