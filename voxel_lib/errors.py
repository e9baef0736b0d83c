"""Typed errors and warnings for volume I/O and geometry.

Every error names the file (when there is one), says what is wrong and what to do.
All errors derive from :class:`VolumeError`, itself a ``ValueError``.
"""

from __future__ import annotations


class VolumeError(ValueError):
    """Base class of every voxel_lib error about a volume or a file."""

    def __init__(self, message: str, path: str | None = None, fix: str | None = None):
        self.path = str(path) if path is not None else None
        self.fix = fix
        text = f"{self.path}: {message}" if self.path else message
        if fix:
            text += f" — {fix}"
        super().__init__(text)


class UnreadableFileError(VolumeError):
    """The file does not exist, cannot be opened, or is truncated / corrupt."""


class NotAnImageError(VolumeError):
    """The file exists but is not a NIfTI image (wrong format or extension)."""


class DimensionError(VolumeError):
    """The data are not 3D or 4D (channels), or a volume has the wrong shape for an operation."""


class EmptyAxisError(VolumeError):
    """An axis of the image has zero length."""


class AffineError(VolumeError):
    """The voxel-to-world affine is singular, non-finite, or not a 4x4 homogeneous matrix."""


class NonFiniteError(VolumeError):
    """The voxel data contain NaN or Inf values (with ``nonfinite='error'``)."""


class TooLargeError(VolumeError):
    """The image has more voxels than the configured limit."""


class GeometryError(VolumeError):
    """Two volumes do not share a grid where an operation needs one, or a region is empty."""


class AnisotropyWarning(UserWarning):
    """The voxel spacing is extremely anisotropic (largest / smallest spacing above a limit)."""


class NonFiniteWarning(UserWarning):
    """NaN/Inf voxels were replaced by zero on load (the default policy)."""
