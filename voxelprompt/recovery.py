"""Error-recovery training examples: a faulty step, its error, then the corrected step.

The agent feeds an execution error back to the model (``NameError: name 'x' is not defined``),
but ground-truth programs never fail, so a model trained only on them has never seen what comes
after an error and writes fragments until the step limit. :func:`with_recovery` rewrites an
example so that one step first fails, in one of the two ways a small model actually fails:

``typo``
    step i refers to a misspelt name (``flair`` for ``flair_2``, ``lesion_mask`` for
    ``lesion``); the error follows, then the original step i.
``rename``
    an earlier step j defined the value under another name than the program uses later
    (``left_hippocampus_hippocampus``); step i, written with the usual name, fails, and the
    corrected step i and every later step use the name that was actually defined.

The faulty step (and in ``rename`` the step that chose the odd name) are context, not targets:
the model learns to read the error and the names in its own earlier code, never to make the
mistake. Only the first statement of a step is made to fail, so nothing of the step has run
(no output, no assignment) when the error is raised, exactly as in the kernel.
"""

from __future__ import annotations

import ast
import builtins
import keyword
import re
from dataclasses import replace

import numpy as np

from task_templates.example import MOD, Example, Step, VisionCall

#: names the kernel defines besides the inputs (sandbox.DEFAULT_PREAMBLE, voxelprompt/kernel_api.py)
KERNEL_NAMES = frozenset({"vl", "np", "torch", "segment", "encode", "report"})
_SUFFIXES = ("_mask", "_vol", "_1", "s", "_seg", "_mm", "_volume", "_lesion")


def _names(code: str) -> list[tuple[str, str, int, int, int]]:
    """``(name, "load"|"store", statement index, start, end)`` of every ``Name`` in ``code``.

    Offsets index the original code (with its ``<MOD>`` markers); statements are the top-level
    statements of the step, in order.
    """
    stripped, keep = [], []          # map each character of the stripped code to its original offset
    i = 0
    while i < len(code):
        if code.startswith(MOD, i):
            i += len(MOD)
            continue
        stripped.append(code[i])
        keep.append(i)
        i += 1
    keep.append(len(code))
    text = "".join(stripped)
    line_start = [0]
    for line in text.splitlines(keepends=True):
        line_start.append(line_start[-1] + len(line))
    tree = ast.parse(text)
    out = []
    for si, stmt in enumerate(tree.body):
        for node in ast.walk(stmt):
            if isinstance(node, ast.Name):
                a = line_start[node.lineno - 1] + node.col_offset
                b = line_start[node.end_lineno - 1] + node.end_col_offset
                ctx = "store" if isinstance(node.ctx, ast.Store) else "load"
                out.append((node.id, ctx, si, keep[a], keep[b - 1] + 1))
    return sorted(out, key=lambda t: t[3])


def _rename(code: str, step_names: list, old: str, new: str) -> str:
    """``code`` with every ``Name`` node ``old`` (not strings, attributes or keywords) renamed.

    ``step_names`` is ``_names(code)``.
    """
    spans = [(a, b) for n, _, _, a, b in step_names if n == old]
    for a, b in reversed(spans):
        code = code[:a] + new + code[b:]
    return code


def misspell(name: str, rng: np.random.Generator, taken: set[str]) -> str | None:
    """A plausible wrong spelling of ``name`` that is not in ``taken`` (None if none is found)."""
    parts = name.split("_")
    cands = [name + s for s in _SUFFIXES]
    if len(parts) > 1:
        cands += ["_".join(parts[:-1]), name + "_" + parts[-1], "_".join(parts[1:])]
        if parts[-1].isdigit():        # a volume name: t1_2 -> t1, t1_3, t12
            cands += ["_".join(parts[:-1]) + parts[-1],
                      "_".join(parts[:-1]) + "_" + str((int(parts[-1]) % 3) + 1)]
    if name.endswith("s"):
        cands.append(name[:-1])
    ok = [c for c in dict.fromkeys(cands)
          if c.isidentifier() and not keyword.iskeyword(c) and c not in taken
          and not hasattr(builtins, c) and c not in KERNEL_NAMES]
    return ok[int(rng.integers(len(ok)))] if ok else None


def _error(name: str) -> str:
    """The output the agent feeds back for an undefined name (voxelprompt/agent.py's format)."""
    return f"NameError: name '{name}' is not defined\n"


def _defined(example: Example, names: list[list]) -> list[set[str]]:
    """For each step, the names defined before it (inputs and earlier assignments)."""
    known = {v.name for v in example.volumes}
    out = []
    for step_names in names:
        out.append(set(known))
        known |= {n for n, ctx, *_ in step_names if ctx == "store"}
    return out


def _has_encode(example: Example, step: int) -> bool:
    return any(c.kind == "encode" and c.step == step for c in example.vision_calls)


def with_recovery(example: Example, rng: np.random.Generator, kind: str | None = None) -> Example | None:
    """``example`` with one failing step and its recovery (see the module docstring).

    Args:
        kind: ``"typo"``, ``"rename"`` or None (either, whichever the program allows).

    Returns:
        A new :class:`Example` (``meta["recovery"]`` names the kind), or None when the program has
        no step that can fail this way (e.g. a single step that names no variable).
    """
    kinds = [kind] if kind else (["typo", "rename"] if rng.random() < 0.5 else ["rename", "typo"])
    names = [_names(s.code) for s in example.steps]     # parsed once, shared by both kinds
    for k in kinds:
        ex = (_typo if k == "typo" else _rename_case)(example, names, rng)
        if ex is not None:
            ex.meta = {**example.meta, "recovery": k}      # a new dict: the source example keeps its own
            return ex
    return None


def _all_names(example: Example, names: list[list]) -> set[str]:
    return {v.name for v in example.volumes} | {n for step_names in names for n, *_ in step_names}


def _typo(example: Example, names: list[list], rng: np.random.Generator) -> Example | None:
    defined = _defined(example, names)
    cands = []                         # (step, start, end, name): a load in the first statement
    for i, step_names in enumerate(names):
        if _has_encode(example, i):
            continue
        for n, ctx, si, a, b in step_names:
            if si == 0 and ctx == "load" and n in defined[i]:
                cands.append((i, a, b, n))
    if not cands:
        return None
    i, a, b, n = cands[int(rng.integers(len(cands)))]
    wrong = misspell(n, rng, _all_names(example, names))
    if wrong is None:
        return None
    code = example.steps[i].code
    faulty = Step(code[:a] + wrong + code[b:], _error(wrong), target=False)
    return _insert(example, i, faulty, example.steps)


def _rename_case(example: Example, names: list[list], rng: np.random.Generator) -> Example | None:
    steps = example.steps
    stores: dict[str, int] = {}        # name -> the step that first assigns it
    for j, step_names in enumerate(names):
        for n, ctx, *_ in step_names:
            if ctx == "store":
                stores.setdefault(n, j)
    cands = []                         # (defining step j, failing step i, name)
    for n, j in stores.items():
        for i in range(j + 1, len(steps)):
            loads = [(si, ctx) for m, ctx, si, *_ in names[i] if m == n]
            if not loads:
                continue
            if loads[0] == (0, "load") and not _has_encode(example, i):
                cands.append((j, i, n))
            break                      # only the first later step that uses the name can fail
    if not cands:
        return None
    j, i, n = cands[int(rng.integers(len(cands)))]
    odd = misspell(n, rng, _all_names(example, names))
    if odd is None:
        return None
    new_steps = [replace(s, code=_rename(s.code, names[k], n, odd)) if k >= j else s
                 for k, s in enumerate(steps)]
    new_steps[j] = replace(new_steps[j], target=False)    # the odd name is context, not taught
    faulty = Step(steps[i].code, _error(n), target=False)
    return _insert(example, i, faulty, new_steps)


_ARG = re.compile(r"([A-Za-z_]\w*)" + re.escape(MOD))


def _insert(example: Example, i: int, faulty: Step, steps: list[Step]) -> Example:
    """``steps`` with ``faulty`` inserted before step i; vision calls re-indexed.

    The faulty step's segment calls appear with no targets (they never ran); its ``<MOD>`` s
    still give φ positions, so the layout matches what the agent produced.
    """
    written, pos, calls = _ARG.findall(faulty.code), 0, []
    for c in example.vision_calls:
        if c.step == i:
            k = len(c.volumes)
            vols = written[pos:pos + k] if len(written) >= pos + k else list(c.volumes)
            pos += k
            calls.append(VisionCall(c.kind, i, vols, [], c.roi))
        calls.append(replace(c, step=c.step + 1) if c.step >= i else c)
    calls.sort(key=lambda c: c.step)
    return replace(example, steps=steps[:i] + [faulty] + steps[i:], vision_calls=calls)

