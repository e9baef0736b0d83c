"""The host's side of ``put``/``get``: values travel as files in the kernel's workspace.

Arrays and tensors are stored as safetensors, volumes as NIfTI (through ``voxel_lib``), plain
values (numbers, strings, lists, dicts) as JSON; nothing is ever pickled. The workspace is writable
by the kernel, so the host opens files there only relative to a descriptor of the workspace
folder, never follows links, creates its files exclusively, and reads only regular files of
bounded size.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import stat
import tempfile
from typing import Any

from .kernel_side import FORMATS
from .result import SandboxError

_META_MAX = 64 * 1024


def new_stem() -> str:
    """A fresh, unguessable file-name stem for one transfer."""
    return f".sandbox-transfer-{secrets.token_hex(16)}"


def encode(value: Any) -> tuple[str, bytes, dict]:
    """Serializes ``value``; returns ``(format, data, meta)``."""
    cls = type(value)
    if cls.__module__ == "numpy" and cls.__name__ == "ndarray":
        import numpy as np
        from safetensors.numpy import save
        return "numpy", save({"value": np.ascontiguousarray(value)}), {}
    if cls.__module__.split(".")[0] == "torch" and cls.__name__ in ("Tensor", "Parameter"):
        from safetensors.torch import save
        return "torch", save({"value": value.detach().cpu().contiguous()}), {}
    if cls.__module__.split(".")[0] == "voxel_lib" and cls.__name__ == "Volume":
        return "nifti", _volume_bytes(value), {"kind": value.kind,
                                               "dtype": str(value.tensor.dtype).removeprefix("torch.")}
    try:
        return "json", json.dumps(value, allow_nan=True).encode(), {}
    except (TypeError, ValueError):
        raise TypeError(f"cannot send a {cls.__name__} into the sandbox: only numpy arrays, torch "
                        "tensors, voxel_lib volumes and JSON-compatible values can be sent") from None


def decode(fmt: str, data: bytes, meta: dict) -> Any:
    """Rebuilds a value from :func:`encode`'s output (or the kernel's). Never unpickles."""
    if fmt == "numpy":
        from safetensors.numpy import load
        return load(data)["value"]
    if fmt == "torch":
        from safetensors.torch import load
        return load(data)["value"]
    if fmt == "nifti":
        return _volume_from_bytes(data, meta)
    if fmt == "json":
        return json.loads(data)
    raise SandboxError(f"unknown transfer format {fmt!r}")


def write_new(dir_fd: int, name: str, data: bytes) -> None:
    """Creates ``name`` in the folder, failing if anything (a file, a link) already has the name."""
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                 dir_fd=dir_fd)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except OSError as exc:
        os.close(fd)
        remove(dir_fd, name)
        raise SandboxError(f"cannot write into the workspace: {exc.strerror}") from None
    os.close(fd)


def read_regular(dir_fd: int, name: str, max_bytes: int) -> bytes:
    """Reads ``name`` from the folder if it is a regular file (no link, FIFO or device) within size."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as exc:
        why = "it is a symbolic link" if exc.errno == errno.ELOOP else exc.strerror
        raise SandboxError(f"cannot read {name} from the workspace: {why}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SandboxError(f"{name} is not a regular file")
        if st.st_size > max_bytes:
            raise SandboxError(f"{name} is {st.st_size:,} bytes, over the limit of {max_bytes:,}")
        chunks, left = [], st.st_size
        while left > 0:
            chunk = os.read(fd, min(left, 16 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_meta(dir_fd: int, stem: str) -> tuple[str, dict]:
    """Reads and checks the kernel's description of a value it wrote."""
    try:
        meta = json.loads(read_regular(dir_fd, stem + ".meta", _META_MAX))
    except (ValueError, OSError, SandboxError) as exc:
        raise SandboxError(f"the kernel wrote no usable transfer description: {exc}") from None
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if fmt not in FORMATS:
        raise SandboxError(f"the kernel wrote an unknown transfer format {fmt!r}")
    return fmt, meta


def remove(dir_fd: int, *names: str) -> None:
    """Deletes files from the folder, ignoring missing ones."""
    for name in names:
        try:
            os.unlink(name, dir_fd=dir_fd)
        except OSError:
            pass


def _volume_bytes(volume) -> bytes:
    import voxel_lib
    with tempfile.TemporaryDirectory(prefix="voxelprompt-transfer-") as tmp:
        path = os.path.join(tmp, "volume.nii")
        voxel_lib.save(volume, path, dtype=_numpy_dtype(volume.tensor.dtype))
        with open(path, "rb") as f:
            return f.read()


def _volume_from_bytes(data: bytes, meta: dict):
    import torch

    import voxel_lib
    kind, dtype = meta.get("kind"), getattr(torch, str(meta.get("dtype")), None)
    if kind not in ("image", "label") or not isinstance(dtype, torch.dtype):
        raise SandboxError(f"bad volume description from the kernel: {meta!r}")
    with tempfile.TemporaryDirectory(prefix="voxelprompt-transfer-") as tmp:
        path = os.path.join(tmp, "volume.nii")
        with open(path, "wb") as f:
            f.write(data)
        # every voxel takes at least one byte of the file: a lying header cannot claim more
        return voxel_lib.load(path, kind=kind, nonfinite="keep", max_voxels=max(1, len(data)), dtype=dtype)


def _numpy_dtype(torch_dtype):
    import torch
    return torch.empty(0, dtype=torch_dtype).numpy().dtype
