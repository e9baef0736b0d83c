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
- **Absent targets** (seeds/004: the model outputs an empty mask when the prompted target is not
  in the images). In segmentation, volume, location/territory and tissue removal, a share
  `ABSENT_PROB` (12 %) of the lesion draws describe a lesion the case does not have, worded by
  the same terms and held-out split as real targets: a class no lesion of any session answers
  to (its ontology parents, components and look-alikes count: a glioma with peritumoral edema
  answers to "edema"), a class that is present but on a side or in a lobe that no lesion
  answering to it reaches (judged from the masks and the metadata), or, on a lesion-free case,
  any lesion. The program is the normal one; its `segment` target is an empty mask on the grid
  of the call's first volume, so a volume is 0 mL, a segmentation reports an empty mask (and
  `report()` answers "not found: the mask 'lesion' is empty" by itself, docs/agent_api.md), and
  a location or territory question is answered `report(answer='not found')`. Lesion-free cases
  (20 % of synthetic subjects) take absent draws at the same rate. Extent, centre of mass,
  intensity, cropping, change and characterisation tasks never ask about an absent target (their
  library calls are undefined on an empty mask).

Commands: `voxelprompt tasks sample --n 5`, `voxelprompt tasks stats`, `voxelprompt tasks check`,
`voxelprompt tasks corpus --out corpus.txt`. The functions the programs call are documented in
`docs/agent_api.md`.

"""


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0] if argv else "docs/tasks.md")
    rng = np.random.default_rng(7)
    cases = list(_cases(7, 6, ["phantom"], 3.0))  # the first three have no lesion
    parts = [INTRO]
    for cat in CATEGORIES:
        keys = TEMPLATE_GROUPS[cat]
        n_t = sum(len(T[k]) for k in keys)
        n_h = sum(sum(heldout_flags(T[k])) for k in keys)
        forms = sum(count_forms(t) for k in keys for t in T[k])
        parts.append(f"## {cat.replace('_', ' ')}\n\n{n_t} templates ({n_h} held out), {forms:,} surface forms "
                     "before ROI names.\n")
        shown, i, absent = 0, 0, 0
        while shown < 3 and i < 60:
            case = cases[i % len(cases)]
            i += 1
            try:
                ex = sample(case, rng, cat, split="train")
            except Skip:
                continue
            if "absent" in ex.meta:  # at most one absent-target example per category
                if absent:
                    continue
                absent += 1
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
