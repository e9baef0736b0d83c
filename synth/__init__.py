"""synth: synthetic subjects on real anatomy for training and testing VoxelPrompt.

Anatomy (:mod:`synth.anatomy`, :mod:`synth.phantom`), variability (:mod:`synth.deform`), images
(:mod:`synth.contrast`, :mod:`synth.artifacts`), lesions (:mod:`synth.lesions`), clinical scan
geometries (:mod:`synth.geometry`), subjects with dated sessions (:mod:`synth.subject`) and their
BIDS output (:mod:`synth.bids`). Everything is deterministic from a seed. See ``docs/synth.md``.

Example:
    >>> from synth import generate_subject
    >>> s = generate_subject(7, anatomy="phantom", resolution=3.0, protocols=[["t1w", "flair"]])
    >>> sorted(s.sessions[0].acquisitions)
    ['flair', 't1w']
"""

from .anatomy import LOBES, TERRITORIES, TISSUES, Anatomy, AtlasNotInstalledError, template
from .subject import Session, Subject, generate_subject

__all__ = ["Anatomy", "AtlasNotInstalledError", "LOBES", "TERRITORIES", "TISSUES", "Session", "Subject",
           "generate_subject", "template"]
