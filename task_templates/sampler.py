"""The sampler: (task, case, rng) -> :class:`~task_templates.example.Example`, and the oracle check.

:func:`sample` asks a category builder for a draft (prompt, program, vision calls, expected
results computed directly from the truth), then runs the program in-process with the oracle
backend (``segment`` returns the true masks) to record every step's printed output, and checks
that the program's reported results reproduce the expected ones: text exactly, numbers within
0.1 %, output volumes voxel for voxel. The program is our own template code, so running it
in-process is safe; generated code only ever runs in the sandbox.
"""

from __future__ import annotations

import contextlib
import io
import math
from dataclasses import dataclass

import numpy as np
import torch

import voxel_lib as vl

from .api import OracleBackend, Runtime, strip_mod
from .case import Case
from .catalog import BUILDERS, CATEGORIES, Builder, Draft, PromptOnly, Skip
from .example import Example, Step, VolumeInfo
from .grammar import abbreviate, typo

MAX_OUTPUT = 2000
REL_TOL = 1e-3


class CheckFailure(AssertionError):
    """The program's results differ from the expected ones."""


@dataclass
class Run:
    outputs: list[str]
    report: object


def run_program(steps: list[str], case: Case, vision_calls) -> Run:
    """Executes a program in-process with the oracle backend; returns each step's printed output."""
    vols = {a.name: (a.volume, k) for k, s in enumerate(case.sessions) for a in s.acquisitions}
    rt = Runtime(OracleBackend(vision_calls), vols)
    ns = rt.namespace()
    outs = []
    for code in steps:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            exec(compile(strip_mod(code), "<step>", "exec"), ns)
        text = buf.getvalue()
        if len(text) > MAX_OUTPUT:
            text = text[:MAX_OUTPUT] + "\n... [output truncated]"
        outs.append(text)
    return Run(outs, rt.result)


def _close(a, b) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    a, b = float(a), float(b)
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= REL_TOL * max(abs(a), abs(b)) + 1e-9


def check(draft: Draft, report) -> None:
    """Raises :class:`CheckFailure` unless the report reproduces the draft's expected results."""
    if draft.answer is not None and report.answer != draft.answer:
        raise CheckFailure(f"answer {report.answer!r} != expected {draft.answer!r}")
    for name, (value, unit) in draft.measurements.items():
        got = report.measurements.get(name)
        if got is None:
            raise CheckFailure(f"measurement {name!r} not reported")
        if unit is not None and got["unit"] != unit:
            raise CheckFailure(f"{name}: unit {got['unit']!r} != {unit!r}")
        if not _close(got["value"], value):
            raise CheckFailure(f"{name}: {got['value']} != expected {value}")
    for name, vol in draft.outputs.items():
        got = report.volumes.get(name)
        if got is None:
            raise CheckFailure(f"output volume {name!r} not reported")
        if not got.same_grid(vol) or not torch.equal(got.tensor, vol.tensor.to(got.tensor.dtype)):
            raise CheckFailure(f"output volume {name!r} differs from the expected one")


def sample_prompt(case: Case, rng: np.random.Generator, category: str, split: str = "train",
                  max_tries: int = 30, typos: bool = True) -> str:
    """Only the prompt of a sampled example (fast: no truth masks, no program run)."""
    last = None
    for _ in range(max_tries):
        try:
            BUILDERS[category](Builder(case, rng, split, prompt_only=True))
        except PromptOnly as p:
            return typo(abbreviate(p.prompt, rng), rng) if typos else p.prompt
        except Skip as exc:
            last = exc
            if exc.final:
                break
    raise Skip(f"{category}: {last}")


def sample(case: Case, rng: np.random.Generator, category: str | None = None, split: str = "train",
           max_tries: int = 30, typos: bool = True, execute: bool = True) -> Example:
    """Samples one example of ``category`` (random if None) on ``case``.

    With ``execute=False`` the program is not run (no step outputs, no check): for prompt
    statistics only.

    Raises:
        Skip: when the case cannot support the category after ``max_tries`` attempts.
        CheckFailure: when the program does not reproduce the expected results (a bug).
    """
    last = None
    for _ in range(max_tries):
        cat = category or CATEGORIES[int(rng.integers(len(CATEGORIES)))]
        b = Builder(case, rng, split)
        try:
            try:
                draft = BUILDERS[cat](b)
            except vl.GeometryError as exc:  # the expected result is undefined on these grids (e.g. a
                raise Skip(f"{cat}: {exc}")   # lesion's shell outside another contrast's field of view)
        except Skip as exc:
            last = exc
            if exc.final and category is not None:
                break  # retrying would bias the category's draws on this case (Skip.final)
            continue
        if execute:
            run = run_program(draft.steps, case, draft.vision_calls)
            check(draft, run.report)
        else:
            run = Run([""] * len(draft.steps), None)
        prompt = typo(abbreviate(draft.prompt, rng), rng) if typos else draft.prompt
        infos = [VolumeInfo(a.name, a.modality, s.date if len(case.sessions) > 1 else s.date, k, a.volume)
                 for k, s in enumerate(case.sessions) for a in s.acquisitions]
        meas = {k: {"value": v, "unit": u} for k, (v, u) in draft.measurements.items()}
        meta = dict(draft.meta, templates=b.template_ids, split=split, source=case.source,
                    rois=[c.roi for c in draft.vision_calls if c.roi])
        return Example(cat, prompt, infos, [Step(c, o) for c, o in zip(draft.steps, run.outputs)],
                       draft.vision_calls, draft.answer, meas, dict(draft.outputs), meta)
    raise Skip(f"{category or 'any category'}: {last}")
