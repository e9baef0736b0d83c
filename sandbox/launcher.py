"""The sandboxed process: tightens its own limits, then becomes the Jupyter kernel in-process.

Run as ``python -m sandbox.launcher LAUNCH_JSON`` (inside bubblewrap, or directly in the fallback
mode). In order, before any code of the model can run:

1. sets the resource limits (soft = hard, so they cannot be raised again);
2. drops to the sandbox's own user id when started as root;
3. re-arms the parent-death signal (a change of user clears it; under bubblewrap the real guard is
   bwrap's own pid-1 init, whose death ends the whole pid namespace);
4. installs the seccomp filter (no exec, no new processes, Unix sockets only);
5. starts ipykernel in this very process, so no exec is needed after the filter.

The launch file is written by the host and holds the connection details, the limits, the
preamble and the output cap.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import sys

_PR_SET_PDEATHSIG = 1
_RLIMITS = {
    "memory_bytes": "RLIMIT_AS",
    "cpu_seconds": "RLIMIT_CPU",
    "file_size_bytes": "RLIMIT_FSIZE",
    "processes": "RLIMIT_NPROC",
    "open_files": "RLIMIT_NOFILE",
    "core_bytes": "RLIMIT_CORE",
}


def set_parent_death_signal() -> None:
    """Asks Linux to kill this process when its parent dies (no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def apply_rlimits(limits: dict[str, int]) -> None:
    """Sets each limit as both soft and hard value; unsupported ones are skipped (macOS)."""
    for key, value in limits.items():
        res = getattr(resource, _RLIMITS[key], None)
        if res is None or value is None:
            continue
        try:
            resource.setrlimit(res, (value, value))
        except (ValueError, OSError) as exc:
            print(f"sandbox launcher: cannot set {_RLIMITS[key]}={value}: {exc}", file=sys.stderr)


def drop_user(uid: int, gid: int) -> None:
    """Switches to ``uid``/``gid`` for good; all capabilities go with the old user."""
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getuid() != uid or os.geteuid() != uid:
        raise OSError("could not drop the root user")


def install_seccomp(mode: str) -> bool:
    """Installs the syscall filter; ``mode`` is 'require', 'auto' or 'off'. Returns whether it is on."""
    if mode == "off" or not sys.platform.startswith("linux"):
        if mode == "require":
            raise OSError("seccomp is only available on Linux")
        return False
    from . import seccomp

    try:
        seccomp.install()
    except OSError as exc:
        if mode == "require":
            raise
        print(f"sandbox launcher: seccomp filter not installed: {exc}", file=sys.stderr)
        return False
    return True


def start_kernel(cfg: dict) -> None:
    """Configures and runs ipykernel in this process (never returns until the kernel stops)."""
    from ipykernel import iostream
    from ipykernel.kernelapp import IPKernelApp
    from traitlets.config import Config

    from . import fdsync, kernel_side

    # ipykernel listens on a TCP loopback port for output of forked subprocesses. The filter
    # forbids both TCP sockets and subprocesses, and libzmq aborts on a refused socket(), so skip it.
    def _no_subprocess_pipe(self):
        self._pipe_flag = False

    iostream.IOPubThread._setup_pipe_in = _no_subprocess_pipe
    # the reader threads of the fd 1/2 pipes also take out the end-of-step markers (fdsync)
    fdsync.patch_reader(iostream)

    conn = cfg["connection"]
    c = Config()
    c.IPKernelApp.connection_file = cfg["connection_file"]
    c.IPKernelApp.transport = conn["transport"]
    c.IPKernelApp.ip = conn["ip"]
    for port in ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port"):
        setattr(c.IPKernelApp, port, conn[port])
    c.Session.key = conn["key"].encode()
    c.Session.signature_scheme = conn["signature_scheme"]
    c.IPKernelApp.exec_lines = list(cfg["preamble"])
    c.IPKernelApp.quiet = True
    c.InteractiveShell.colors = "nocolor"
    c.InteractiveShell.cache_size = 0
    c.HistoryManager.enabled = False
    app = IPKernelApp.instance(config=c)
    app.initialize([])
    kernel_side.install(app.shell, cfg["output_chars"], cfg["workspace"])
    app.start()


def main(argv: list[str]) -> None:
    """Entry point: ``argv[1]`` is the launch file."""
    with open(argv[1], encoding="utf-8") as f:
        cfg = json.load(f)
    set_parent_death_signal()
    apply_rlimits(cfg["rlimits"])
    if cfg.get("uid") is not None:
        drop_user(cfg["uid"], cfg["gid"])
        set_parent_death_signal()
    if cfg.get("parent_pid") and os.getppid() != cfg["parent_pid"]:
        sys.exit("sandbox launcher: the host died before the kernel started")
    install_seccomp(cfg["seccomp"])
    os.chdir(cfg["workspace"])
    start_kernel(cfg)


if __name__ == "__main__":
    main(sys.argv)
