"""End-of-step markers: output written below Python belongs to the step that wrote it.

ipykernel captures file descriptors 1 and 2 (``os.write(1, ...)``, C extensions, libc ``printf``)
through one pipe each, drained by a reader thread that forwards the bytes as stream messages on
its own schedule, so they could come after the step's reply. Therefore, after every step, the
kernel writes a marker unique to that step (a random token the host puts in the request's
metadata) into each pipe, through a descriptor of the pipe it duplicated at start (so closing or
redirecting fd 1 or 2 does not stop it). A pipe is first in, first out: once the marker has come
out, every byte written to the pipe before it has too.

* Usual case: the pipe is empty and its reader thread holds no bytes: everything is passed on
  already, no marker is needed.
* Bytes still in flight: the kernel waits (at most :data:`KERNEL_WAIT` seconds) until its reader
  thread has taken the marker out (it is removed there, never sent), so everything before it is
  sent ahead of the step's ``idle`` status.
* Either way the kernel reports ``"ok"`` per stream in the reply's metadata.
* A reader thread that lags: the kernel reports ``"pending"`` and the reader forwards the marker
  as text when it gets there; the host keeps reading the step's output until it arrives, at most
  :data:`HOST_WAIT` seconds after the step went idle, and removes it from the text.
* The kernel cannot write a marker (the step closed or replaced its descriptor and fd 1 or 2 is no
  longer the pipe, the reader thread is gone, the pipe stays full): it reports ``"failed"``.

Anything but ``"ok"`` for both streams (or a pending marker that did not come in time) gives
``output_synced=False`` in the step's result. The host trusts nothing the kernel says: a forged or
missing report or marker only cuts short or delays that kernel's own output, and the host's wait
is bounded.

This module is shared by both ends: the host imports it in its own process, the kernel imports it
from the repository (:func:`install` runs inside the kernel).
"""

from __future__ import annotations

import fcntl
import os
import re
import select
import stat
import sys
import termios
import threading
import time

#: Key of the step's token in the ``execute_request`` metadata, and of the kernel's report (stream
#: name -> ``"ok"``, ``"pending"`` or ``"failed"``) in the ``execute_reply`` metadata.
META_KEY = "voxelprompt_sandbox_sync"
#: First character of every marker; it occurs nowhere else in a marker.
LEAD = "\x02"
#: Seconds the kernel waits after a step for its reader threads to take the markers out.
KERNEL_WAIT = 1.0
#: Seconds the host waits for pending markers once the step is idle.
HOST_WAIT = 2.0

_TOKEN = re.compile(r"[0-9a-f]{32}")
_syncs: list = []   # inside the kernel: the _StreamSync of stdout and stderr (tests look at them)


def new_token() -> str:
    """A fresh random token for one step."""
    return os.urandom(16).hex()


def marker(token: str) -> str:
    """What the kernel writes into each pipe after the step: everything before it belongs to the step."""
    return f"{LEAD}sandbox-sync {token}\x03"


class Scanner:
    """Finds markers in text that arrives in pieces (a marker may be split between two pieces).

    Args:
        markers: marker text -> label; every marker starts with :data:`LEAD` and contains it once.
    """

    def __init__(self, markers: dict[str, str]):
        self.markers = dict(markers)
        self.tail = ""   # the end of the last piece, when it may be the start of a marker

    def feed(self, text: str) -> list[tuple[str, str | None]]:
        """Splits ``text`` into ``(text, None)`` and ``(marker, label)`` segments, in order.

        A possible start of a marker at the end is withheld until the next piece (or :meth:`flush`).
        """
        buf, self.tail = self.tail + text, ""
        if LEAD not in buf:
            return [(buf, None)] if buf else []
        out: list[tuple[str, str | None]] = []
        start = pos = 0
        while True:
            j = buf.find(LEAD, pos)
            if j < 0:
                break
            rest = buf[j:]
            hit = next((m for m in self.markers if rest.startswith(m)), None)
            if hit is not None:
                if j > start:
                    out.append((buf[start:j], None))
                out.append((hit, self.markers[hit]))
                start = pos = j + len(hit)
                continue
            if any(m.startswith(rest) for m in self.markers):  # the start of a marker, cut off
                self.tail = rest
                buf = buf[:j]
                break
            pos = j + 1
        if len(buf) > start:
            out.append((buf[start:], None))
        return out

    def flush(self) -> str:
        """The withheld text (once no further piece will come)."""
        tail, self.tail = self.tail, ""
        return tail


# ---------------------------------------------------------------------- inside the kernel
class _PipeState:
    """What a stream's reader thread and the kernel's main thread share."""

    def __init__(self):
        self.lock = threading.Lock()
        self.busy = False                     # the reader holds bytes it took out of the pipe
        self.scanner: Scanner | None = None   # set while a marker is on its way through the pipe
        self.forward = False                  # the reply went without it: forward it to the host
        self.seen = threading.Event()         # the marker came out, and everything before it is written


def _state_of(stream) -> _PipeState:
    return stream.__dict__.setdefault("_sandbox_pipe", _PipeState())   # atomic: either thread first


_CHUNK = 1000   # bytes per read, as ipykernel's PIPE_BUFFER_SIZE


def patch_reader(iostream) -> None:
    """Inside the kernel, before its streams exist: replaces ipykernel's loop that drains the fd
    pipes (``OutStream._watch_pipe_fd``) with :func:`_read_pipe`, same behaviour plus markers."""
    global _CHUNK
    _CHUNK = getattr(iostream, "PIPE_BUFFER_SIZE", _CHUNK)
    iostream.OutStream._watch_pipe_fd = _read_pipe


def _read_pipe(stream) -> None:
    """The reader thread of one captured stream: forwards what the pipe delivers to the stream,
    taking out (or, when the reply went without it, forwarding) the step's marker.

    It waits for data with ``poll`` and marks itself busy before taking bytes out, so that the
    main thread can tell a drained pipe from bytes still in its hands.
    """
    fid = stream._fid
    if fid is None:
        return
    state = _state_of(stream)
    poller = select.poll()
    poller.register(fid, select.POLLIN)
    try:
        while True:
            poller.poll()
            state.busy = True
            data = os.read(fid, _CHUNK)
            if not data or not stream._should_watch:
                break
            echo = _forward(stream, state, data)
            state.busy = False
            os.write(stream._original_stdstream_copy, echo)   # as ipykernel: to the process's stdout
    except Exception:
        stream._exc = sys.exc_info()
    finally:
        state.busy = False


def _forward(stream, state: _PipeState, data: bytes) -> bytes:
    text = data.decode(errors="replace")
    with state.lock:
        scanner = state.scanner
        pieces = scanner.feed(text) if scanner is not None else [(text, None)]
        if any(label for _, label in pieces):
            pieces.append((scanner.flush(), None))
            state.scanner = None
    if scanner is None:
        stream.write(text)
        return data
    for piece, label in pieces:
        if label is None:
            if piece:
                stream.write(piece)
            continue
        with state.lock:  # the main thread's settle() decides under the same lock
            if state.forward:
                type(stream).write(stream, piece)   # past the output cap; the host removes it
            else:
                state.seen.set()
    return "".join(p for p, label in pieces if label is None).encode()


class _StreamSync:
    """The main thread's end of one captured stream (``sys.stdout`` or ``sys.stderr``)."""

    def __init__(self, stream):
        self.stream = stream
        self.name = getattr(stream, "name", "stream")
        self.state = _state_of(stream)
        self.fd: int | None = None
        self.pipe: tuple[int, int] | None = None
        self.reader: threading.Thread | None = None
        fid, reader = getattr(stream, "_fid", None), getattr(stream, "watch_fd_thread", None)
        target = getattr(stream, "_original_stdstream_fd", None)
        if fid is not None and reader is not None and target is not None and stream._should_watch:
            read_end, write_end = os.fstat(fid), os.fstat(target)
            pipe = (read_end.st_dev, read_end.st_ino)
            if stat.S_ISFIFO(read_end.st_mode) and (write_end.st_dev, write_end.st_ino) == pipe:
                self.fd, self.pipe, self.reader = os.dup(target), pipe, reader
        self.ours = type(stream)._watch_pipe_fd is _read_pipe

    def send(self, token: str, deadline: float) -> str:
        """Ends the step for this stream: ``"ok"`` (nothing in flight, or no pipe captured),
        ``"sent"`` (the marker is in the pipe) or ``"failed"``."""
        self._drop_scanner()
        if self.fd is None:
            return "ok"
        if not (self.ours and self._pipe_usable()):
            return "failed"
        if self._unread() == 0 and not self.state.busy:  # in this order: see _read_pipe
            return "ok"   # the reader has passed on everything written so far
        text = marker(token)
        with self.state.lock:
            self.state.seen.clear()
            self.state.forward = False
            self.state.scanner = Scanner({text: "ok"})
        try:
            poll = select.poll()
            poll.register(self.fd, select.POLLOUT)
            if poll.poll(max(0.0, deadline - time.monotonic()) * 1000):
                os.write(self.fd, text.encode())   # < PIPE_BUF: written whole, never interleaved
                return "sent"
        except OSError:
            pass
        self._drop_scanner()
        return "failed"

    def settle(self, deadline: float) -> str:
        """After :meth:`send` returned ``"sent"``: ``"ok"`` once the reader took the marker out,
        ``"pending"`` if it did not by ``deadline`` (it will then forward it)."""
        self.state.seen.wait(max(0.0, deadline - time.monotonic()))
        with self.state.lock:
            if self.state.seen.is_set():
                return "ok"
            self.state.forward = True
            return "pending"

    def _unread(self) -> int:
        try:
            buf = bytearray(4)
            fcntl.ioctl(self.fd, termios.FIONREAD, buf)
            return int.from_bytes(buf, sys.byteorder)
        except OSError:
            return -1

    def _pipe_usable(self) -> bool:
        if not (self.reader.is_alive() and getattr(self.stream, "_should_watch", False)):
            return False  # nothing drains the pipe any more
        if self._is_pipe(self.fd):
            return True
        # a step closed our descriptor (and the number may have been reused): take fd 1 or 2
        # again if it still is the pipe
        if self._is_pipe(self.stream._original_stdstream_fd):
            try:
                self.fd = os.dup(self.stream._original_stdstream_fd)
                return self._is_pipe(self.fd)
            except OSError:
                pass
        return False

    def _is_pipe(self, fd: int) -> bool:
        try:
            st = os.fstat(fd)
        except OSError:
            return False
        return stat.S_ISFIFO(st.st_mode) and (st.st_dev, st.st_ino) == self.pipe

    def _drop_scanner(self) -> None:
        """Forgets an earlier step's marker that never came (it passes as plain text if it still
        comes; the host removes it)."""
        with self.state.lock:
            rest = self.state.scanner.flush() if self.state.scanner is not None else ""
            self.state.scanner = None
        if rest:
            self.stream.write(rest)


def install(kernel, streams: list) -> None:
    """Inside the kernel: every step ends with its markers, and its reply carries the report.

    Args:
        kernel: ipykernel's kernel object (its ``do_execute`` and ``finish_metadata`` are wrapped).
        streams: ``sys.stdout`` and ``sys.stderr`` (ipykernel's streams, after :func:`patch_reader`).
    """
    syncs = [_StreamSync(stream) for stream in streams]
    _syncs[:] = syncs
    run_step, finish_metadata = kernel.do_execute, kernel.finish_metadata
    reports: dict[str, dict[str, str]] = {}

    async def do_execute(*args, **kwargs):
        reports.clear()
        parent = kernel.get_parent("shell") or {}
        token = (parent.get("metadata") or {}).get(META_KEY)
        for s in syncs:  # ipykernel sets the parent of sys.stdout/err only: the step may have replaced them
            if getattr(sys, s.name, None) is not s.stream:
                s.stream.set_parent(parent)
        try:
            return await run_step(*args, **kwargs)
        finally:
            if isinstance(token, str) and _TOKEN.fullmatch(token):
                reports[token] = _end_step(syncs, token)

    def finish(parent, metadata, reply_content):
        metadata = finish_metadata(parent, metadata, reply_content)
        report = reports.pop((parent.get("metadata") or {}).get(META_KEY), None)
        if report is not None:
            metadata[META_KEY] = report
        return metadata

    kernel.do_execute = do_execute
    kernel.finish_metadata = finish


def _end_step(syncs: list[_StreamSync], token: str) -> dict[str, str]:
    deadline = time.monotonic() + KERNEL_WAIT
    report = {s.name: "pending" for s in syncs}
    try:
        for s in syncs:
            report[s.name] = s.send(token, deadline)
        for s in syncs:
            if report[s.name] == "sent":
                report[s.name] = s.settle(deadline)
    except KeyboardInterrupt:  # an interrupt meant for the step came late: the host's wait is bounded
        for s in syncs:
            if report[s.name] == "sent":
                report[s.name] = s.settle(0.0)
    for s in syncs:
        pub = getattr(s.stream, "pub_thread", None)
        if pub is not None and getattr(sys, s.name, None) is not s.stream:
            pub.schedule(s.stream._flush)  # ipykernel flushes only sys.stdout/err before its reply
    return report
