"""Writes docs/tasks.md: every category with three sampled prompts and their programs.

Run: ``python -m task_templates.render_docs [docs/tasks.md]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from .catalog import CATEGORIES, T, TEMPLATE_GROUPS, Skip
from .cli import _cases
from .grammar import count_forms, heldout_flags
from .sampler import sample

INTRO = """# Tasks: the catalog, prompts and ground-truth programs

`task_templates` holds the 17 task categories of seeds/004 Table 1. For each category it has
prompt templates (alternatives `{a|b}`, optional parts `[...]`, slots `{roi}`; about 20 % of the
alternatives and templates are held out for evaluation), ROI terminology with synonyms, and a
builder that writes the ground-truth program for a synthetic case: code steps with a `<MOD>`
marker after every volume argument of a vision call, the output each step prints, the truth
masks of every `segment` call, and the expected results computed directly from the truth.

Every example is verified when it is sampled (the oracle check): its program is run with
`segment` returning the true masks, and its reported answer, measurements (within 0.1 %) and
output volumes (voxel for voxel) must equal the expected ones. `voxelprompt tasks check --n 2000`
runs this over both anatomy sources; the tests run a smaller version.

Design choices beyond the paper:

- **Signal, enhancement and diffusion restriction are answered by code**, not by the language
  model reading an image embedding: the program segments the lesion and compares its signal
  with a 3 mm shell around it (`vl.signal_class`, `vl.relative_intensity`), so the answer is
  auditable. Enhancement: post/pre-contrast ratio of (lesion / surroundings) above 1.15.
  Restriction: hyperintense on DWI and hypointense on ADC. Location and vascular territory use
  `encode` (no atlas is available inside the kernel), as in the paper.
- Lesion descriptions use a parent term of the ontology (glioma → neoplasm → mass → lesion)
  only when, with the chosen adjectives, it singles out the target among the case's lesions.

Commands: `voxelprompt tasks sample --n 5`, `voxelprompt tasks stats`, `voxelprompt tasks check`,
`voxelprompt tasks corpus --out corpus.txt`. The functions the programs call are documented in
`docs/agent_api.md`.

"""


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0] if argv else "docs/tasks.md")
    rng = np.random.default_rng(7)
    cases = list(_cases(7, 3, ["phantom"], 3.0))
    parts = [INTRO]
    for cat in CATEGORIES:
        keys = TEMPLATE_GROUPS[cat]
        n_t = sum(len(T[k]) for k in keys)
        n_h = sum(sum(heldout_flags(T[k])) for k in keys)
        forms = sum(count_forms(t) for k in keys for t in T[k])
        parts.append(f"## {cat.replace('_', ' ')}\n\n{n_t} templates ({n_h} held out), {forms:,} surface forms "
                     "before ROI names.\n")
        shown, i = 0, 0
        while shown < 3 and i < 40:
            case = cases[i % len(cases)]
            i += 1
            try:
                ex = sample(case, rng, cat, split="train")
            except Skip:
                continue
            shown += 1
            vols = ", ".join(v.line() for v in ex.volumes)
            code = "\n\n".join(s.code + ("\n# " + s.output.strip().replace("\n", "\n# ") if s.output.strip() else "")
                               for s in ex.steps)
            parts.append(f"**“{ex.prompt}”** — inputs: {vols}\n\n```\n{code}\n```\n")
    out.write_text("\n".join(parts))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
