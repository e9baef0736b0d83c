"""What a step returns, and the errors the sandbox raises."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class SandboxError(RuntimeError):
    """A sandbox operation failed (start, transfer, or a call on a closed sandbox)."""


class IsolationUnavailable(SandboxError):
    """bubblewrap cannot run here and the unisolated fallback was not allowed."""


@dataclass
class ErrorInfo:
    """An exception raised by a step, or a failure of the kernel itself.

    Attributes:
        name: exception class name, e.g. ``"ZeroDivisionError"``; the sandbox's own failures are
            ``"TimeoutError"``, ``"KernelDied"``, ``"OutputLost"``, ``"ConnectionLost"`` and
            ``"ProtocolError"``.
        message: the exception's message.
        traceback: formatted traceback lines, without terminal colour codes.
    """

    name: str
    message: str
    traceback: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.name}: {self.message}"


@dataclass
class ExecutionResult:
    """The outcome of one step.

    Attributes:
        stdout: printed output (capped, with a marker where cut).
        stderr: error output (capped, with a marker where cut).
        error: the step's exception or the kernel's failure; ``None`` on success.
        display: MIME bundles shown with ``display()`` (plots, HTML...), in order.
        value: MIME bundle of the cell's last expression, if it had one.
        duration: wall-clock seconds from sending the step to its last message.
        truncated: some output was dropped because of the caps.
        state_lost: the kernel was replaced (timeout it ignored, crash, lost connection): the
            variables of earlier steps are gone.
        output_synced: the kernel's end-of-step markers arrived, so ``stdout``/``stderr`` hold
            everything the step wrote to file descriptors 1 and 2 (``os.write``, C extensions)
            up to its end. ``False`` when they failed or did not come in time (the code closed or
            replaced the sandbox's own descriptors, the kernel's reader thread stalled, the kernel
            died): such output may then be missing, or appear in the next step; a healthy step
            also says so in ``stderr``.
    """

    stdout: str = ""
    stderr: str = ""
    error: ErrorInfo | None = None
    display: list[dict[str, Any]] = field(default_factory=list)
    value: dict[str, Any] | None = None
    duration: float = 0.0
    truncated: bool = False
    state_lost: bool = False
    output_synced: bool = True

    @property
    def ok(self) -> bool:
        """True when the step raised nothing and the kernel survived."""
        return self.error is None


def strip_ansi(text: str) -> str:
    """Removes terminal colour codes."""
    return _ANSI.sub("", text)
