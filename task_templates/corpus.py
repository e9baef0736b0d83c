"""Text corpus export for tokenizer training: what the language model reads and writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .catalog import CATEGORIES, Skip
from .example import Example
from .sampler import sample


def example_text(ex: Example) -> str:
    """The example as plain text: header, then each step's code and output."""
    parts = [ex.header()]
    for st in ex.steps:
        parts.append(st.code)
        if st.output:
            parts.append(st.output)
    return "\n".join(parts)


def write_corpus(path, n: int, seed: int = 0, cases: int = 8, resolution: float = 3.0) -> int:
    """Samples ``n`` examples (all categories, train and held-out phrasings) and writes their text."""
    from .cli import _cases
    rng = np.random.default_rng(seed)
    case_list = list(_cases(seed, cases, ["phantom", "atlas"], resolution))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with open(path, "w") as f:
        i = 0
        while written < n:
            case = case_list[i % len(case_list)]
            cat = CATEGORIES[i % len(CATEGORIES)]
            i += 1
            try:
                ex = sample(case, rng, cat, split="any", execute=(i % 4 == 0))
            except Skip:
                continue
            f.write(example_text(ex).replace("\x00", "") + "\n\x1e\n")
            written += 1
    return written
