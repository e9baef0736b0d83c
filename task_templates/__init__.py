"""task_templates: the task catalog (seeds/004 Table 1), prompt grammar and ground-truth programs.

``sample(case, rng, category)`` turns a synthetic case into an :class:`Example` (prompt, input
volumes, code steps with ``<MOD>`` markers, their printed outputs, vision-call targets and the
expected results). See ``docs/tasks.md`` and ``docs/agent_api.md``.
"""

from .api import MOD, Backend, OracleBackend, Report, Runtime, count_mod, strip_mod
from .case import ROI, Acquisition, Case, Session
from .catalog import CATEGORIES, Skip
from .example import Example, Step, VisionCall, VolumeInfo
from .sampler import CheckFailure, check, run_program, sample

__all__ = ["MOD", "Backend", "OracleBackend", "Report", "Runtime", "count_mod", "strip_mod", "ROI",
           "Acquisition", "Case", "Session", "CATEGORIES", "Skip", "Example", "Step", "VisionCall",
           "VolumeInfo", "CheckFailure", "check", "run_program", "sample"]
