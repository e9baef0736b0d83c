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
