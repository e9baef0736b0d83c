"""``KernelPool``: pre-started kernels, so that a sandbox (or a restart) does not wait for one."""

from __future__ import annotations

import dataclasses
import queue
import threading
import weakref

from .config import SandboxConfig
from .kernel import Kernel
from .session import Sandbox


class KernelPool:
    """Keeps ``size`` kernels started and idle in the background.

    A kernel is handed out once and never returned: each sandbox gets a fresh one, so no state
    leaks between sessions. The pool starts a replacement as soon as one is taken.

    Args:
        size: kernels kept ready.
        config: their configuration; or pass its fields as keyword arguments.

    Example:
        >>> with KernelPool(size=2) as pool:
        ...     with pool.sandbox() as sb:
        ...         sb.execute("1 + 1").value
        {'text/plain': '2'}
    """

    def __init__(self, size: int = 2, config: SandboxConfig | None = None, **options):
        if size < 1:
            raise ValueError("size must be at least 1")
        if config is None:
            config = SandboxConfig(**options)
        elif options:
            config = dataclasses.replace(config, **options)
        self.config = config
        self.size = size
        self.last_error: BaseException | None = None
        self._ready: queue.Queue[Kernel] = queue.Queue()
        self._wake = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._fill, name="sandbox-pool", daemon=True)
        self._thread.start()
        weakref.finalize(self, _kill_all, self._ready)  # idle kernels go at exit even if never closed

    def take(self) -> Kernel:
        """A started kernel: a ready one if any, else one started now (raises if that fails)."""
        if self._closed:
            raise RuntimeError("the pool is closed")
        while True:
            try:
                kernel = self._ready.get_nowait()
            except queue.Empty:
                kernel = None
            self._wake.set()
            if kernel is None:
                return Kernel.start(self.config)
            if kernel.alive():
                return kernel
            kernel.kill()  # died while waiting (e.g. its CPU budget); try the next

    def sandbox(self) -> Sandbox:
        """A new :class:`Sandbox` on a pre-started kernel."""
        return Sandbox(pool=self)

    def ready(self) -> int:
        """How many kernels are ready now."""
        return self._ready.qsize()

    def close(self) -> None:
        """Stops the background starts and kills the idle kernels (handed-out ones stay)."""
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=self.config.start_timeout + 10)
        _kill_all(self._ready)

    def __enter__(self) -> "KernelPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _fill(self) -> None:
        failures = 0
        while not self._closed:
            if self._ready.qsize() >= self.size:
                self._wake.wait(timeout=5)
                self._wake.clear()
                continue
            try:
                kernel = Kernel.start(self.config)
            except BaseException as exc:  # reported through last_error; take() raises its own
                self.last_error = exc
                failures += 1
                self._wake.wait(timeout=min(60, 2 ** failures))
                self._wake.clear()
                continue
            failures = 0
            if self._closed:
                kernel.kill()
            else:
                self._ready.put(kernel)


def _kill_all(ready: queue.Queue) -> None:
    while True:
        try:
            ready.get_nowait().kill()
        except queue.Empty:
            return
