"""The default kernel preamble: code every kernel runs once at start, before the first step.

Callers pass their own (for example the agent API) as ``Sandbox(preamble=[...])``; each entry is
one cell. A failing cell is logged by the kernel and does not stop it from starting.
"""

DEFAULT_PREAMBLE: tuple[str, ...] = (
    "import numpy as np",
    "import torch",
    "try:\n    import voxel_lib as vl\nexcept ImportError:\n    vl = None",
)
