"""Functional tests of the sandbox: persistence, transfers, interrupts, restarts, pool, fallback.

Containment is tested in test_sandbox_hostile.py. These tests run under bubblewrap when it works
and in the opted-in fallback otherwise.
"""

from __future__ import annotations

import ast
import json
import pathlib
import shutil
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import torch

import sandbox
from sandbox import IsolationUnavailable, KernelPool, Limits, Sandbox, SandboxError, isolation

BWRAP = isolation.bwrap_probe()[0]


@pytest.fixture(scope="module")
def sb():
    with Sandbox(allow_unisolated=True, default_timeout=20) as s:
        yield s


def test_state_persists_and_result_fields(sb):
    r = sb.execute("x = 41\nprint('out'); import sys; print('err', file=sys.stderr)")
    assert r.ok and r.stdout == "out\n" and r.stderr == "err\n" and r.duration > 0
    r = sb.execute("x + 1")
    assert r.value == {"text/plain": "42"} and r.stdout == ""
    r = sb.execute("def f():\n    return 1 / 0\nf()")
    assert r.error.name == "ZeroDivisionError" and "division by zero" in r.error.message
    assert any("f()" in line for line in r.error.traceback)
    assert not any("\x1b[" in line for line in r.error.traceback)
    assert not r.state_lost
    r = sb.execute("from IPython.display import display, HTML\ndisplay(HTML('<b>hi</b>'))")
    assert r.display and r.display[0]["text/html"] == "<b>hi</b>"
    assert sb.execute("x").value == {"text/plain": "41"}  # the error did not lose state


def test_default_preamble_imports(sb):
    r = sb.execute("print(np.__name__, torch.__name__, vl is None or vl.__name__)")
    assert r.ok, r.error
    names = r.stdout.split()
    assert names[:2] == ["numpy", "torch"]
    try:
        import voxel_lib  # noqa: F401
        assert names[2] == "voxel_lib"
    except ImportError:
        assert names[2] == "True"


def test_custom_preamble_and_a_failing_line():
    with Sandbox(preamble=["AGENT = 'ready'", "raise RuntimeError('bad line')", "AFTER = 2"],
                 allow_unisolated=True) as s:
        r = s.execute("print(AGENT, AFTER, 'np' in dir())")
        assert r.stdout == "ready 2 False\n", (r.stdout, r.error)


def test_put_get_256_cubed_volume_round_trip(sb):
    vol = np.random.default_rng(1).random((256, 256, 256), dtype=np.float32)
    t0 = time.monotonic()
    sb.put("vol", vol)
    r = sb.execute("print(vol.shape, vol.dtype, float(vol[1, 2, 3]))")
    assert r.stdout == f"(256, 256, 256) float32 {float(vol[1, 2, 3])}\n"
    back = sb.get("vol")
    assert time.monotonic() - t0 < 30
    assert back.dtype == np.float32 and np.array_equal(back, vol)
    # the transfer files are gone from the workspace
    assert sb.execute("import os; print([f for f in os.listdir('.') if 'transfer' in f])").stdout == "[]\n"


def test_put_get_tensor_json_and_computed_values(sb):
    t = torch.arange(12, dtype=torch.int64).reshape(3, 4)
    sb.put("t", t)
    sb.execute("t2 = (t * 2).float()\nstats = {'mean': float(t.float().mean()), 'names': ['a', 'b'], 'n': np.int64(3)}")
    assert torch.equal(sb.get("t2"), (t * 2).float())
    assert sb.get("stats") == {"mean": 5.5, "names": ["a", "b"], "n": 3}
    sb.put("cfg", {"threshold": 0.5, "labels": [1, 2]})
    assert sb.execute("cfg['labels'][1] + 1").value == {"text/plain": "3"}
    sb.put("mask", np.array([[True, False]]))
    assert sb.get("mask").dtype == np.bool_


def test_put_get_volume_through_nifti(sb):
    vl = pytest.importorskip("voxel_lib")
    aff = torch.tensor([[2.0, 0, 0, -10], [0, 2, 0, 5], [0, 0, 3, 1], [0, 0, 0, 1]], dtype=torch.float64)
    img = vl.Volume(torch.rand(1, 20, 21, 22), aff)
    lab = vl.Volume(torch.randint(0, 7, (20, 21, 22)).to(torch.int16), aff, kind="label")
    sb.put("img", img)
    sb.put("lab", lab)
    r = sb.execute("print(type(img).__name__, img.kind, lab.kind, tuple(lab.shape))")
    assert r.stdout == "Volume image label (20, 21, 22)\n", r.error
    for name, v in (("img", img), ("lab", lab)):
        back = sb.get(name)
        assert back.kind == v.kind and back.tensor.dtype == v.tensor.dtype
        assert torch.equal(back.tensor, v.tensor) and torch.allclose(back.affine, v.affine)


def test_transfer_errors(sb):
    with pytest.raises(SandboxError, match="not defined"):
        sb.get("no_such_variable")
    sb.execute("class Thing: pass\nthing = Thing()")
    with pytest.raises(SandboxError, match="cannot transfer"):
        sb.get("thing")
    with pytest.raises(ValueError):
        sb.put("not a name", 1)
    with pytest.raises(ValueError):
        sb.get("import")
    with pytest.raises(TypeError):
        sb.put("obj", object())


def test_timeout_interrupts_and_keeps_state(sb):
    sb.execute("kept = 'yes'")
    t0 = time.monotonic()
    r = sb.execute("import time\nwhile True: time.sleep(0.01)", timeout=0.5)
    assert r.error.name == "TimeoutError" and "interrupted" in r.error.message
    assert not r.state_lost and time.monotonic() - t0 < 5
    assert sb.execute("kept").value == {"text/plain": "'yes'"}


def test_interrupt_from_another_thread(sb):
    sb.execute("kept2 = 2")
    results = []
    th = threading.Thread(target=lambda: results.append(sb.execute("import time; time.sleep(30)")))
    th.start()
    time.sleep(0.5)
    sb.interrupt()
    th.join(timeout=10)
    assert results and results[0].error.name == "KeyboardInterrupt"
    assert sb.execute("kept2").value == {"text/plain": "2"}


def test_timeout_restarts_a_kernel_that_ignores_the_interrupt():
    with Sandbox(preamble=(), allow_unisolated=True, interrupt_grace=1.0) as s:
        s.execute("lost = 1")
        t0 = time.monotonic()
        r = s.execute("import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True: pass", timeout=0.5)
        assert r.error.name == "TimeoutError" and "restarted" in r.error.message and r.state_lost
        assert time.monotonic() - t0 < 6
        r = s.execute("print('lost' in dir())")
        assert r.stdout == "False\n", r.error


def test_crash_is_reported_and_next_call_gets_a_fresh_kernel():
    with Sandbox(preamble=(), allow_unisolated=True) as s:
        s.execute("before = 1")
        old = s._holder[0]
        r = s.execute("import ctypes; ctypes.string_at(0)")
        assert r.error.name == "KernelDied" and "SIGSEGV" in r.error.message and r.state_lost
        assert not old.alive()
        r = s.execute("print('before' in dir(), 6 * 7)")
        assert r.stdout == "False 42\n"
        assert s._holder[0] is not old


def test_killed_kernel_like_an_oom_kill_is_reported():
    with Sandbox(preamble=(), allow_unisolated=True) as s:
        r = s.execute("import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
        assert r.error.name == "KernelDied" and "SIGKILL" in r.error.message and r.state_lost
        assert s.execute("1 + 1").value == {"text/plain": "2"}


def test_cpu_budget_ends_a_runaway_kernel():
    with Sandbox(preamble=(), allow_unisolated=True, limits=Limits(cpu_seconds=2)) as s:
        t0 = time.monotonic()
        r = s.execute("while True:\n    pass", timeout=60)
        assert r.error.name == "KernelDied" and r.state_lost, r.error
        assert time.monotonic() - t0 < 20
        assert s.execute("print('fresh')").stdout == "fresh\n"


def test_restart_and_close(sb):
    with Sandbox(preamble=(), allow_unisolated=True) as s:
        s.execute("y = 1")
        first = s._holder[0]
        s.restart()
        assert not first.alive()
        assert s.execute("y").error.name == "NameError"
        proc = s._holder[0].proc
    assert proc.poll() is not None  # closed by the context manager
    with pytest.raises(SandboxError, match="closed"):
        s.execute("1")
    s.close()  # idempotent


def test_sandboxes_do_not_block_each_other(sb):
    with Sandbox(preamble=(), allow_unisolated=True) as other:
        busy = threading.Thread(target=lambda: other.execute("import time; time.sleep(3)"))
        busy.start()
        time.sleep(0.3)
        t0 = time.monotonic()
        for _ in range(5):
            assert sb.execute("1").ok
        assert time.monotonic() - t0 < 1.5
        busy.join()


def test_pool_hands_out_fresh_prestarted_kernels():
    with KernelPool(size=1, preamble=(), allow_unisolated=True) as pool:
        deadline = time.monotonic() + 60
        while pool.ready() < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        t0 = time.monotonic()
        a = pool.sandbox()
        assert time.monotonic() - t0 < 0.5
        b = pool.sandbox()
        try:
            a.execute("secret = 1")
            assert b.execute("secret").error.name == "NameError"
            r = a.execute("import ctypes; ctypes.string_at(0)")
            assert r.state_lost
            assert a.execute("2 + 2").value == {"text/plain": "4"}  # replacement from the pool
        finally:
            a.close()
            b.close()


def test_kernel_dies_with_its_host():
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(pathlib.Path(sandbox.__file__).parent.parent)!r})
        from sandbox import Sandbox
        sb = Sandbox(preamble=(), allow_unisolated=True)
        k = sb._holder[0]
        print(k._host_run, k.pid, k.proc.pid, flush=True)
        time.sleep(120)
    """)
    host = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    host_run, *pids = host.stdout.readline().split()
    pids = [int(p) for p in pids]
    try:
        assert pids and all(_running(p) for p in pids)
        host.kill()
        host.wait()
        deadline = time.monotonic() + 10
        while any(_running(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_running(p) for p in pids)
    finally:
        host.kill()
        shutil.rmtree(host_run, ignore_errors=True)  # a killed host cannot clean up after itself


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_fallback_refuses_unless_opted_in(monkeypatch):
    monkeypatch.delenv(sandbox.ALLOW_UNISOLATED_ENV, raising=False)
    with pytest.raises(IsolationUnavailable, match="allow_unisolated"):
        Sandbox(isolation="none")
    monkeypatch.setattr(isolation, "bwrap_probe", lambda: (False, "bwrap is missing (test)"))
    with pytest.raises(IsolationUnavailable, match="bwrap is missing"):
        Sandbox()
    with pytest.raises(IsolationUnavailable):
        Sandbox(isolation="bwrap", allow_unisolated=True)
    monkeypatch.setenv(sandbox.ALLOW_UNISOLATED_ENV, "1")
    monkeypatch.setenv("SECRET_FOR_FALLBACK", "do-not-leak")
    with pytest.warns(RuntimeWarning, match="UNISOLATED"):
        s = Sandbox(preamble=())
    with s:
        assert s.isolation()["mode"] == "none"
        r = s.execute("import os; print(os.getcwd() != '/workspace', 'SECRET_FOR_FALLBACK' in os.environ)")
        assert r.stdout == "True False\n"
        s.put("a", np.arange(4))
        assert s.get("a").tolist() == [0, 1, 2, 3]


@pytest.mark.skipif(not BWRAP, reason="bubblewrap unavailable")
def test_isolation_report_and_limits(sb):
    info = sb.isolation()
    assert info["mode"] == "bwrap"
    assert info["seccomp"] == sandbox.seccomp.available()
    assert info["limits"]["memory_bytes"] == Limits().memory_bytes
    r = sb.execute("import resource; print(resource.getrlimit(resource.RLIMIT_AS)[1], "
                   "resource.getrlimit(resource.RLIMIT_NPROC)[1], "
                   "open('/proc/self/status').read().count('Seccomp:\\t2'))")
    assert r.stdout.split()[:2] == [str(Limits().memory_bytes), str(Limits().processes)]
    if info["seccomp"]:
        assert r.stdout.split()[2] == "1"


def test_package_depends_on_nothing_of_ours():
    forbidden = {"voxelprompt", "synth", "task_templates"}
    for path in pathlib.Path(sandbox.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            assert not {n.split(".")[0] for n in names} & forbidden, (path, names)


def test_bench_runs_and_writes_json(tmp_path, capsys):
    from sandbox import bench
    out = tmp_path / "bench.json"
    assert bench.main(["--steps", "10", "--starts", "1", "--size", "32", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "trivial step, sandbox" in table and "MB/s" in table
    data = json.loads(out.read_text())
    assert data["latency"]["sandbox_median_s"] > 0 and data["transfer"]["put_MBps"] > 0


# ---------------------------------------------------------------- output below Python (fdsync)
FD_LIMITS = Limits(output_chars=20_000)


@pytest.fixture(scope="module")
def fdsb():
    with Sandbox(preamble=["import os, sys, time, ctypes, threading", "import sandbox.fdsync as F"],
                 limits=FD_LIMITS, allow_unisolated=True, default_timeout=20, interrupt_grace=1.5) as s:
        yield s


def _clean(r) -> bool:
    """No end-of-step marker (or a piece of one) reached the result."""
    text = r.stdout + r.stderr + str(r.error)
    return "\x02" not in text and "sandbox-sync" not in text


def test_fd_level_output_belongs_to_its_step(fdsb):
    # sizes below, at and far above a pipe's buffer (64 KiB): the reader thread lags behind the
    # big ones, so without the markers their tail would come after the step's reply
    for k, size in enumerate([1, 999, 1000, 4096, 70_000, 0, 3, 150_000, 17]):
        body = f"{k}:" + "y" * size
        err = f"e{k}" * (size // 8 + 1)
        r = fdsb.execute(f"os.write(1, {body!r}.encode() + b'\\n'); os.write(2, {err!r}.encode())")
        out, cut = body + "\n", len(body) + 1 > FD_LIMITS.output_chars
        assert r.ok and r.output_synced and _clean(r), (k, r.error, r.stderr[-300:])
        if cut:
            assert r.truncated and r.stdout.startswith(out[:1000]) and "output truncated" in r.stdout
        else:
            assert r.stdout == out, (k, r.stdout[:80], len(r.stdout), len(out))
        assert r.stderr == err or (len(err) > FD_LIMITS.output_chars and r.stderr.startswith(err[:100]))


def test_fd_output_of_c_code_and_python_output_together(fdsb):
    r = fdsb.execute("libc = ctypes.CDLL(None)\n"
                     "libc.printf(b'from C %d\\n', 42); libc.fflush(None)\n"
                     "print('from Python')\n"
                     "os.write(1, b'from os.write\\n')")
    assert r.ok and r.output_synced and _clean(r), r.error
    # Python's stream and the fd pipe are not ordered with each other (a pipe's chunk may even
    # come between print's text and its newline), but each small fd write arrives whole
    assert "from C 42\n" in r.stdout and "from os.write\n" in r.stdout, r.stdout
    rest = r.stdout.replace("from C 42\n", "").replace("from os.write\n", "")
    assert rest == "from Python\n", r.stdout
    assert fdsb.execute("print(6 * 7)").stdout == "42\n"


def test_fd_output_when_the_step_raises(fdsb):
    r = fdsb.execute("os.write(1, b'x' * 100_000 + b'\\nbefore\\n'); os.write(2, b'err\\n'); 1 / 0")
    assert r.error.name == "ZeroDivisionError" and r.output_synced and r.truncated and _clean(r)
    assert r.stderr == "err\n"
    r = fdsb.execute("1 +")  # a syntax error never runs the code; the step still ends cleanly
    assert r.error.name == "SyntaxError" and r.output_synced and r.stdout == ""
    assert fdsb.execute("print(6 * 7)").stdout == "42\n"


def test_fd_output_of_an_interrupted_step(fdsb):
    r = fdsb.execute("while True:\n    os.write(1, b'z' * 500)\n    time.sleep(0.0005)", timeout=0.5)
    assert r.error.name == "TimeoutError" and "interrupted" in r.error.message and not r.state_lost
    assert r.output_synced and set(r.stdout.split("\n[sandbox")[0]) <= {"z"} and _clean(r)
    after = fdsb.execute("print(6 * 7)")
    assert after.stdout == "42\n" and after.stderr == "", (after.stdout[:100], after.stderr[:100])


def test_closing_or_redirecting_fd1_does_not_hang():
    with Sandbox(preamble=("import os",), allow_unisolated=True, default_timeout=20) as s:
        t0 = time.monotonic()
        r = s.execute("os.write(1, b'a' * 80_000 + b'\\n'); os.close(1)\n"
                      "try:\n    os.write(1, b'lost')\nexcept OSError as e:\n    print('closed', e.errno)")
        assert r.ok and r.output_synced and _clean(r), r.error
        assert sorted(r.stdout) == sorted("a" * 80_000 + "\n" + "closed 9\n")  # interleaved: any order
        r = s.execute("print('py')\nos.write(2, b'e\\n')")
        assert r.stdout == "py\n" and r.stderr == "e\n" and r.output_synced
        # the file may get fd 1 itself (it is free now)
        r = s.execute("fd = os.open('fd1.txt', os.O_WRONLY | os.O_CREAT, 0o600)\n"
                      "if fd != 1:\n    os.dup2(fd, 1)\n"
                      "os.write(1, b'to the file\\n'); os.write(2, b'still captured\\n')")
        assert r.ok and r.output_synced and r.stdout == "" and r.stderr == "still captured\n", r.error
        r = s.execute("print(open('fd1.txt').read(), end='')\nos.write(2, b'e\\n')")
        assert r.stdout == "to the file\n" and r.stderr == "e\n" and r.output_synced
        # the sandbox's own descriptor of the pipe, closed by the step: taken again from fd 2
        r = s.execute("import sandbox.fdsync as F\nos.close(F._syncs[1].fd); os.write(2, b'x\\n')")
        assert r.ok and r.output_synced and r.stderr == "x\n", r.error
        assert time.monotonic() - t0 < 10


def test_fd_output_that_cannot_be_synced_is_reported_without_a_long_wait():
    # the step stops the reader thread of fd 1: nothing drains the pipe any more
    with Sandbox(preamble=("import os, sys",), allow_unisolated=True) as s:
        t0 = time.monotonic()
        r = s.execute("sys.stdout._should_watch = False; os.write(1, b'q\\n'); print('py')")
        assert r.ok and not r.output_synced and "fd 1" in r.stderr and "may be incomplete" in r.stderr
        assert "py\n" in r.stdout and _clean(r)
        assert time.monotonic() - t0 < 1.5  # the kernel says so at once: no wait for a marker
        r = s.execute("os.write(2, b'e\\n')")
        assert r.stderr.startswith("e\n") and not r.output_synced  # fd 2 still works


def test_lagging_reader_thread_is_waited_for_then_given_up(monkeypatch):
    from sandbox import fdsync
    monkeypatch.setattr(fdsync, "HOST_WAIT", 1.5)
    with Sandbox(preamble=("import os, sys, time, threading, contextlib", "import sandbox.fdsync as F"),
                 allow_unisolated=True) as s:
        # the reader thread of fd 1 stalls DELAY seconds on every chunk (as on a loaded machine or
        # behind a thread that holds the GIL). IPython's per-cell wrapping of write() is turned off
        # so that the slow write() stays in place. Before the markers, all this output was lost.
        s.execute("get_ipython()._tee = lambda channel: contextlib.nullcontext()\nF.KERNEL_WAIT = 0.6")
        r = s.execute("DELAY = 0.2\n_w = sys.stdout.write\n"
                      "def slow(t):\n"
                      "    if threading.current_thread() is sys.stdout.watch_fd_thread:\n"
                      "        time.sleep(DELAY)\n"
                      "    return _w(t)\n"
                      "sys.stdout.write = slow")
        assert r.ok, r.error
        for k in range(3):  # within the kernel's wait: the marker is taken out there
            r = s.execute(f"os.write(1, b'{k}\\n')")
            assert r.stdout == f"{k}\n" and r.output_synced and r.duration > 0.15, (k, r.stdout, r.stderr)
        # longer than the kernel waits: the kernel forwards the marker, the host waits for it
        r = s.execute("DELAY = 1.0; os.write(1, b'late\\n')")
        assert r.stdout == "late\n" and r.output_synced and _clean(r), (r.stdout, r.stderr)
        # longer than both wait: reported; its output comes with the next step (the behaviour
        # before the markers), and its late marker is removed there
        t0 = time.monotonic()
        r = s.execute("DELAY = 3.0; os.write(1, b'too late\\n')")
        assert not r.output_synced and "may be incomplete" in r.stderr and r.stdout == "", r.stdout
        assert time.monotonic() - t0 < 2.9
        r = s.execute("time.sleep(1.5); DELAY = 0; print('next')")
        assert r.stdout == "too late\nnext\n" and r.output_synced and _clean(r), (r.stdout, r.stderr)
        assert s.execute("os.write(1, b'x\\n')").stdout == "x\n"


def test_forged_markers_are_harmless(fdsb):
    # the step knows its own token (it is in the request); printing the marker only cuts it out
    token = "get_ipython().kernel.get_parent('shell')['metadata'][F.META_KEY]"
    r = fdsb.execute(f"print('a' + F.marker({token}) + 'b', end='')")
    assert r.ok and r.output_synced and r.stdout == "ab", (r.error, r.stdout)
    r = fdsb.execute(f"os.write(1, F.marker({token}).encode() + b'c')")
    assert r.ok and r.output_synced and r.stdout == "c", (r.error, r.stdout)
    r = fdsb.execute("print(F.marker('0' * 32) + '|' + F.LEAD + 'x', end='')")  # not this step's
    from sandbox import fdsync
    assert r.ok and r.output_synced and r.stdout == fdsync.marker("0" * 32) + "|\x02x"
    assert fdsb.execute("print(6 * 7)").stdout == "42\n"


def test_fd_output_after_a_restart():
    with Sandbox(preamble=(), allow_unisolated=True) as s:
        s.execute("import os; os.write(1, b'first\\n')")
        s.restart()
        r = s.execute("import os; os.write(1, b'x' * 100_000 + b'\\n'); os.write(2, b'e\\n')")
        assert r.ok and r.output_synced and r.stdout == "x" * 100_000 + "\n" and r.stderr == "e\n"


def test_marker_scanner_handles_split_and_partial_markers():
    from sandbox import fdsync
    tok = fdsync.new_token()
    assert len(tok) == 32 and tok != fdsync.new_token()
    m = fdsync.marker(tok)
    text = "ab\x02c" + m + "de\x02"
    for cut in range(len(text) + 1):  # the marker split anywhere between two pieces
        sc = fdsync.Scanner({m: "ok"})
        segments = sc.feed(text[:cut]) + sc.feed(text[cut:])
        rest = sc.flush()
        assert "".join(t for t, label in segments if label is None) + rest == "ab\x02cde\x02", cut
        assert [label for _, label in segments if label] == ["ok"], cut
    sc = fdsync.Scanner({m: "ok"})
    assert sc.feed(m[:-1]) == [] and sc.flush() == m[:-1]  # a marker cut short is plain text
    assert sc.feed("plain") == [("plain", None)]
    assert [label for _, label in sc.feed(m + m)] == ["ok", "ok"]
