"""Configuration of a sandbox: resource limits, isolation mode, preamble and timeouts.

Every default is documented in ``docs/sandbox.md``; change them by passing your own values::

    from sandbox import Sandbox, Limits
    Sandbox(limits=Limits(memory_bytes=8 << 30, workspace_bytes=4 << 30), default_timeout=120)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .preamble import DEFAULT_PREAMBLE

GiB = 1 << 30
MiB = 1 << 20

#: Environment variable that opts in to the unisolated fallback (same as ``allow_unisolated=True``).
ALLOW_UNISOLATED_ENV = "VOXELPROMPT_SANDBOX_ALLOW_UNISOLATED"


@dataclass(frozen=True)
class Limits:
    """Resource limits of one kernel.

    Attributes:
        memory_bytes: address-space limit (``RLIMIT_AS``); allocations past it raise ``MemoryError``.
        cpu_seconds: CPU time for the kernel's whole life (``RLIMIT_CPU``); past it the kernel is
            killed and the next step gets a fresh one. Per-step runaway code is stopped earlier by
            the step timeout.
        file_size_bytes: largest file the kernel may write (``RLIMIT_FSIZE``).
        processes: tasks (threads included) of the kernel's user (``RLIMIT_NPROC``); effective when
            the kernel runs under its own user id (always under bubblewrap).
        open_files: open file descriptors (``RLIMIT_NOFILE``).
        workspace_bytes: size of the private writable workspace (a tmpfs; bubblewrap mode only).
        tmp_bytes: size of the private ``/tmp`` (a tmpfs; bubblewrap mode only).
        output_chars: characters of stdout and of stderr kept per step; the rest is dropped and a
            marker says so.
        display_chars: characters of display data (images as base64, HTML...) kept per step.
        message_bytes: largest single message the host accepts from the kernel; a bigger one
            cuts the connection and the kernel is replaced.
        threads: threads for OpenMP/BLAS/torch inside the kernel.
    """

    memory_bytes: int = 4 * GiB
    cpu_seconds: int = 3600
    file_size_bytes: int = 1 * GiB
    processes: int = 256
    open_files: int = 1024
    workspace_bytes: int = 1 * GiB
    tmp_bytes: int = 256 * MiB
    output_chars: int = 1_000_000
    display_chars: int = 16_000_000
    message_bytes: int = 64 * MiB
    threads: int = field(default_factory=lambda: max(1, min(4, os.cpu_count() or 1)))


@dataclass(frozen=True)
class SandboxConfig:
    """Everything needed to start a kernel.

    Attributes:
        limits: resource limits, see :class:`Limits`.
        preamble: code lines the kernel runs at start, in the user namespace (imports, agent API).
        isolation: ``"auto"`` (bubblewrap if it works, else the fallback if allowed), ``"bwrap"``
            (bubblewrap or fail) or ``"none"`` (the weak fallback; needs ``allow_unisolated``).
        allow_unisolated: opt in to the fallback when bubblewrap is unavailable. Also enabled by
            the environment variable ``VOXELPROMPT_SANDBOX_ALLOW_UNISOLATED=1``.
        seccomp: ``None`` installs the syscall filter when libseccomp is available, ``True``
            requires it, ``False`` skips it.
        extra_ro_paths: further host paths made visible read-only at the same path (data sets).
        env: extra environment variables for the kernel (the host environment is never passed).
        default_timeout: seconds a step may run when ``execute`` is given no timeout.
        interrupt_grace: seconds to wait for an interrupt to take before the kernel is restarted.
        start_timeout: seconds a kernel may take to start (preamble included).
        python: the interpreter that runs the kernel; defaults to the host's.
    """

    limits: Limits = field(default_factory=Limits)
    preamble: tuple[str, ...] = DEFAULT_PREAMBLE
    isolation: str = "auto"
    allow_unisolated: bool = False
    seccomp: bool | None = None
    extra_ro_paths: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    default_timeout: float = 60.0
    interrupt_grace: float = 3.0
    start_timeout: float = 90.0
    python: str | None = None

    def __post_init__(self):
        if self.isolation not in ("auto", "bwrap", "none"):
            raise ValueError(f"isolation must be 'auto', 'bwrap' or 'none', got {self.isolation!r}")
        if isinstance(self.preamble, str):
            object.__setattr__(self, "preamble", (self.preamble,))
        else:
            object.__setattr__(self, "preamble", tuple(self.preamble))
        object.__setattr__(self, "extra_ro_paths", tuple(str(p) for p in self.extra_ro_paths))
        env = self.env.items() if isinstance(self.env, dict) else self.env
        object.__setattr__(self, "env", tuple((str(k), str(v)) for k, v in env))

    @property
    def unisolated_allowed(self) -> bool:
        """Whether the user opted in to the fallback, by argument or environment variable."""
        return self.allow_unisolated or os.environ.get(ALLOW_UNISOLATED_ENV, "") in ("1", "true", "yes")
