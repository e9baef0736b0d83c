"""``voxelprompt bench sandbox``: step latency beside raw jupyter_client, start time, transfer speed.

Measures, in one run on this machine:

* round-trip latency of a trivial step (median, p95) through :class:`Sandbox` and through plain
  jupyter_client on an unisolated kernel (``start_new_kernel``), alternating in blocks so all see
  the same load. Raw is timed two ways, ``execute_interactive`` and a minimal blocking loop
  (``execute``, shell reply, iopub until idle); the faster is the baseline. Target: ratio <= 1.2;
* kernel start time (default preamble and empty preamble), raw kernel start, and taking a
  sandbox from a warm :class:`KernelPool`;
* ``put``/``get`` throughput of a float32 volume (256³ = 64 MiB by default), in MB/s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np
from jupyter_client.manager import start_new_kernel

from . import isolation
from .pool import KernelPool
from .result import IsolationUnavailable
from .session import Sandbox

TARGET_RATIO = 1.2


def main(argv: list[str]) -> int:
    """Runs the benchmark and prints a table.

    Returns 0; 1 with ``--check`` when the latency target is missed; 2 when no sandbox can start.
    """
    p = argparse.ArgumentParser(prog="voxelprompt bench sandbox", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300, help="trivial steps timed per side (default 300)")
    p.add_argument("--starts", type=int, default=2, help="kernel starts timed per kind (default 2)")
    p.add_argument("--size", type=int, default=256, help="side of the cubic float32 volume (default 256)")
    p.add_argument("--json", metavar="PATH", help="also write the numbers as JSON to PATH")
    p.add_argument("--check", action="store_true", help=f"exit 1 if latency exceeds {TARGET_RATIO}x raw")
    args = p.parse_args(argv)
    try:
        res = run(steps=args.steps, starts=args.starts, size=args.size)
    except IsolationUnavailable as exc:
        print(f"voxelprompt bench sandbox: {exc}", file=sys.stderr)
        return 2
    print(format_table(res))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=2)
    return 1 if args.check and res["latency"]["ratio_median"] > TARGET_RATIO else 0


def run(steps: int = 300, starts: int = 2, size: int = 256) -> dict:
    """Takes all measurements; returns them as a dict (seconds, MB/s)."""
    out: dict = {"machine": _machine(), "start": _start_times(starts)}
    sb = Sandbox(preamble=())
    try:
        out["latency"] = _latency(sb, steps)
        out["transfer"] = _transfer(sb, size)
    finally:
        sb.close()
    return out


def _start_times(starts: int) -> dict:
    default, empty, raw = [], [], []
    for _ in range(starts):
        t0 = time.perf_counter()
        Sandbox().close()
        default.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        Sandbox(preamble=()).close()
        empty.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        km, kc = _raw_kernel()
        raw.append(time.perf_counter() - t0)
        _stop_raw(km, kc)
    with KernelPool(size=1, preamble=()) as pool:
        while pool.ready() < 1:
            time.sleep(0.05)
        t0 = time.perf_counter()
        sb = pool.sandbox()
        from_pool = time.perf_counter() - t0
        sb.close()
    return {"sandbox_default_preamble_s": statistics.median(default),
            "sandbox_empty_preamble_s": statistics.median(empty),
            "raw_jupyter_s": statistics.median(raw), "from_warm_pool_s": from_pool}


def _latency(sb: Sandbox, steps: int) -> dict:
    """Alternates blocks of trivial steps on the sandbox and on a raw kernel, so all see the same load."""
    km, kc = _raw_kernel()
    try:
        sides = {"sandbox": lambda: _check(sb.execute("pass").ok),
                 "raw_interactive": lambda: _raw_interactive(kc),
                 "raw_minimal": lambda: _raw_minimal(kc)}
        times: dict[str, list[float]] = {k: [] for k in sides}
        for step in sides.values():  # warm-up
            for _ in range(20):
                step()
        block = 25
        for i in range(0, steps, block):
            for name, step in sides.items():
                for _ in range(min(block, steps - i)):
                    t0 = time.perf_counter()
                    step()
                    times[name].append(time.perf_counter() - t0)
    finally:
        _stop_raw(km, kc)
    med = {k: statistics.median(v) for k, v in times.items()}
    p95 = {k: _p95(v) for k, v in times.items()}
    raw = min(("raw_interactive", "raw_minimal"), key=med.get)
    out = {"steps": steps, "baseline": raw, "target_ratio": TARGET_RATIO,
           "ratio_median": med["sandbox"] / med[raw], "ratio_p95": p95["sandbox"] / p95[raw]}
    for side in sides:
        out[f"{side}_median_s"], out[f"{side}_p95_s"] = med[side], p95[side]
    return out


def _transfer(sb: Sandbox, size: int) -> dict:
    vol = np.random.default_rng(0).random((size, size, size), dtype=np.float32)
    puts, gets = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        sb.put("vol", vol)
        puts.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        back = sb.get("vol")
        gets.append(time.perf_counter() - t0)
    _check(np.array_equal(back, vol))
    mb = vol.nbytes / 1e6
    put_s, get_s = statistics.median(puts), statistics.median(gets)
    return {"megabytes": mb, "put_MBps": mb / put_s, "get_MBps": mb / get_s, "put_s": put_s, "get_s": get_s}


def format_table(res: dict) -> str:
    """The human-readable report."""
    lat, st, tr = res["latency"], res["start"], res["transfer"]

    def step(side: str) -> tuple[str, str]:
        return f"median {lat[side + '_median_s'] * 1e3:.2f} ms", f"p95 {lat[side + '_p95_s'] * 1e3:.2f} ms"

    verdict = "met" if lat["ratio_median"] <= lat["target_ratio"] else "MISSED"
    mb = f"{tr['megabytes']:.0f} MB float32 volume"
    rows = [
        ("trivial step, sandbox", *step("sandbox")),
        ("trivial step, raw execute_interactive", *step("raw_interactive")),
        ("trivial step, raw minimal loop", *step("raw_minimal")),
        ("ratio sandbox / fastest raw", f"median {lat['ratio_median']:.2f}x",
         f"p95 {lat['ratio_p95']:.2f}x  (target <= {lat['target_ratio']}x: {verdict})"),
        ("kernel start, default preamble", f"{st['sandbox_default_preamble_s']:.2f} s", "numpy, torch, voxel_lib"),
        ("kernel start, empty preamble", f"{st['sandbox_empty_preamble_s']:.2f} s", ""),
        ("kernel start, raw jupyter_client", f"{st['raw_jupyter_s']:.2f} s", "no isolation"),
        ("sandbox from a warm pool", f"{st['from_warm_pool_s'] * 1e3:.1f} ms", ""),
        (f"put {mb}", f"{tr['put_MBps']:.0f} MB/s", f"{tr['put_s']:.3f} s"),
        (f"get {mb}", f"{tr['get_MBps']:.0f} MB/s", f"{tr['get_s']:.3f} s"),
    ]
    w = max(len(r[0]) for r in rows)
    lines = [f"sandbox benchmark ({res['machine']}, {lat['steps']} steps per side)"]
    lines += [f"  {a:<{w}}  {b:<16} {c}".rstrip() for a, b, c in rows]
    return "\n".join(lines)


def _raw_kernel():
    """A plain kernel through jupyter_client's own API (TCP, no isolation).

    Its input history is off, as in the sandbox: IPython's default SQLite history commits every
    cell, which would make the baseline slower for reasons unrelated to isolation.
    """
    return start_new_kernel(startup_timeout=60, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            extra_arguments=["--HistoryManager.enabled=False"])


def _stop_raw(km, kc) -> None:
    kc.stop_channels()
    km.shutdown_kernel(now=True)


def _raw_interactive(kc) -> None:
    _check(kc.execute_interactive("pass", timeout=30)["content"]["status"] == "ok")


def _check(ok: bool) -> None:
    if not ok:
        raise RuntimeError("a benchmark step failed")


def _raw_minimal(kc) -> None:
    """The leanest blocking jupyter_client round trip: reply on shell, then iopub until idle."""
    msg_id = kc.execute("pass")
    reply = kc.get_shell_msg(timeout=30)
    _check(reply["parent_header"]["msg_id"] == msg_id and reply["content"]["status"] == "ok")
    while True:
        msg = kc.get_iopub_msg(timeout=30)
        if (msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "status"
                and msg["content"]["execution_state"] == "idle"):
            return


def _p95(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=20)[-1] if len(xs) >= 2 else xs[0]


def _machine() -> str:
    mode = "bubblewrap" if isolation.bwrap_probe()[0] else "no bubblewrap"
    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
            f"Python {platform.python_version()}, {mode}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
