"""voxel_lib: geometry-aware brain volumes, NIfTI I/O, morphometry and segmentation metrics.

A :class:`Volume` is a tensor ``(C, X, Y, Z)`` plus its voxel-to-world affine (RAS, mm). Every
operation returns a new volume, every measurement is in world units and says so, and
left/right always come from the affine. See ``docs/voxel_lib.md``.
"""

from .errors import (AffineError, AnisotropyWarning, DimensionError, EmptyAxisError, GeometryError,
                     NonFiniteError, NonFiniteWarning, NotAnImageError, TooLargeError,
                     UnreadableFileError, VolumeError)
from .io import load, save
from .quantity import Quantity
from .volume import Volume, ras_grid, rotation_affine, stack

__all__ = [
    "Volume", "load", "save", "stack", "ras_grid", "rotation_affine", "Quantity",
    "VolumeError", "UnreadableFileError", "NotAnImageError", "DimensionError", "EmptyAxisError",
    "AffineError", "NonFiniteError", "TooLargeError", "GeometryError", "AnisotropyWarning",
    "NonFiniteWarning",
]

from .metrics import (benjamini_hochberg, bootstrap_ci, dice, evaluate, hd95, iou, nsd,  # noqa: E402
                      paired_wilcoxon)
from .morphometry import (BoundingBox, Component, asymmetry, bounding_box, center_of_mass,  # noqa: E402
                          change, component_at, components, count_components, extent,
                          intensity_stats, largest_component, max_diameter, mean_intensity,
                          relative_intensity, side, signal_class, surrounding, volume)
from . import shapes  # noqa: E402

__all__ += [
    "volume", "extent", "bounding_box", "BoundingBox", "max_diameter", "center_of_mass", "side",
    "intensity_stats", "mean_intensity", "relative_intensity", "signal_class", "surrounding",
    "components", "Component", "count_components", "largest_component", "component_at",
    "asymmetry", "change", "dice", "iou", "hd95", "nsd", "evaluate", "bootstrap_ci",
    "benjamini_hochberg", "paired_wilcoxon", "shapes",
]
