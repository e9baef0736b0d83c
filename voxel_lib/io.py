"""NIfTI-1/2 reading and writing (through nibabel) with validation and typed errors.

Policy for NaN/Inf voxels (``nonfinite=``): ``"zero"`` (default) replaces them by 0 and warns
with :class:`NonFiniteWarning`; ``"error"`` raises :class:`NonFiniteError`; ``"keep"`` leaves
them. Integer data without scaling load as label maps, everything else as images (override
with ``kind=``).
"""

from __future__ import annotations

import gzip
import os
import warnings
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from .errors import (AffineError, AnisotropyWarning, DimensionError, EmptyAxisError, NonFiniteError,
                     NonFiniteWarning, NotAnImageError, TooLargeError, UnreadableFileError)
from .volume import Volume, _as_affine

#: Default upper bound on the number of voxels (× channels) a load accepts: 1024³.
MAX_VOXELS = 1024**3
#: Largest / smallest spacing above which :class:`AnisotropyWarning` is issued.
MAX_ANISOTROPY = 10.0

_EXTS = (".nii", ".nii.gz")


def _pick_affine(img, prefer: str, path) -> np.ndarray:
    hdr = img.header
    sform, scode = hdr.get_sform(coded=True)
    qform, qcode = hdr.get_qform(coded=True)
    order = [("sform", sform, scode), ("qform", qform, qcode)]
    if prefer == "qform":
        order.reverse()
    elif prefer != "sform":
        raise ValueError("prefer must be 'sform' or 'qform'")
    for _, aff, code in order:
        if aff is not None and code and code > 0:
            return np.asarray(aff, dtype=np.float64)
    # neither set: nibabel's fallback (pixdim scaling), as FreeSurfer / FSL do
    return np.asarray(hdr.get_base_affine(), dtype=np.float64)


def load(path, *, kind: str | None = None, prefer: str = "sform", nonfinite: str = "zero",
         max_voxels: int | None = None, dtype: torch.dtype | None = None) -> Volume:
    """Loads a NIfTI file (``.nii`` / ``.nii.gz``, NIfTI-1 or -2) as a :class:`Volume`.

    Args:
        path: the file.
        kind: ``"image"`` or ``"label"``; inferred from the stored data type if omitted.
        prefer: which header transform to use when both are set: ``"sform"`` or ``"qform"``.
        nonfinite: NaN/Inf policy: ``"zero"``, ``"error"`` or ``"keep"``.
        max_voxels: refuse images with more voxels × channels than this (default :data:`MAX_VOXELS`).
        dtype: optional torch dtype to convert the data to.

    Raises:
        UnreadableFileError, NotAnImageError, DimensionError, EmptyAxisError, AffineError,
        NonFiniteError, TooLargeError.
    """
    path = Path(path)
    if not path.exists():
        raise UnreadableFileError("file not found", path, "check the path")
    if path.is_dir():
        raise NotAnImageError("is a directory, not a NIfTI file", path, "pass a .nii or .nii.gz file")
    if not str(path).endswith(_EXTS):
        raise NotAnImageError(f"unsupported extension (expected {' or '.join(_EXTS)})", path,
                              "convert the scan to NIfTI (e.g. dcm2niix for DICOM)")
    try:
        img = nib.load(str(path))
    except (gzip.BadGzipFile, zlib.error, EOFError) as exc:
        raise UnreadableFileError(f"truncated or corrupt compressed file ({exc})", path,
                                  "re-export or re-download the scan") from None
    except nib.filebasedimages.ImageFileError as exc:
        raise NotAnImageError(f"not a NIfTI image ({exc})", path,
                              "pass a NIfTI-1/2 file; convert DICOM with dcm2niix") from None
    except (OSError, ValueError) as exc:
        raise UnreadableFileError(f"cannot read the file ({exc})", path, "check the file") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise NotAnImageError(f"is a {type(img).__name__}, not NIfTI", path, "convert it to NIfTI")
    shape = tuple(int(s) for s in img.shape)
    # drop trailing singleton dims beyond 3 (e.g. (X, Y, Z, 1))
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) < 3:
        raise DimensionError(f"image is {len(shape)}D with shape {img.shape}; a 3D volume is needed",
                             path, "pass a 3D scan, not a single slice")
    if len(shape) > 4:
        raise DimensionError(f"image is {len(shape)}D with shape {img.shape}; only 3D and 4D "
                             "(channels) are supported", path, "split it into 3D/4D files")
    if 0 in shape:
        raise EmptyAxisError(f"image has a zero-length axis: shape {img.shape}", path,
                             "the file holds no voxels; re-export the scan")
    limit = MAX_VOXELS if max_voxels is None else max_voxels
    if int(np.prod(shape)) > limit:
        raise TooLargeError(f"{int(np.prod(shape)):,} voxels exceeds the limit of {limit:,}", path,
                            "crop or downsample the scan, or raise max_voxels")
    affine = _pick_affine(img, prefer, path)
    try:
        affine_t = _as_affine(affine)
    except AffineError as exc:
        raise AffineError(str(exc), path, "fix the header's sform/qform (e.g. fslorient)") from None
    hdr = img.header
    slope, inter = hdr.get_slope_inter()
    scaled = slope not in (None, 1.0) or inter not in (None, 0.0)
    raw_dtype = img.get_data_dtype()
    try:
        if scaled or np.issubdtype(raw_dtype, np.floating):
            data = np.asarray(img.get_fdata(dtype=np.float32))
        else:
            data = np.asarray(img.dataobj)
    except (EOFError, OSError, ValueError, zlib.error) as exc:
        raise UnreadableFileError(f"truncated or corrupt voxel data ({exc})", path,
                                  "re-export or re-download the scan") from None
    data = data.reshape(shape)
    if data.dtype.kind == "f":
        bad = ~np.isfinite(data)
        if bad.any():
            n = int(bad.sum())
            if nonfinite == "error":
                raise NonFiniteError(f"{n:,} voxels are NaN or Inf", path,
                                     "clean the image or load with nonfinite='zero'")
            if nonfinite == "zero":
                warnings.warn(f"{path}: {n:,} NaN/Inf voxels replaced by 0", NonFiniteWarning, stacklevel=2)
                data = np.where(bad, 0, data).astype(data.dtype)
            elif nonfinite != "keep":
                raise ValueError("nonfinite must be 'zero', 'error' or 'keep'")
    if data.dtype.kind == "u" and data.dtype.itemsize >= 2 and data.dtype != np.uint8:
        data = data.astype(np.int64 if data.dtype.itemsize >= 4 else np.int32)
    if data.dtype == np.int8:
        data = data.astype(np.int16)
    if data.dtype.kind not in "fiub":
        data = data.astype(np.float32)
    if data.ndim == 4:
        data = np.moveaxis(data, -1, 0)
    t = torch.from_numpy(np.ascontiguousarray(data))
    if dtype is not None:
        t = t.to(dtype)
    if kind is None:
        kind = "image" if (t.is_floating_point() or scaled) else "label"
    vol = Volume(t, affine_t, kind, header=hdr.copy())
    sp = vol.spacing
    if max(sp) / min(sp) > MAX_ANISOTROPY:
        warnings.warn(f"{path}: extreme voxel anisotropy {tuple(round(s, 3) for s in sp)} mm "
                      f"(ratio {max(sp) / min(sp):.1f}); measurements along the thick axis are coarse",
                      AnisotropyWarning, stacklevel=2)
    return vol


def save(vol: Volume, path, *, dtype=None) -> Path:
    """Writes a volume as NIfTI (NIfTI-1; ``.nii.gz`` compresses). Returns the path.

    The stored header of a loaded volume is kept (descriptions, units, intent, xyzt units); the
    affine is written to both sform and qform. Images are written as float32 unless ``dtype``
    is given, label maps in the smallest integer type that holds them.
    """
    path = Path(path)
    if not str(path).endswith(_EXTS):
        raise NotAnImageError("output must end in .nii or .nii.gz", path)
    arr = vol.numpy()
    arr = arr[0] if arr.shape[0] == 1 else np.moveaxis(arr, 0, -1)
    if dtype is not None:
        arr = arr.astype(dtype)
    elif vol.is_label:
        if arr.dtype.kind == "f":
            arr = np.rint(arr)
        lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        for t in (np.uint8, np.int16, np.int32, np.int64):
            if np.iinfo(t).min <= lo and hi <= np.iinfo(t).max:
                arr = arr.astype(t)
                break
    elif arr.dtype.kind == "f" and arr.dtype != np.float32:
        arr = arr.astype(np.float32)
    affine = vol.affine.numpy()
    hdr = None
    if isinstance(vol.header, (nib.Nifti1Header, nib.Nifti2Header)):
        hdr = vol.header.copy()
        hdr.set_data_dtype(arr.dtype)
    img = nib.Nifti1Image(arr, affine, header=hdr)
    img.set_sform(affine, code=int(hdr["sform_code"]) if hdr is not None and int(hdr["sform_code"]) > 0 else 1)
    img.set_qform(affine, code=int(hdr["qform_code"]) if hdr is not None and int(hdr["qform_code"]) > 0 else 1)
    img.header.set_slope_inter(1.0, 0.0)
    if hdr is None:
        img.header.set_xyzt_units("mm", "sec")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}" + (".nii.gz" if str(path).endswith(".gz") else ".nii"))
    nib.save(img, str(tmp))
    os.replace(tmp, path)
    return path
