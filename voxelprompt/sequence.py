"""The token layout of a request, shared by training (teacher forcing) and the agent (generation).

One request is the sequence::

    <s> prompt+volume lines </s>
    { code_i <ENDSTEP>  <OUT> [ε × n_i] output_i </s> }  for every step i
    <STOP>

``code_i`` contains a ``<MOD>`` after every vision-call argument; the language model's hidden
state at each ``<MOD>`` position gives φ for that volume. ``ε × n_i`` are embedding slots (not
tokens) holding the encoder's output for the ``encode`` calls of step i, one per volume
argument, in call order. ``</s>`` closes every input turn (prompt and output), so the model
always starts writing code right after ``</s>``.

Targets (teacher-forced cross-entropy) are the code tokens, ``<ENDSTEP>`` and ``<STOP>``; the
prompt, ``<OUT>``, outputs and ``</s>`` are inputs only, and so is the code of a step marked
``target=False`` (a faulty step in an error-recovery example, voxelprompt/recovery.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .tokenizer import Tokenizer

IGNORE = -100
MAX_OUTPUT_TOKENS = 256


def header_ids(tok: Tokenizer, header: str) -> list[int]:
    """The initial state: ``<s> header </s>``."""
    return [tok.bos_id, *tok.encode(header), tok.eos_id]


def output_ids(tok: Tokenizer, output: str, max_tokens: int = MAX_OUTPUT_TOKENS) -> list[int]:
    """The tokens of one execution output (after ``<OUT>`` and the ε slots), closed by ``</s>``.

    Outputs longer than ``max_tokens`` keep their first ``max_tokens`` tokens.
    """
    return [*tok.encode(output)[:max_tokens], tok.eos_id]


@dataclass
class CallSlots:
    """Where one vision call sits in the sequence."""

    kind: str                      # "segment" or "encode"
    volumes: list[str]             # argument names, one <MOD> each
    mods: list[int]                # indices into TokenSequence.mod_positions, one per volume
    targets: list[Any] = field(default_factory=list)   # segment: one truth mask per session
    eps_positions: list[int] = field(default_factory=list)  # encode: the ε slots, one per volume
    roi: str = ""                  # what the call segments (task_templates.VisionCall.roi)


@dataclass
class TokenSequence:
    """A tokenised example: inputs, next-token targets and vision-call slots.

    ``labels[t]`` is the target of the logits at position ``t`` (i.e. ``ids[t + 1]`` when that
    token is a target, else ``IGNORE``). ε slots hold ``pad`` in ``ids``; their embeddings are
    replaced by the encoder's output.
    """

    ids: torch.Tensor              # (L,) int64
    labels: torch.Tensor           # (L,) int64
    mod_positions: torch.Tensor    # (M,) int64, program order
    calls: list[CallSlots]
    volumes: dict[str, Any]        # name -> voxel_lib.Volume
    sessions: dict[str, int]       # name -> session index
    anatomy: dict[int, Any] = field(default_factory=dict)   # session -> anatomy targets (training)
    _anatomy_cache: dict = field(default_factory=dict, repr=False)   # targets on the working grids

    def __len__(self) -> int:
        return int(self.ids.numel())

    @property
    def eps_blocks(self) -> list[tuple[int, list[int]]]:
        """``(first slot position, call indices)`` for each step that has ε slots, in order."""
        blocks: list[tuple[int, list[int]]] = []
        end = -1
        for ci, c in enumerate(self.calls):
            if not c.eps_positions:
                continue
            if c.eps_positions[0] == end + 1 and blocks:   # same step: slots are contiguous
                blocks[-1][1].append(ci)
            else:
                blocks.append((c.eps_positions[0], [ci]))
            end = c.eps_positions[-1]
        return blocks


def build_sequence(example, tok: Tokenizer, max_output_tokens: int = MAX_OUTPUT_TOKENS) -> TokenSequence:
    """Lays out an :class:`task_templates.example.Example` as a :class:`TokenSequence`.

    Raises:
        ValueError: when the ``<MOD>`` markers in a step's code do not match its vision calls.
    """
    ids: list[int] = header_ids(tok, example.header())
    is_target: list[bool] = [False] * len(ids)
    mods: list[int] = []
    calls: list[CallSlots] = []
    by_step: dict[int, list] = {}
    for vc in example.vision_calls:
        by_step.setdefault(vc.step, []).append(vc)
    if by_step and max(by_step) >= len(example.steps):
        raise ValueError(f"a vision call refers to step {max(by_step)}, but the example has "
                         f"{len(example.steps)} steps")

    def push(tokens: list[int], target: bool) -> None:
        ids.extend(tokens)
        is_target.extend([target] * len(tokens))

    for si, step in enumerate(example.steps):
        code = tok.encode(step.code)
        step_mods = [len(ids) + j for j, t in enumerate(code) if t == tok.mod_id]
        step_calls = by_step.get(si, [])
        need = sum(len(vc.volumes) for vc in step_calls)
        if len(step_mods) != need:
            raise ValueError(f"step {si} has {len(step_mods)} <MOD> markers but its vision calls take "
                             f"{need} volume arguments")
        push(code + [tok.endstep_id], step.target)
        push([tok.out_id], False)
        for vc in step_calls:
            first = len(mods)
            mods.extend(step_mods[:len(vc.volumes)])
            step_mods = step_mods[len(vc.volumes):]
            slots = CallSlots(vc.kind, list(vc.volumes), list(range(first, len(mods))), list(vc.targets),
                              roi=vc.roi)
            if vc.kind == "encode":
                slots.eps_positions = list(range(len(ids), len(ids) + len(vc.volumes)))
                push([tok.pad_id] * len(vc.volumes), False)
            elif vc.kind != "segment":
                raise ValueError(f"unknown vision call kind {vc.kind!r}")
            calls.append(slots)
        push(output_ids(tok, step.output, max_output_tokens), False)
    push([tok.stop_id], True)

    t = torch.tensor(ids, dtype=torch.long)
    labels = torch.full_like(t, IGNORE)
    tgt = torch.tensor(is_target[1:], dtype=torch.bool)
    labels[:-1] = torch.where(tgt, t[1:], torch.full_like(t[1:], IGNORE))
    vols = {v.name: v.volume for v in example.volumes}
    sessions = {v.name: v.session for v in example.volumes}
    return TokenSequence(t, labels, torch.tensor(mods, dtype=torch.long), calls, vols, sessions,
                         dict(getattr(example, "anatomy", None) or {}))
