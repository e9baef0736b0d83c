"""Helpers that live inside the kernel: the output cap, the end-of-step markers (``fdsync``) and
the kernel's end of ``put``/``get``.

Nothing here is trusted by the host: the model's code can replace any of it. The output cap keeps
honest code from flooding the connection; the host enforces its own caps on what it receives, and
validates every file it reads back.
"""

from __future__ import annotations

import json
import os
import sys

from . import fdsync

#: Formats of transferred values, and the file suffix each is stored with.
FORMATS = {"numpy": ".safetensors", "torch": ".safetensors", "nifti": ".nii", "json": ".json"}
MARKER = "\n[sandbox: output truncated after {limit:,} characters]\n"

_user_ns: dict | None = None
_workspace = "."


class _OutputCap:
    """Keeps at most ``limit`` characters per stream and per step, then writes a marker once."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used: dict[str, int] = {}

    def reset(self, *_args) -> None:
        self.used.clear()

    def wrap(self, stream) -> None:
        write, name = stream.write, getattr(stream, "name", "stream")

        def capped_write(text):
            if not isinstance(text, str):
                return write(text)  # raises the stream's own TypeError
            used = self.used.get(name, 0)
            self.used[name] = used + len(text)
            room = self.limit - used
            if room < 0:  # past the cap: the marker went out with the text that crossed it
                return len(text)
            if len(text) > room:
                write(text[:room])
                write(MARKER.format(limit=self.limit))
                return len(text)
            return write(text)

        stream.write = capped_write


def install(shell, output_chars: int, workspace: str) -> None:
    """Called by the launcher once ipykernel is initialised and before the first step."""
    global _user_ns, _workspace
    _user_ns, _workspace = shell.user_ns, workspace
    cap = _OutputCap(output_chars)
    for stream in (sys.stdout, sys.stderr):
        cap.wrap(stream)
    shell.events.register("pre_execute", cap.reset)
    fdsync.install(shell.kernel, [sys.stdout, sys.stderr])


def put_value(name: str, filename: str, fmt: str, meta: dict) -> None:
    """Loads the file the host wrote into the workspace as variable ``name``, then deletes it."""
    path = os.path.join(_workspace, filename)
    try:
        if fmt == "numpy":
            from safetensors.numpy import load_file
            value = load_file(path)["value"]
        elif fmt == "torch":
            from safetensors.torch import load_file
            value = load_file(path)["value"]
        elif fmt == "nifti":
            import torch

            import voxel_lib
            value = voxel_lib.load(path, kind=meta["kind"], nonfinite="keep", max_voxels=2**62,
                                   dtype=getattr(torch, meta["dtype"]))
        elif fmt == "json":
            with open(path, encoding="utf-8") as f:
                value = json.load(f)
        else:
            raise ValueError(f"unknown transfer format {fmt!r}")
    finally:
        os.unlink(path)
    _user_ns[name] = value


def get_value(name: str, stem: str) -> None:
    """Writes variable ``name`` to ``stem + suffix`` in the workspace, plus ``stem.meta`` (JSON)."""
    if name not in _user_ns:
        raise NameError(f"name {name!r} is not defined in the sandbox")
    value = _user_ns[name]
    meta: dict = {}
    fmt = _format_of(value)
    path = os.path.join(_workspace, stem + FORMATS[fmt])
    if fmt == "numpy":
        import numpy as np
        from safetensors.numpy import save_file
        save_file({"value": np.ascontiguousarray(value)}, path)
    elif fmt == "torch":
        from safetensors.torch import save_file
        save_file({"value": value.detach().cpu().contiguous()}, path)
    elif fmt == "nifti":
        import torch

        import voxel_lib
        meta = {"kind": value.kind, "dtype": str(value.tensor.dtype).removeprefix("torch.")}
        voxel_lib.save(value, path, dtype=torch.empty(0, dtype=value.tensor.dtype).numpy().dtype)
    else:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(value, f, default=_json_default)
    meta["format"] = fmt
    with open(os.path.join(_workspace, stem + ".meta"), "w", encoding="utf-8") as f:
        json.dump(meta, f)


def _format_of(value) -> str:
    cls = type(value)
    if cls.__module__ == "numpy" and cls.__name__ == "ndarray":
        return "numpy"
    if cls.__module__.split(".")[0] == "torch" and cls.__name__ in ("Tensor", "Parameter"):
        return "torch"
    if cls.__module__.split(".")[0] == "voxel_lib" and cls.__name__ == "Volume":
        return "nifti"
    return "json"


def _json_default(value):
    item = getattr(value, "item", None)
    if callable(item):
        return item()
    raise TypeError(f"cannot transfer a {type(value).__name__}: only arrays, tensors, volumes and "
                    "JSON-compatible values (numbers, strings, lists, dicts) can leave the sandbox")
