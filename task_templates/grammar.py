"""A small prompt grammar: alternatives, optional parts, named slots, held-out phrasings, typos.

Template syntax:

- ``{a|b|c}`` — one alternative (alternatives may nest and contain slots);
- ``[text]`` — optional text (kept with probability 1/2);
- ``{name}`` — a named slot filled from the ``slots`` mapping.

Held-out phrasing: a fixed share of the alternatives in every choice (and of every synonym
list, see :func:`pick`) is reserved for evaluation, by a stable hash of its text, so that
generalisation to unseen phrasings can be measured. Each choice keeps at least one training
alternative, and at least one held-out alternative where it has three or more.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

HELDOUT_SHARE = 0.2
TYPO_RATE = 0.03
SPLITS = ("train", "eval", "any")


def _h(text: str) -> float:
    return int(hashlib.sha1(text.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def heldout_flags(options: list[str]) -> list[bool]:
    """Which of ``options`` are reserved for evaluation (deterministic)."""
    if len(options) < 3:
        return [False] * len(options)
    scores = [_h(o) for o in options]
    flags = [s < HELDOUT_SHARE for s in scores]
    if all(flags):
        flags[int(np.argmax(scores))] = False
    if not any(flags):
        flags[int(np.argmin(scores))] = True
    return flags


def pick(options: list[str], rng: np.random.Generator, split: str = "train") -> str:
    """One option for ``split``: "train" avoids held-out options, "eval" prefers them, "any" mixes."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}")
    if split == "any" or len(options) == 1:
        return options[int(rng.integers(len(options)))]
    flags = heldout_flags(options)
    pool = [o for o, f in zip(options, flags) if f == (split == "eval")] or options
    return pool[int(rng.integers(len(pool)))]


def _split_top(body: str, sep: str = "|") -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in body:
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def _match(text: str, i: int) -> int:
    depth = 0
    for j in range(i, len(text)):
        if text[j] in "{[":
            depth += 1
        elif text[j] in "}]":
            depth -= 1
            if depth == 0:
                return j
    raise ValueError(f"unbalanced template: {text!r}")


def expand(template: str, slots: dict[str, str], rng: np.random.Generator, split: str = "train") -> str:
    """Expands a template (see the module docstring) and tidies whitespace."""
    text = _expand(template, slots, rng, split)
    text = re.sub(r"\s+", " ", text).strip()
    return re.sub(r"\s+([?,.)])", r"\1", text)


def _expand(template: str, slots: dict[str, str], rng: np.random.Generator, split: str) -> str:
    out, i = [], 0
    while i < len(template):
        ch = template[i]
        if ch in "{[":
            j = _match(template, i)
            body = template[i + 1:j]
            if ch == "[":
                if rng.random() < 0.5:
                    out.append(_expand(body, slots, rng, split))
            elif re.fullmatch(r"[a-z_0-9]+", body):
                if body not in slots:
                    raise KeyError(f"template slot {{{body}}} has no value")
                out.append(slots[body])
            else:
                out.append(_expand(pick(_split_top(body), rng, split), slots, rng, split))
            i = j + 1
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def count_forms(template: str) -> int:
    """Number of distinct surface forms a template can produce, slots counted once."""
    total, i = 1, 0
    while i < len(template):
        ch = template[i]
        if ch in "{[":
            j = _match(template, i)
            body = template[i + 1:j]
            if ch == "[":
                total *= 1 + count_forms(body)
            elif not re.fullmatch(r"[a-z_0-9]+", body):
                total *= sum(count_forms(p) for p in _split_top(body))
            i = j + 1
        else:
            i += 1
    return total


ABBREV_RATE = 0.03


def abbreviate(text: str, rng: np.random.Generator, rate: float = ABBREV_RATE) -> str:
    """With probability ``rate``, one common abbreviation (left -> lt, hippocampus -> hippo, ...)."""
    from .terms import ABBREVIATIONS
    if rng.random() >= rate:
        return text
    cands = [w for w in ABBREVIATIONS if re.search(rf"\b{re.escape(w)}\b", text)]
    if not cands:
        return text
    w = cands[int(rng.integers(len(cands)))]
    return re.sub(rf"\b{re.escape(w)}\b", ABBREVIATIONS[w], text, count=1)


def typo(text: str, rng: np.random.Generator, rate: float = TYPO_RATE) -> str:
    """With probability ``rate``, one realistic typo in one longer word (swap, drop or double)."""
    if rng.random() >= rate:
        return text
    words = text.split(" ")
    cand = [k for k, w in enumerate(words) if len(w) >= 5 and w.isalpha()]
    if not cand:
        return text
    k = cand[int(rng.integers(len(cand)))]
    w = words[k]
    p = int(rng.integers(1, len(w) - 2))
    kind = int(rng.integers(3))
    if kind == 0:
        w = w[:p] + w[p + 1] + w[p] + w[p + 2:]
    elif kind == 1:
        w = w[:p] + w[p + 1:]
    else:
        w = w[:p] + w[p] + w[p:]
    words[k] = w
    return " ".join(words)
