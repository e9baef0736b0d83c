"""``Sandbox``: a persistent, isolated Python kernel that runs generated code step by step."""

from __future__ import annotations

import dataclasses
import keyword
import threading
import weakref
from typing import TYPE_CHECKING, Any

from . import transfer
from .config import SandboxConfig
from .kernel import Kernel
from .kernel_side import FORMATS
from .result import ExecutionResult, SandboxError

if TYPE_CHECKING:
    from .pool import KernelPool

_SIDE = "__import__('sandbox.kernel_side').kernel_side"


class Sandbox:
    """A persistent, isolated Python kernel for untrusted code.

    Variables persist from one :meth:`execute` to the next. A step past its timeout is interrupted
    (and the kernel replaced if that does not work); a kernel that dies is reported in the step's
    result and the next call gets a fresh one. Safe to share between threads: steps run one at a
    time, and :meth:`interrupt` may be called from any thread.

    Args:
        config: a full :class:`SandboxConfig`; or pass its fields as keyword arguments
            (``Sandbox(preamble=[...], limits=Limits(...), default_timeout=30)``).
        pool: take kernels (at start and after every restart) from this :class:`KernelPool`; the
            pool's configuration is then used.
        start: start the kernel now rather than at the first call.

    Raises:
        IsolationUnavailable: bubblewrap cannot run and the fallback was not allowed.

    Example:
        >>> with Sandbox() as sb:
        ...     sb.execute("x = 21")
        ...     sb.execute("print(x * 2)").stdout
        '42\\n'
    """

    def __init__(self, config: SandboxConfig | None = None, *, pool: "KernelPool | None" = None,
                 start: bool = True, **options):
        if pool is not None:
            if config is not None or options:
                raise TypeError("a Sandbox from a pool uses the pool's configuration")
            config = pool.config
        elif config is None:
            config = SandboxConfig(**options)
        elif options:
            config = dataclasses.replace(config, **options)
        self.config = config
        self._pool = pool
        self._lock = threading.RLock()
        self._holder: list[Kernel | None] = [None]   # shared with the finalizer
        self._closed = False
        self._finalizer = weakref.finalize(self, _kill_held, self._holder)
        if start:
            self.start()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Starts the kernel if none is running (normally automatic)."""
        with self._lock:
            self._kernel_ready()

    def restart(self) -> None:
        """Replaces the kernel with a fresh one: variables and workspace files are lost.

        A step running in another thread is stopped (its result reports ``KernelDied``).
        """
        self._check_open()
        self._stop_process()
        with self._lock:
            self._drop_kernel()
            self._kernel_ready()

    def interrupt(self) -> None:
        """Interrupts the running step (``KeyboardInterrupt`` inside); callable from any thread."""
        kernel = self._holder[0]
        if kernel is not None:
            kernel.interrupt()

    def close(self) -> None:
        """Stops the kernel and deletes its workspace. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop_process()
        with self._lock:
            self._drop_kernel()
        self._finalizer.detach()

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def kernel_start_seconds(self) -> float:
        """Seconds the current kernel took to start (in the background for a pool's); 0 if none yet."""
        k = self._holder[0]
        return k.start_seconds if k is not None else 0.0

    def isolation(self) -> dict[str, Any]:
        """What contains the current kernel: mode, seccomp, user id, limits."""
        with self._lock:
            k = self._kernel_ready()
            return {"mode": k.mode, "seccomp": k.seccomp, "own_user": k.uid is not None,
                    "limits": dataclasses.asdict(self.config.limits)}

    # ------------------------------------------------------------------ steps
    def execute(self, code: str, timeout: float | None = None) -> ExecutionResult:
        """Runs ``code`` in the kernel and returns its output, error, display data and duration.

        Args:
            code: Python source (IPython syntax).
            timeout: seconds before the step is interrupted; ``config.default_timeout`` if omitted.
        """
        with self._lock:
            return self._run(code, timeout, silent=False)

    def put(self, name: str, value: Any, timeout: float | None = None) -> None:
        """Makes ``value`` the kernel variable ``name``.

        Arrays and tensors go through safetensors, ``voxel_lib.Volume`` through NIfTI, plain
        values (numbers, strings, lists, dicts) through JSON, each as a file in the workspace.
        """
        _check_name(name)
        fmt, data, meta = transfer.encode(value)
        stem = transfer.new_stem()
        filename = stem + FORMATS[fmt]
        with self._lock:
            kernel = self._kernel_ready()
            transfer.write_new(kernel.workspace_fd, filename, data)
            res = self._run(f"{_SIDE}.put_value({name!r}, {filename!r}, {fmt!r}, {meta!r})",
                            timeout, silent=True)
            if not res.ok:
                if not res.state_lost:
                    transfer.remove(kernel.workspace_fd, filename)
                raise SandboxError(f"put({name!r}) failed: {res.error}")

    def get(self, name: str, timeout: float | None = None) -> Any:
        """Returns a copy of the kernel variable ``name`` (see :meth:`put` for the formats).

        Raises:
            SandboxError: no such variable, a value of another type, or a malformed file.
        """
        _check_name(name)
        stem = transfer.new_stem()
        with self._lock:
            kernel = self._kernel_ready()
            res = self._run(f"{_SIDE}.get_value({name!r}, {stem!r})", timeout, silent=True)
            if not res.ok:
                if not res.state_lost:
                    transfer.remove(kernel.workspace_fd, *(stem + s for s in (*FORMATS.values(), ".meta")))
                raise SandboxError(f"get({name!r}) failed: {res.error}")
            fd = kernel.workspace_fd
            try:
                fmt, meta = transfer.read_meta(fd, stem)
                data = transfer.read_regular(fd, stem + FORMATS[fmt], self.config.limits.workspace_bytes)
            finally:
                transfer.remove(fd, stem + ".meta", *(stem + s for s in set(FORMATS.values())))
        try:
            return transfer.decode(fmt, data, meta)
        except SandboxError:
            raise
        except Exception as exc:
            raise SandboxError(f"get({name!r}): the kernel's {fmt} file is unreadable: {exc}") from None

    # ------------------------------------------------------------------ internals
    def _run(self, code: str, timeout: float | None, silent: bool) -> ExecutionResult:
        kernel = self._kernel_ready()
        t = self.config.default_timeout if timeout is None else float(timeout)
        result, healthy = kernel.execute(code, t, silent=silent)
        if not healthy:
            self._drop_kernel()  # the next call starts a fresh kernel
        return result

    def _kernel_ready(self) -> Kernel:
        self._check_open()
        kernel = self._holder[0]
        if kernel is not None and kernel.alive():
            return kernel
        self._drop_kernel()
        kernel = self._pool.take() if self._pool is not None else Kernel.start(self.config)
        self._holder[0] = kernel
        return kernel

    def _drop_kernel(self) -> None:
        kernel, self._holder[0] = self._holder[0], None
        if kernel is not None:
            kernel.kill()

    def _stop_process(self) -> None:
        kernel = self._holder[0]
        if kernel is not None:
            kernel.stop_process()

    def _check_open(self) -> None:
        if self._closed:
            raise SandboxError("the sandbox is closed")


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
        raise ValueError(f"not a valid Python variable name: {name!r}")


def _kill_held(holder: list) -> None:
    kernel = holder[0]
    if kernel is not None:
        kernel.kill()
