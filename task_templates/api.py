"""The agent API: what generated code may call (see docs/agent_api.md).

Inside the kernel the namespace holds:

- ``vl`` — :mod:`voxel_lib` (morphometry, geometry, metrics);
- one variable per input volume, named after its acquisition (``t1``, ``flair``, ``t1_2`` for
  the second session's T1, ...), each a :class:`voxel_lib.Volume` in its native geometry;
- ``segment(*volumes)`` — the vision network: one mask per session among the arguments
  (a Volume for one session, a tuple in date order for several), on the grid of the session's
  first argument; what to segment is conveyed by the ``<MOD>`` marker the model writes after
  every volume argument (its hidden state there becomes the conditioning φ);
- ``encode(*volumes)`` — the vision encoder: appends one embedding per volume to the model's
  state (prints nothing, returns None);
- ``report(answer=None, measurements=None, volumes=None)`` — the structured result: answer
  text, measurements (name → :class:`voxel_lib.Quantity`, tuple or dict of them) and output
  volumes (name → Volume). When no answer was given and an output mask (a label volume) is
  empty, the answer is set to :func:`empty_mask_answer` ("not found: ..."), so a target that
  is not in the images is said so in words.

The implementation of ``segment``/``encode`` is pluggable (:class:`Backend`): the oracle returns
ground-truth masks, the agent runs the trained network.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import voxel_lib as vl

MOD = "<MOD>"
_MOD_RE = re.compile(r"\s*<MOD>")


def strip_mod(code: str) -> str:
    """The executable code: every ``<MOD>`` marker removed."""
    return _MOD_RE.sub("", code)


def count_mod(code: str) -> int:
    """Number of ``<MOD>`` markers in a code step."""
    return len(_MOD_RE.findall(code))


def _plain(v: Any):
    """A JSON-able form of a measurement value: (value, unit)."""
    if isinstance(v, vl.Quantity):
        return float(v), v.unit
    if isinstance(v, (tuple, list)) and v and all(isinstance(x, vl.Quantity) for x in v):
        return [float(x) for x in v], v[0].unit
    if isinstance(v, dict) and v and all(isinstance(x, vl.Quantity) for x in v.values()):
        units = {x.unit for x in v.values()}
        return {k: float(x) for k, x in v.items()}, units.pop() if len(units) == 1 else None
    if isinstance(v, vl.BoundingBox):
        return [float(s) for s in v.size], "mm"
    if isinstance(v, (int, float)):
        return float(v), None
    raise TypeError(f"report(): measurement of type {type(v).__name__} is not a number or Quantity")


def empty_mask_answer(names: Sequence[str]) -> str:
    """The answer ``report()`` gives by itself when the reported masks ``names`` are empty."""
    names = list(names)
    quoted = ", ".join(repr(str(n)) for n in names)
    if len(names) == 1:
        return f"not found: the mask {quoted} is empty"
    return f"not found: the masks {quoted} are empty"


def is_empty_mask(v: vl.Volume) -> bool:
    """A label volume (mask) without a single nonzero voxel."""
    return v.kind == "label" and not bool(v.tensor.any())


@dataclass
class Report:
    """What ``report()`` collected during a run."""

    answer: str | None = None
    measurements: dict[str, dict] = field(default_factory=dict)   # name -> {"value", "unit"}
    volumes: dict[str, vl.Volume] = field(default_factory=dict)


class Backend:
    """Vision backend interface. ``call`` is the index of the vision call in the program."""

    def segment(self, call: int, volumes: Sequence[vl.Volume], sessions: Sequence[int]) -> list[vl.Volume]:
        """One mask per distinct session (in session order), each on that session's first volume's grid."""
        raise NotImplementedError

    def encode(self, call: int, volumes: Sequence[vl.Volume], sessions: Sequence[int]) -> None:
        raise NotImplementedError


class Runtime:
    """Binds ``segment``, ``encode`` and ``report`` to a backend and to the input volumes.

    Args:
        backend: the vision backend.
        volumes: ``{name: (Volume, session index)}``.
    """

    def __init__(self, backend: Backend, volumes: dict[str, tuple[vl.Volume, int]]):
        self.backend = backend
        self.volumes = volumes
        self._session_of = {id(v): s for v, s in volumes.values()}
        self.calls = 0
        self.result = Report()

    def namespace(self) -> dict[str, Any]:
        """The globals generated code runs in."""
        ns = {"vl": vl, "segment": self.segment, "encode": self.encode, "report": self.report}
        ns.update({name: v for name, (v, _) in self.volumes.items()})
        return ns

    def _check(self, fn: str, vols) -> list[int]:
        if not vols:
            raise TypeError(f"{fn}() needs at least one input volume")
        sessions = []
        for v in vols:
            if not isinstance(v, vl.Volume) or id(v) not in self._session_of:
                raise TypeError(f"{fn}() takes the input volume variables (e.g. t1, flair), "
                                f"got {type(v).__name__}")
            sessions.append(self._session_of[id(v)])
        return sessions

    def segment(self, *volumes: vl.Volume):
        """Segments what the prompt asks for; one mask per session among the inputs."""
        sessions = self._check("segment", volumes)
        masks = self.backend.segment(self.calls, list(volumes), sessions)
        self.calls += 1
        return masks[0] if len(masks) == 1 else tuple(masks)

    def encode(self, *volumes: vl.Volume) -> None:
        """Encodes the volumes into the model's state (for questions answered in words)."""
        sessions = self._check("encode", volumes)
        self.backend.encode(self.calls, list(volumes), sessions)
        self.calls += 1

    def report(self, answer: str | None = None, measurements: dict | None = None,
               volumes: dict | None = None) -> None:
        """Records the final answer, measurements (with units) and output volumes."""
        if answer is not None:
            self.result.answer = str(answer)
        for name, v in (measurements or {}).items():
            value, unit = _plain(v)
            self.result.measurements[str(name)] = {"value": value, "unit": unit}
        for name, v in (volumes or {}).items():
            if not isinstance(v, vl.Volume):
                raise TypeError(f"report(): output volume {name!r} is a {type(v).__name__}, not a Volume")
            self.result.volumes[str(name)] = v
        empty = [str(k) for k, v in (volumes or {}).items() if is_empty_mask(v)]
        auto = None
        if self.result.answer is None and empty:  # nothing found, said in words (deterministic)
            auto = self.result.answer = empty_mask_answer(empty)
        parts = []
        if answer is not None:
            parts.append(f"answer: {answer}")
        parts += [f"{k} = {self.result.measurements[k]['value']!r} {self.result.measurements[k]['unit'] or ''}".rstrip()
                  for k in (measurements or {})]
        parts += [f"volume {k}: {v.shape} voxels" + (", empty" if str(k) in empty else "")
                  for k, v in (volumes or {}).items()]
        if auto is not None:
            parts.append(f"answer: {auto}")
        print("reported: " + "; ".join(parts))


class OracleBackend(Backend):
    """Returns the ground-truth masks recorded in an Example's vision calls."""

    def __init__(self, vision_calls):
        self.vision_calls = vision_calls

    def _call(self, call: int, kind: str):
        if call >= len(self.vision_calls) or self.vision_calls[call].kind != kind:
            raise RuntimeError(f"oracle: vision call {call} is not a {kind}() call in the program")
        return self.vision_calls[call]

    def segment(self, call, volumes, sessions):
        return list(self._call(call, "segment").targets)

    def encode(self, call, volumes, sessions):
        self._call(call, "encode")
