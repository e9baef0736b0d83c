"""How a kernel process is contained: the bubblewrap command line, and the weaker fallback.

bubblewrap mode (Linux): the kernel sees a read-only system (``/usr``, the Python installation, the
repository), a private writable ``/workspace`` and ``/tmp`` (size-capped tmpfs), its own ``/proc``
and ``/dev``, no network, no other process and none of the host's environment. Started as root, the
kernel drops to a user id of its own. It dies with its parent.

Fallback (no bubblewrap, e.g. macOS): the kernel is a plain child process with a clean environment,
rlimits and (on Linux) the seccomp filter; it can read and write whatever the host user can. It
only starts when the user opts in.
"""

from __future__ import annotations

import functools
import os
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .config import ALLOW_UNISOLATED_ENV, MiB, SandboxConfig
from .result import IsolationUnavailable

#: Where things are inside the bubblewrap sandbox.
WORKSPACE = "/workspace"
KERNEL_RUN = "/run/kernel"      # tmpfs: the kernel's sockets and its own connection file
HOST_RUN = "/run/sandbox"       # read-only: the launch file written by the host
#: The repository root (holds this package); bound read-only so the kernel imports our code.
REPO_ROOT = str(Path(__file__).resolve().parent.parent)
_SYSTEM_DIRS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_ETC_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime",
              "/etc/mime.types")

FALLBACK_WARNING = (
    "sandbox: running the kernel UNISOLATED (no bubblewrap). The generated code can "
    "read and write every file this user can, reach the network (unless the seccomp filter is "
    "active), see other processes, and fill the disk. Only rlimits, a clean environment and, on "
    "Linux, the seccomp filter apply. See docs/sandbox.md.")


@dataclass
class LaunchPlan:
    """A ready-to-run command for one kernel.

    Attributes:
        argv: the command.
        env: its environment (complete: the host's is never inherited).
        cwd: working directory on the host side.
        mode: ``"bwrap"`` or ``"none"``.
        kernel_run: the kernel's socket folder, as the host reaches it (``{pid}`` is filled in
            with the sandbox's first process id, reported by bwrap's ``--info-fd``).
        workspace: the workspace, as the host reaches it (``{pid}`` as above).
    """

    argv: list[str]
    env: dict[str, str]
    cwd: str
    mode: str
    kernel_run: str
    workspace: str


def bwrap_executable() -> str | None:
    """Path of the bubblewrap binary, if installed."""
    return shutil.which("bwrap")


@functools.lru_cache(maxsize=1)
def bwrap_probe() -> tuple[bool, str]:
    """Whether bubblewrap can build this module's sandbox here; with bwrap's error if not."""
    exe = bwrap_executable()
    if not sys.platform.startswith("linux"):
        return False, f"bubblewrap needs Linux (this is {sys.platform})"
    if exe is None:
        return False, "bubblewrap (bwrap) is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
    argv = [exe, *_namespace_args(), "--ro-bind", "/usr", "/usr", *_system_links(),
            "--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--size", "1048576", "--tmpfs", "/tmp",
            "--remount-ro", "/", "--", "true"]
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"bubblewrap failed to run: {exc}"
    if r.returncode != 0:
        return False, f"bubblewrap cannot create namespaces here: {r.stderr.strip()[-500:]}"
    return True, ""


def choose_mode(config: SandboxConfig) -> str:
    """Returns ``"bwrap"`` or ``"none"`` for this config, or raises :class:`IsolationUnavailable`."""
    if config.isolation in ("auto", "bwrap"):
        ok, why = bwrap_probe()
        if ok:
            return "bwrap"
        if config.isolation == "bwrap":
            raise IsolationUnavailable(why)
    else:
        why = "isolation='none' was requested"
    if not config.unisolated_allowed:
        raise IsolationUnavailable(
            f"{why}. Refusing to run generated code without isolation. To accept the weaker "
            f"fallback (no filesystem, network or process isolation), pass "
            f"allow_unisolated=True or set {ALLOW_UNISOLATED_ENV}=1. See docs/sandbox.md.")
    return "none"


def kernel_uid() -> tuple[int, int] | None:
    """A fresh user/group id for a bubblewrapped kernel started by root; ``None`` if not root.

    Each kernel gets its own id so that ``RLIMIT_NPROC`` counts its threads alone.
    """
    if os.geteuid() != 0:
        return None
    uid = 1_000_000 + secrets.randbelow(1_000_000_000)
    return uid, uid


def kernel_env(config: SandboxConfig, home: str, tmp: str) -> dict[str, str]:
    """The kernel's whole environment: nothing comes from the host's."""
    n = str(config.limits.threads)
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": tmp, "LANG": "C.UTF-8",
        "PYTHONNOUSERSITE": "1", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": REPO_ROOT,
        "MPLCONFIGDIR": f"{tmp}/matplotlib", "IPYTHONDIR": f"{tmp}/ipython",
        "JUPYTER_CONFIG_DIR": f"{tmp}/jupyter", "JUPYTER_DATA_DIR": f"{tmp}/jupyter",
        "JUPYTER_RUNTIME_DIR": f"{tmp}/jupyter", "JUPYTER_PLATFORM_DIRS": "1",
        "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n,
    }
    env.update(dict(config.env))
    return env


def plan_bwrap(config: SandboxConfig, host_run: str, launch_file: str, info_fd: int,
               uid: tuple[int, int] | None) -> LaunchPlan:
    """The bubblewrap command that runs the launcher with ``launch_file`` (a file in ``host_run``)."""
    lim = config.limits
    python = config.python or sys.executable
    a = [bwrap_executable(), *_namespace_args(), "--hostname", "sandbox"]
    if uid is not None:
        a += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    # the kernel's own mounts first, so that host folders under /tmp (a venv, a checkout) can be
    # bound on top of its private /tmp rather than hidden by it
    a += ["--dev", "/dev", "--remount-ro", "/dev", "--proc", "/proc",
          "--perms", "1777", "--size", str(lim.tmp_bytes), "--tmpfs", "/tmp",
          "--perms", "0777" if uid else "0755", "--size", str(lim.workspace_bytes), "--tmpfs", WORKSPACE,
          "--perms", "0755", "--dir", "/run",
          "--perms", "0777" if uid else "0755", "--size", str(MiB), "--tmpfs", KERNEL_RUN,
          "--ro-bind", host_run, HOST_RUN]
    a += ["--ro-bind", "/usr", "/usr", *_system_links(), "--perms", "0755", "--dir", "/etc"]
    for f in _ETC_FILES:
        if os.path.exists(f):
            a += ["--ro-bind", f, f]
    _write_identity_files(host_run, uid)
    a += ["--ro-bind", f"{host_run}/passwd", "/etc/passwd", "--ro-bind", f"{host_run}/group", "/etc/group"]
    a += _ro_tree(_visible_paths(config, python))
    a += ["--remount-ro", "/", "--chdir", WORKSPACE, "--clearenv"]
    for k, v in kernel_env(config, WORKSPACE, "/tmp").items():
        a += ["--setenv", k, v]
    a += ["--info-fd", str(info_fd), "--", python, "-m", "sandbox.launcher",
          f"{HOST_RUN}/{os.path.basename(launch_file)}"]
    return LaunchPlan(argv=a, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")}, cwd="/",
                      mode="bwrap", kernel_run="/proc/{pid}/root" + KERNEL_RUN,
                      workspace="/proc/{pid}/root" + WORKSPACE)


def plan_fallback(config: SandboxConfig, host_run: str, launch_file: str, workspace: str) -> LaunchPlan:
    """The plain command of the fallback mode (host user kept); its sockets live in ``host_run``."""
    python = config.python or sys.executable
    tmp = os.path.join(host_run, "tmp")
    os.makedirs(tmp, exist_ok=True)
    return LaunchPlan(argv=[python, "-m", "sandbox.launcher", launch_file],
                      env=kernel_env(config, workspace, tmp), cwd=workspace, mode="none",
                      kernel_run=host_run, workspace=workspace)


def _namespace_args() -> list[str]:
    # No --as-pid-1: bwrap's own init stays pid 1 (as root) and receives the parent-death signal;
    # its death ends the pid namespace. The kernel itself, once under another user id, would not
    # be sent that signal by root's bwrap (the kernel refuses signals across user ids).
    a = ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
         "--die-with-parent", "--new-session"]
    if os.geteuid() != 0:
        a += ["--unshare-user", "--disable-userns"]
    return a


def _system_links() -> list[str]:
    """Mirrors /bin, /lib... as the host has them: symlinks into /usr, or read-only binds."""
    a: list[str] = []
    for d in _SYSTEM_DIRS:
        if os.path.islink(d):
            a += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            a += ["--ro-bind", d, d]
    return a


def _visible_paths(config: SandboxConfig, python: str) -> list[str]:
    """Host folders the kernel must read: Python (venv and base), the repository, extra paths."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, REPO_ROOT,
             *config.extra_ro_paths}
    exe = Path(python)
    paths.add(str(exe.parent.parent))                  # the interpreter's own prefix (a venv)
    paths.add(str(exe.resolve().parent.parent))        # where its symlink leads
    real = {os.path.realpath(p) for p in paths} | paths
    keep = sorted(p for p in real if os.path.isdir(p) and p not in ("/", "/usr")
                  and not p.startswith(("/usr/", "/proc/", "/dev/")))
    # drop folders inside another kept folder: one bind covers them
    out: list[str] = []
    for p in keep:
        if not any(p.startswith(q + "/") for q in out):
            out.append(p)
    return out


def _ro_tree(paths: list[str]) -> list[str]:
    """Read-only binds of ``paths`` with world-readable parent folders (bwrap would make them 0700)."""
    a: list[str] = []
    made = {"/tmp", "/run", "/dev", "/proc", "/etc", "/usr", WORKSPACE}  # already mounted or made
    for p in paths:
        parents = list(reversed(Path(p).parents))[1:]  # skip "/"
        for parent in map(str, parents):
            if parent not in made:
                a += ["--perms", "0755", "--dir", parent]
                made.add(parent)
        a += ["--ro-bind", p, p]
    return a


def _write_identity_files(host_run: str, uid: tuple[int, int] | None) -> None:
    u, g = uid if uid else (os.getuid(), os.getgid())
    with open(os.path.join(host_run, "passwd"), "w", encoding="utf-8") as f:
        f.write(f"root:x:0:0:root:/root:/usr/sbin/nologin\n"
                f"sandbox:x:{u}:{g}:sandbox:{WORKSPACE}:/usr/sbin/nologin\n"
                "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n")
    with open(os.path.join(host_run, "group"), "w", encoding="utf-8") as f:
        f.write(f"root:x:0:\nsandbox:x:{g}:\nnogroup:x:65534:\n")
