"""On-the-fly training data: synthetic subjects -> task examples, in worker processes.

Each worker draws subjects from ``synth.subject.generate_subject`` (atlas and phantom anatomy,
random or rich protocols, 1–3 sessions), turns each into a task case and samples several
examples from it (generation of a subject is the expensive part, so it is amortised), and puts
them on a bounded queue. Seeds are derived from (base seed, worker, counter): a run is
reproducible for a given number of workers.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import traceback
from dataclasses import dataclass

import numpy as np

#: a two-session multi-contrast protocol: makes the DWI/ADC, T1c and longitudinal tasks possible
RICH_PROTOCOL = [["t1w", "t2w", "flair", "t1c", "dwi", "adc"], ["t1w", "flair"]]


@dataclass
class DataConfig:
    """What the generator makes."""

    resolution: float = 2.0            # synthesis grid (mm); training uses the model's floor (cpu: 3 mm)
    atlas_share: float = 0.5           # share of subjects on the real atlas anatomy
    rich_share: float = 0.5            # share of subjects with RICH_PROTOCOL
    examples_per_subject: int = 8
    categories: tuple[str, ...] | None = None   # restrict to these categories
    split: str = "train"               # phrasing split ("train" keeps held-out phrasing out)
    max_acquisitions: int = 4          # per session, to bound a training step's cost
    rich_max_acquisitions: int | None = None   # cap on RICH_PROTOCOL sessions (None: all 6)
    sparsify_prob: float = 0.5         # seeds/004 B.2 random sparsification
    skull_strip_prob: float = 0.25     # share of MR images skull-stripped (real scans often come preprocessed)
    strict: bool = False               # raise on a failed draw instead of skipping it
    recovery_prob: float = 0.0         # share of examples rewritten with a failing step and its
    #                                    recovery (voxelprompt/recovery.py); training sets 0.15
    anatomy_targets: bool = False      # attach each session's anatomy classes (Example.anatomy) for
    #                                    the vision network's anatomy heads (voxelprompt/anatomy_classes.py)


def rich_protocol(rng: np.random.Generator, max_acquisitions: int | None = None) -> list[list[str]]:
    """:data:`RICH_PROTOCOL`, its first session cut to at most ``max_acquisitions`` images.

    The cut keeps T1w and adds random groups of the rest (DWI and ADC travel together, so
    diffusion tasks stay possible): a 6-volume vision call costs ~8x a 2-volume one on CPU.
    """
    if max_acquisitions is None or max_acquisitions >= len(RICH_PROTOCOL[0]):
        return [list(s) for s in RICH_PROTOCOL]
    groups = [["t2w"], ["flair"], ["t1c"], ["dwi", "adc"]]
    first = ["t1w"]
    for i in rng.permutation(len(groups)):
        if len(first) + len(groups[i]) <= max_acquisitions:
            first += groups[i]
    order = RICH_PROTOCOL[0]
    return [sorted(first, key=order.index), list(RICH_PROTOCOL[1])]


def examples_from_subject(seed: int, cfg: DataConfig) -> list:
    """Generates one subject and samples ``cfg.examples_per_subject`` examples from it."""
    from synth.subject import generate_subject
    from task_templates import CATEGORIES, Case, Skip, sample

    from .recovery import with_recovery

    rng = np.random.default_rng(seed)
    anatomy = "atlas" if rng.random() < cfg.atlas_share else "phantom"
    rich = rng.random() < cfg.rich_share
    protocols = rich_protocol(rng, cfg.rich_max_acquisitions) if rich else None
    subj = generate_subject(int(seed), anatomy=anatomy, resolution=cfg.resolution,
                            protocols=protocols,
                            max_acquisitions=cfg.max_acquisitions, sparsify_prob=cfg.sparsify_prob,
                            skull_strip_prob=cfg.skull_strip_prob)
    case = Case.from_subject(subj)
    cats = list(cfg.categories or CATEGORIES)
    anat = {}
    if cfg.anatomy_targets:
        from .anatomy_classes import targets
        anat = {k: targets(ses.anatomy, ses.lesions) for k, ses in enumerate(case.sessions)}
    out = []
    for _ in range(cfg.examples_per_subject):
        cat = cats[int(rng.integers(len(cats)))]
        try:
            ex = sample(case, rng, cat, split=cfg.split)
            if cfg.recovery_prob and rng.random() < cfg.recovery_prob:
                ex = with_recovery(ex, rng) or ex
            if anat and any(c.kind == "segment" for c in ex.vision_calls):
                ex.anatomy = {k: anat[k] for k in sorted({v.session for v in ex.volumes})}
            out.append(ex)
        except Skip:
            continue
        except Exception:  # noqa: BLE001 - one bad draw (e.g. a mask too small for this grid) must not lose the subject
            if cfg.strict:
                raise
            continue
    return out


def _worker(wid: int, seed: int, cfg: DataConfig, q, stop) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    torch.set_num_threads(1)
    k = 0
    while not stop.is_set():
        s = int(np.random.SeedSequence([seed, wid, k]).generate_state(1)[0])
        k += 1
        try:
            exs = examples_from_subject(s, cfg)
        except Exception:  # a generator bug must not kill training: report and go on
            q.put(("error", traceback.format_exc()))
            continue
        for ex in exs:
            while not stop.is_set():
                try:
                    q.put(("example", ex), timeout=1.0)
                    break
                except queue.Full:
                    continue


class ExampleStream:
    """An iterator of training examples produced by ``workers`` background processes.

    Use as a context manager (stops the workers on exit). ``workers=0`` generates in-process.
    """

    def __init__(self, cfg: DataConfig | None = None, seed: int = 0, workers: int = 1, prefetch: int = 32):
        self.cfg = cfg or DataConfig()
        self.seed, self.workers = seed, workers
        self.errors: list[str] = []
        self._buf: list = []
        self._k = 0
        if workers > 0:
            ctx = mp.get_context("spawn")
            self._q = ctx.Queue(maxsize=prefetch)
            self._stop = ctx.Event()
            self._procs = [ctx.Process(target=_worker, args=(w, seed, self.cfg, self._q, self._stop), daemon=True)
                           for w in range(workers)]
            for p in self._procs:
                p.start()

    def __iter__(self):
        return self

    def __next__(self):
        if self.workers == 0:
            while not self._buf:
                s = int(np.random.SeedSequence([self.seed, 0, self._k]).generate_state(1)[0])
                self._k += 1
                try:
                    self._buf.extend(examples_from_subject(s, self.cfg))
                except Exception:  # as in the workers: report and go on
                    self.errors.append(traceback.format_exc())
                    if len(self.errors) > 100:
                        raise RuntimeError("data generation keeps failing:\n" + self.errors[-1])
            return self._buf.pop(0)
        while True:
            kind, item = self._q.get()
            if kind == "example":
                return item
            self.errors.append(item)
            if len(self.errors) > 100:
                raise RuntimeError("data generation keeps failing:\n" + self.errors[-1])

    def close(self) -> None:
        if self.workers > 0:
            self._stop.set()
            for p in self._procs:
                p.join(timeout=5)
                if p.is_alive():
                    p.terminate()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
