"""sandbox: a persistent, isolated Python kernel for generated code.

The model's code runs in a Jupyter kernel (ipykernel, driven through jupyter_client) that keeps
its variables between steps and is contained by bubblewrap, rlimits and a seccomp filter: no files
outside its workspace, no network, no new processes, bounded memory, CPU, disk and output. See
``docs/sandbox.md`` for the threat model and the limits.

Example:
    >>> import numpy as np
    >>> from sandbox import Sandbox
    >>> with Sandbox() as sb:
    ...     sb.put("a", np.arange(3))
    ...     sb.execute("b = a * 2")
    ...     sb.get("b")
    array([0, 2, 4])

This package depends on no other package of the repository (the kernel preamble may import them).
"""

from .config import ALLOW_UNISOLATED_ENV, Limits, SandboxConfig
from .isolation import bwrap_probe
from .pool import KernelPool
from .preamble import DEFAULT_PREAMBLE
from .result import ErrorInfo, ExecutionResult, IsolationUnavailable, SandboxError
from .session import Sandbox

__all__ = [
    "Sandbox", "KernelPool", "SandboxConfig", "Limits", "ExecutionResult", "ErrorInfo",
    "SandboxError", "IsolationUnavailable", "DEFAULT_PREAMBLE", "ALLOW_UNISOLATED_ENV", "bwrap_probe",
]
