"""The training/evaluation example: what a task sampler produces and what the model learns from.

An :class:`Example` is one request with its inputs and the ground-truth program. The program is
a list of :class:`Step` s; each step's ``code`` may contain the conditioning marker ``<MOD>``
right after every volume argument of a vision call (``segment(t1<MOD>, flair<MOD>)``), as in
seeds/004 A.1. ``vision_calls`` lists those calls in program order, with the targets the vision
network is trained toward, so training can apply the live network without re-running the code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MOD = "<MOD>"


@dataclass
class VolumeInfo:
    """One input volume as the model sees it: a variable name and a metadata line."""

    name: str                  # the kernel variable, e.g. "t1", "flair", "t1_2"
    modality: str              # "T1w", "T2w", "FLAIR", "PD", "DWI", "ADC", "GRE", "SWI", "T1c", "CT"
    date: str | None = None    # ISO date of the session, e.g. "2021-03-01"
    session: int = 0           # session index in date order (0-based)
    volume: Any = None         # voxel_lib.Volume (None in text-only corpora)

    def line(self) -> str:
        """The metadata line placed in the model's initial state."""
        d = f", {self.date}" if self.date else ""
        return f"{self.name}: {self.modality}{d}"


@dataclass
class VisionCall:
    """One ``segment``/``encode`` call in the program, in the order of its ``<MOD>`` markers."""

    kind: str                  # "segment" or "encode"
    step: int                  # index of the Step that makes the call
    volumes: list[str]         # argument variable names, one <MOD> each, in order
    targets: list[Any] = field(default_factory=list)  # segment: one truth mask per session (Volume)
    roi: str = ""              # the ROI description the call refers to (for per-structure scores)


@dataclass
class Step:
    """One code step and the output it prints when run on the ground truth."""

    code: str                  # Python with <MOD> markers
    output: str = ""           # expected printed output (fed back to the model as input tokens)
    target: bool = True        # False: context the model is not trained to write (a faulty step
    #                            it recovers from, voxelprompt/recovery.py)


@dataclass
class Example:
    """A sampled task: prompt, inputs, ground-truth program and expected results."""

    category: str
    prompt: str
    volumes: list[VolumeInfo]
    steps: list[Step]
    vision_calls: list[VisionCall] = field(default_factory=list)
    answer: str | None = None                  # canonical answer text (QA tasks)
    measurements: dict[str, Any] = field(default_factory=dict)   # name -> {"value", "unit"}
    outputs: dict[str, Any] = field(default_factory=dict)        # name -> Volume (crop/removal tasks)
    meta: dict[str, Any] = field(default_factory=dict)           # template id, held-out flag, roi, ...
    anatomy: dict[int, Any] = field(default_factory=dict)        # session -> Volume of anatomy classes
    #   (training targets of the vision network's anatomy heads; voxelprompt.anatomy_classes)

    def header(self) -> str:
        """The model's initial state text: the prompt plus one line per volume."""
        return self.prompt + "\n" + "\n".join(v.line() for v in self.volumes)
