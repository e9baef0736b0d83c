"""The agent API inside the sandbox kernel: ``segment``, ``encode`` and ``report`` for generated code.

This module runs **inside** the kernel (it is imported by the kernel preamble, see
:func:`preamble`); the host drives it through short, silent cells and ``Sandbox.put``/``get``.
It binds :class:`task_templates.api.Runtime` — the very implementation the ground-truth programs
were verified with, so ``report()`` prints exactly what the model saw in training — to one of two
vision backends:

``network``
    the vision network of the checkpoint, loaded once per kernel from a read-only path bound into
    the sandbox (``load_vision``). Before a step runs the host puts that step's φ rows (one per
    ``<MOD>``, in order) into the kernel; every ``segment``/``encode`` call consumes one row per
    volume argument. ``encode`` keeps its ε rows for the host, which appends them to the language
    model's state.
``masks``
    precomputed masks, one list per ``segment`` call of the step (one mask per session), put by
    the host before the step: the recorded masks of an earlier run (replay, restoring a kernel) or
    ground-truth masks (tests, the scripted demo). ``encode`` records the call and returns None.

Every call is logged (kind, argument names, sessions) and its masks are exposed to the host after
the step (``end_step``) so that the transcript records what the network produced.

Nothing here is trusted by the host: generated code can replace any of it. The host validates
every value it reads back (types, shapes, sizes).
"""

from __future__ import annotations

#: kernel variables used by the protocol (generated code should not touch names starting ``__vp``)
API = "__vp_api"
PHI = "__vp_phi"
SUMMARY = "__vp_summary"
EPS = "__vp_eps"
RESULT = "__vp_result"


def preamble(checkpoint: str | None = None, threshold: float | None = None) -> tuple[str, ...]:
    """Kernel preamble cells (run after ``sandbox.DEFAULT_PREAMBLE``): install the API, load the network.

    ``threshold`` overrides the checkpoint's calibrated mask threshold.
    """
    cells = [f"import voxelprompt.kernel_api as _vp_kernel_api\n{API} = _vp_kernel_api.install(globals())\n"
             "del _vp_kernel_api"]
    if checkpoint is not None:
        thr = "" if threshold is None else f", threshold={float(threshold)!r}"
        cells.append(f"{API}.load_vision({str(checkpoint)!r}{thr})")
    return tuple(cells)


def install(ns: dict) -> "KernelAPI":
    """Creates the API object for the kernel's user namespace and placeholder vision functions."""
    api = KernelAPI(ns)

    def _unbound(*_a, **_k):
        raise RuntimeError("the agent API is not bound to input volumes yet")

    ns.setdefault("segment", _unbound)
    ns.setdefault("encode", _unbound)
    ns.setdefault("report", _unbound)
    return api


class KernelAPI:
    """The kernel's end of the agent protocol (one per kernel)."""

    def __init__(self, ns: dict):
        self.ns = ns
        self.runtime = None
        self.names: dict[int, str] = {}
        self.net = None
        self.net_error: str | None = "no checkpoint was given to this kernel"
        self.threshold = 0.5
        self.mode = "masks"
        self.phi = None
        self.phi_used = 0
        self.masks: list[list] = []
        self.calls: list[dict] = []
        self.eps: list = []
        self.step = -1
        self._exposed: list[str] = []

    # ---------------------------------------------------------------- setup
    def load_vision(self, path: str, threshold: float | None = None) -> None:
        """Loads the checkpoint's vision network (errors are kept and reported at the first call).

        Masks are its probabilities above ``threshold`` (default: the checkpoint's ``mask_threshold``).
        """
        try:
            from voxelprompt.policy import load_vision
            self.net = load_vision(path)
            self.net_error = None
            self.threshold = float(self.net.cfg.mask_threshold if threshold is None else threshold)
        except Exception as exc:  # reported when segment()/encode() is called
            self.net = None
            self.net_error = f"the vision network could not be loaded from {path}: {type(exc).__name__}: {exc}"

    def vision_status(self) -> dict:
        return {"loaded": self.net is not None, "error": self.net_error}

    def bind(self, inputs: dict) -> None:
        """Binds ``segment``/``encode``/``report`` to the input volumes ``{name: session}`` already in the namespace."""
        import voxel_lib as vl
        from task_templates.api import Backend, Runtime

        api = self

        class _KernelBackend(Backend):
            def segment(self, call, volumes, sessions):
                return api._segment(volumes, sessions)

            def encode(self, call, volumes, sessions):
                api._encode(volumes, sessions)

        vols = {}
        for name, session in inputs.items():
            v = self.ns.get(name)
            if not isinstance(v, vl.Volume):
                raise TypeError(f"input {name!r} is not a Volume in the kernel")
            vols[name] = (v, int(session))
        self.runtime = Runtime(_KernelBackend(), vols)
        self.names = {id(v): n for n, (v, _) in vols.items()}
        self.ns.update(vl=vl, segment=self.runtime.segment, encode=self.runtime.encode,
                       report=self.runtime.report)

    # ---------------------------------------------------------------- per turn / step
    def begin_turn(self) -> None:
        """A new question: the structured result starts empty (variables persist)."""
        from task_templates.api import Report
        self._cleanup()
        if self.runtime is not None:
            self.runtime.result = Report()

    def begin_step(self, step: int, mode: str, masks: list | None = None) -> None:
        """Takes this step's φ (``network``) or masks (``masks``, kernel variable names per call)."""
        self._cleanup()
        self.step, self.mode = int(step), mode
        self.calls, self.eps = [], []
        self.phi, self.phi_used = None, 0
        self.masks = []
        if mode == "network":
            self.phi = self.ns.pop(PHI, None)
        elif mode == "masks":
            self.masks = [[self.ns.pop(n) for n in call] for call in (masks or [])]
        else:
            raise ValueError(f"unknown vision mode {mode!r}")

    def end_step(self) -> None:
        """Exposes the step's vision calls (and ε) to the host as ``__vp_summary`` and ``__vp_out_*``."""
        calls = []
        for k, c in enumerate(self.calls):
            names = []
            for j, m in enumerate(c.get("masks", [])):
                var = f"__vp_out_{k}_{j}"
                self._expose(var, m)
                names.append(var)
            calls.append({"kind": c["kind"], "volumes": c["volumes"], "sessions": c["sessions"], "masks": names,
                          "eps": c.get("eps", 0)})
        n_eps = 0
        if self.eps:
            import torch
            eps = torch.cat(self.eps).detach().float().cpu().contiguous()
            n_eps = int(eps.shape[0])
            self._expose(EPS, eps)
        phi_given = 0 if self.phi is None else int(self.phi.shape[0])
        self._expose(SUMMARY, {"step": self.step, "mode": self.mode, "calls": calls, "eps": n_eps,
                               "phi_given": phi_given, "phi_used": self.phi_used,
                               "masks_left": len(self.masks)})

    def collect(self) -> None:
        """Exposes the turn's ``report()`` result as ``__vp_result`` (+ ``__vp_res_<i>`` volumes)."""
        self._cleanup()
        if self.runtime is None:
            self._expose(RESULT, {"answer": None, "measurements": {}, "volumes": []})
            return
        r = self.runtime.result
        vols = []
        for i, (name, v) in enumerate(r.volumes.items()):
            var = f"__vp_res_{i}"
            self._expose(var, v)
            vols.append({"name": name, "var": var})
        self._expose(RESULT, {"answer": r.answer, "measurements": r.measurements, "volumes": vols})

    # ---------------------------------------------------------------- vision calls
    def _names(self, volumes) -> list[str]:
        return [self.names.get(id(v), "?") for v in volumes]

    def _take_phi(self, n: int, fn: str):
        if self.net is None:
            raise RuntimeError(f"{fn}(): {self.net_error}")
        if self.phi is None or self.phi_used + n > int(self.phi.shape[0]):
            have = 0 if self.phi is None else int(self.phi.shape[0]) - self.phi_used
            raise RuntimeError(f"{fn}() got {n} volume argument(s) but this step has {have} conditioning "
                               "vector(s) left: write <MOD> after every volume argument of segment()/encode()")
        phi = self.phi[self.phi_used:self.phi_used + n]
        self.phi_used += n
        return phi

    def _segment(self, volumes, sessions):
        n_sessions = len(set(sessions))
        if self.mode == "network":
            from voxelprompt.policy import vision_segment
            masks = vision_segment(self.net, volumes, self._take_phi(len(volumes), "segment"), sessions,
                                   self.threshold)
        else:
            if not self.masks:
                raise RuntimeError("segment(): no mask was provided for this call (a scripted run supplies "
                                   "one list of masks per segment() call of the step)")
            masks = list(self.masks.pop(0))
            if len(masks) != n_sessions:
                raise RuntimeError(f"segment(): {len(masks)} mask(s) were provided but the arguments span "
                                   f"{n_sessions} session(s)")
        self.calls.append({"kind": "segment", "volumes": self._names(volumes), "sessions": list(sessions),
                           "masks": masks})
        return masks

    def _encode(self, volumes, sessions) -> None:
        n = 0
        if self.mode == "network":
            from voxelprompt.policy import vision_encode
            eps = vision_encode(self.net, volumes, self._take_phi(len(volumes), "encode"))
            self.eps.append(eps)
            n = int(eps.shape[0])
        self.calls.append({"kind": "encode", "volumes": self._names(volumes), "sessions": list(sessions),
                           "eps": n})

    # ---------------------------------------------------------------- helpers
    def _expose(self, var: str, value) -> None:
        self.ns[var] = value
        self._exposed.append(var)

    def _cleanup(self) -> None:
        for var in self._exposed:
            self.ns.pop(var, None)
        self._exposed = []
