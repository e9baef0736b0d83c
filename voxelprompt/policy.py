"""What writes the next code step: the :class:`Policy` interface and its two implementations.

The agent loop (:mod:`voxelprompt.agent`) asks a policy for one step at a time::

    step = policy.next_step(state)     # Step(code with <MOD> markers, φ rows or masks, stop)

* :class:`ModelPolicy` — the trained language model: greedy decoding with a KV cache until
  ``<ENDSTEP>``/``<STOP>``; φ is read from the hidden state at every generated ``<MOD>``; the
  outputs and ε of executed steps are fed back before the next step is written.
* :class:`ScriptedPolicy` — replays given code steps: with recorded φ (replay of a model run
  through the same network) or with given masks for ``segment`` (replay of recorded masks,
  ground-truth "oracle" masks for tests and the demo).

The bottom of this module is the **model adapter**: the only code that touches
``voxelprompt.model``/``tokenizer``/``sequence`` (checkpoint loading, decoding, the vision
network's calls). The in-kernel API (:mod:`voxelprompt.kernel_api`) uses the same adapter to run
the vision network inside the sandbox.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from .transcript import file_sha256

if TYPE_CHECKING:  # pragma: no cover
    import voxel_lib as vl

ASSETS = Path(__file__).parent / "assets"
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt")


# ====================================================================================== interface
@dataclass
class Step:
    """One code step written by a policy.

    Attributes:
        code: Python with a ``<MOD>`` marker after every volume argument of a vision call
            (empty when the policy only stops).
        phis: ``(M, d)`` conditioning vectors, one per ``<MOD>`` in order (``network`` vision).
        stop: the policy is done after this step (``<STOP>``).
        masks: precomputed ``segment`` results (``masks`` vision): one list per ``segment`` call
            of the step, one mask per session among its arguments.
        tokens: tokens generated for this step (0 for scripted steps).
        truncated: generation hit the per-step token limit before ``<ENDSTEP>``.
    """

    code: str = ""
    phis: torch.Tensor | None = None
    stop: bool = False
    masks: list[list[Any]] | None = None
    tokens: int = 0
    truncated: bool = False


class Policy:
    """Writes code steps. Subclasses set :attr:`vision` and implement :meth:`next_step`.

    Attributes:
        vision: ``"network"`` (steps carry φ; the kernel runs the checkpoint's vision network) or
            ``"masks"`` (steps carry the masks ``segment`` returns).
        checkpoint: the checkpoint file the kernel loads its vision network from (``network``).
    """

    vision: str = "masks"
    checkpoint: Path | None = None

    def next_step(self, state) -> Step:
        """The next step for ``state`` (a :class:`voxelprompt.agent.AgentState`)."""
        raise NotImplementedError

    def describe(self) -> dict:
        """The ``model`` block of the transcript: id, checkpoint and its sha256."""
        return {"id": type(self).__name__, "policy": "custom", "checkpoint": None, "checkpoint_sha256": None}

    def close(self) -> None:
        pass


ScriptTurn = Sequence[Step]
Script = Sequence[ScriptTurn] | dict[str, ScriptTurn] | Callable[[Any], ScriptTurn]


class ScriptedPolicy(Policy):
    """Replays given code steps, one turn (question) after another.

    Args:
        script: the steps of each turn: a list of turns (by turn index), a dict ``{prompt: steps}``,
            or a function ``state -> steps`` (called once per turn).
        vision: ``"masks"`` (each step's ``masks`` feed ``segment``) or ``"network"`` (each
            step's ``phis`` condition the checkpoint's vision network).
        checkpoint: the checkpoint (``network`` vision).
        model: the transcript's ``model`` block (default: scripted, no checkpoint).
        source: where the masks come from, for the transcript (``oracle``, ``recorded``, ...).
    """

    def __init__(self, script: Script, *, vision: str = "masks", checkpoint: str | Path | None = None,
                 model: dict | None = None, source: str = "given"):
        if vision not in ("masks", "network"):
            raise ValueError(f"vision must be 'masks' or 'network', got {vision!r}")
        if vision == "network" and checkpoint is None:
            raise ValueError("a scripted policy with network vision needs the checkpoint")
        self.script = script
        self.vision = vision
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self._model = model
        self.source = source
        self._turn_key: Any = None
        self._steps: list[Step] = []

    def _turn_steps(self, state) -> list[Step]:
        s = self.script
        if callable(s) and not isinstance(s, (list, tuple, dict)):
            return list(s(state))
        if isinstance(s, dict):
            if state.prompt not in s:
                raise KeyError(f"the script has no program for the prompt {state.prompt!r}")
            return list(s[state.prompt])
        if state.turn >= len(s):
            raise IndexError(f"the script has {len(s)} turn(s); turn {state.turn + 1} was asked")
        return list(s[state.turn])

    def next_step(self, state) -> Step:
        key = (id(state), state.turn)
        if key != self._turn_key:
            self._turn_key, self._steps = key, self._turn_steps(state)
        i = len(state.steps)
        if i >= len(self._steps):
            return Step(stop=True)
        st = self._steps[i]
        if self.vision == "masks" and st.masks is None:
            st = Step(st.code, st.phis, st.stop, [], st.tokens, st.truncated)
        return st

    def describe(self) -> dict:
        if self._model is not None:
            return dict(self._model)
        d = {"id": "scripted", "policy": "scripted", "checkpoint": None, "checkpoint_sha256": None}
        if self.checkpoint is not None:
            d.update(checkpoint=str(self.checkpoint), checkpoint_sha256=file_sha256(self.checkpoint))
        return d


class ModelPolicy(Policy):
    """The trained language model, decoding greedily with a KV cache.

    One instance per conversation (it holds the generation state); the loaded model is shared.
    Each question starts a fresh language-model context (``<s> prompt + volume lines </s>``):
    the model was trained on single requests; the kernel's variables persist across questions.

    Args:
        model: a :class:`LoadedModel` (see :func:`load_checkpoint`).
        max_step_tokens: most tokens of one code step.
        max_output_tokens: most tokens of one step's fed-back output.
    """

    vision = "network"

    def __init__(self, model: "LoadedModel", max_step_tokens: int = 512, max_output_tokens: int | None = None):
        self.model = model
        self.checkpoint = model.path
        self.max_step_tokens = int(max_step_tokens)
        self.max_output_tokens = max_output_tokens
        self._key: Any = None
        self._lm = None
        self._fed = 0
        self.stop_reason: str | None = None

    def describe(self) -> dict:
        return self.model.describe()

    def next_step(self, state) -> Step:
        m = self.model
        key = (id(state), state.turn)
        if key != self._key:   # a new question: a fresh context with the header
            self._key, self._fed = key, 0
            self._lm = m.start(state.header)
        for st in state.steps[self._fed:]:   # feed <OUT> ε output </s> of executed steps
            m.feed_output(self._lm, st.output, st.eps, self.max_output_tokens)
        self._fed = len(state.steps)
        room = m.max_positions - m.length(self._lm) - 1
        budget = min(self.max_step_tokens, room, max(0, state.token_budget))
        if budget <= 0:
            self.stop_reason = "context" if room <= 0 else "tokens"
            return Step(stop=True, truncated=True)
        gen = m.generate(self._lm, budget)
        return Step(gen.code, gen.phis, gen.stopped, None, gen.tokens, gen.truncated)


# ================================================================================ model adapter
class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or does not match the model code."""


def _default_checkpoint() -> Path | None:
    try:
        from .checkpoint import DEFAULT_PATH
        return Path(DEFAULT_PATH)
    except ImportError:  # pragma: no cover - the model package moved
        return None


def find_checkpoint(folder: str | Path | None = None) -> Path | None:
    """The trained checkpoint shipped in ``voxelprompt/assets/`` (``None`` if there is none).

    ``voxelprompt.checkpoint.DEFAULT_PATH`` (``voxelprompt-cpu.safetensors``) if it exists, else
    ``model.safetensors``, else the newest ``.safetensors``/``.pt`` file of the folder.
    """
    if folder is None:
        d = _default_checkpoint()
        if d is not None and d.is_file():
            return d
    folder = Path(folder) if folder is not None else ASSETS
    if not folder.is_dir():
        return None
    cands = [p for p in folder.iterdir() if p.suffix in CHECKPOINT_SUFFIXES and p.is_file()]
    if not cands:
        return None
    for p in cands:
        if p.name == "model.safetensors":
            return p
    return max(cands, key=lambda p: p.stat().st_mtime)


def resolve_checkpoint(path: str | Path | None = None) -> Path:
    """A checkpoint file: the given file, the latest checkpoint of a training run folder, or the
    shipped one.

    Raises:
        CheckpointError: none is given and none is shipped, or the file does not exist.
    """
    if path is None:
        p = find_checkpoint()
        if p is None:
            raise CheckpointError(
                f"no trained checkpoint is shipped in {ASSETS} yet; pass a checkpoint file "
                "(--checkpoint PATH / Assistant.load(checkpoint=PATH))")
        return p.resolve()
    p = Path(path).expanduser()
    if p.is_dir():
        for cand in (p / "ckpt" / "model.safetensors", p / "ckpt.old" / "model.safetensors", p / "model.safetensors"):
            if cand.is_file():
                return cand.resolve()
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} not found")
    return p.resolve()


def _read_checkpoint(path: Path, weights: bool = True) -> tuple[dict, dict[str, torch.Tensor] | None, dict]:
    """(config dict, state dict, metadata) of a checkpoint file.

    The format is :mod:`voxelprompt.checkpoint`'s: ``NAME.safetensors`` (weights; its metadata also
    holds ``config``) beside ``NAME.json`` (``{"config": ..., training info}``). A ``torch.save``
    dict with ``config`` and ``model``/``state_dict`` is read too (``weights_only=True``).
    """
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    meta: dict = {}
    state = None
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            for k, v in (f.metadata() or {}).items():
                try:
                    meta[k] = json.loads(v)
                except (TypeError, ValueError):
                    meta[k] = v
        side = path.with_suffix(".json")
        if side.is_file():
            try:
                meta.update(json.loads(side.read_text()))
            except ValueError:
                raise CheckpointError(f"{side}: not valid JSON") from None
        if weights:
            from safetensors.torch import load_file
            state = load_file(str(path))
    else:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
        if not isinstance(obj, dict):
            raise CheckpointError(f"{path}: not a checkpoint dict")
        state = obj.get("model") or obj.get("state_dict")
        meta = {k: v for k, v in obj.items() if k not in ("model", "state_dict")}
    cfg = meta.get("config")
    if not isinstance(cfg, dict) or (weights and state is None):
        raise CheckpointError(f"{path}: a checkpoint needs the model config ({path.stem}.json or metadata "
                              "'config') and its weights")
    return cfg, state, meta


def _model_config(cfg: dict):
    from .configs import ModelConfig
    return ModelConfig.from_dict(cfg)


def checkpoint_threshold(path: str | Path) -> float:
    """The mask threshold a checkpoint's config gives (``VisionConfig.mask_threshold``)."""
    return float(_model_config(_read_checkpoint(Path(path), weights=False)[0]).vision.mask_threshold)


def load_vision(path: str | Path, device: str = "cpu"):
    """The vision network of a checkpoint (used inside the kernel), in eval mode."""
    from .model import VisionNet
    cfg_d, state, _ = _read_checkpoint(Path(path))
    cfg = _model_config(cfg_d)
    net = VisionNet(cfg.vision, cfg.lm.hidden, cfg.lm.phi_dim)
    sub = {k[len("vision."):]: v for k, v in state.items() if k.startswith("vision.")}
    try:
        net.load_state_dict(sub, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: the vision weights do not match the model code: {exc}") from None
    return net.to(device).eval()


def network_input(volume: "vl.Volume") -> "vl.Volume":
    """A volume as the vision network takes it: one float channel in its native intensities —
    exactly what training and ``voxelprompt eval`` feed the network (no extra scaling). Change it
    here, in one place, if training adopts an intensity normalisation."""
    return volume.as_image().float()


@torch.no_grad()
def vision_segment(net, volumes, phi: torch.Tensor, sessions, threshold: float | None = None) -> list:
    """Binary masks (one per session, on its first volume's grid) from the vision network.

    ``threshold`` defaults to the checkpoint's calibrated ``mask_threshold``.
    """
    vols = [network_input(v) for v in volumes]
    thr = net.cfg.mask_threshold if threshold is None else threshold
    return net.segment(vols, phi.to(torch.float32), list(sessions), threshold=thr)


@torch.no_grad()
def vision_encode(net, volumes, phi: torch.Tensor) -> torch.Tensor:
    """ε ``(n, b)``: one embedding per volume."""
    return net.encode([network_input(v) for v in volumes], phi.to(torch.float32))


@dataclass
class Generated:
    code: str
    phis: torch.Tensor
    stopped: bool
    truncated: bool
    tokens: int


@dataclass
class LoadedModel:
    """A checkpoint loaded for generation: the joint model, its tokenizer and identity."""

    model: Any
    tokenizer: Any
    path: Path
    sha256: str
    config: dict
    meta: dict = field(default_factory=dict)

    @property
    def max_positions(self) -> int:
        return int(self.model.config.lm.max_positions)

    @property
    def model_id(self) -> str:
        return str(self.meta.get("model_id") or f"voxelprompt-{self.config.get('name', 'custom')}")

    def describe(self) -> dict:
        return {"id": self.model_id, "policy": "model", "checkpoint": str(self.path),
                "checkpoint_sha256": self.sha256, "config": self.config,
                "trained": self.meta.get("trained"), "step": self.meta.get("step")}

    # ---- generation (greedy, KV cache) ----
    def start(self, header: str):
        from .sequence import header_ids
        st = self.model.lm.start(use_cache=True)
        self.model.lm.feed(st, ids=header_ids(self.tokenizer, header))
        return st

    @staticmethod
    def length(st) -> int:
        return int(st.embeds.shape[1])

    def feed_output(self, st, output: str, eps: torch.Tensor | None, max_tokens: int | None = None) -> None:
        from .sequence import MAX_OUTPUT_TOKENS, output_ids
        tok = self.tokenizer
        self.model.lm.feed(st, ids=[tok.out_id])
        if eps is not None and len(eps):
            self.model.lm.feed(st, embeds=eps)
        self.model.lm.feed(st, ids=output_ids(tok, output, max_tokens or MAX_OUTPUT_TOKENS))

    def generate(self, st, max_tokens: int) -> Generated:
        tok = self.tokenizer
        out = self.model.generate_step(st, max_tokens=max_tokens)
        ids = list(out.ids)
        if out.truncated:   # keep the layout: every step ends with <ENDSTEP>
            self.model.lm.feed(st, ids=[tok.endstep_id])
        body = [i for i in ids if i not in (tok.endstep_id, tok.stop_id)]
        return Generated(tok.decode(body), out.phi.detach().float().cpu(), bool(out.stopped),
                         bool(out.truncated), len(ids))


def load_checkpoint(path: str | Path | None = None, device: str = "cpu") -> LoadedModel:
    """Loads a checkpoint (default: the one shipped in ``voxelprompt/assets/``) for generation.

    Raises:
        CheckpointError: no checkpoint shipped and none given, or it does not load.
    """
    path = resolve_checkpoint(path)
    cfg_d, _, meta = _read_checkpoint(path, weights=False)
    from .tokenizer import Tokenizer
    try:
        from .checkpoint import load_model
        model = load_model(path, device)
    except (ValueError, RuntimeError, OSError) as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    tok_ref = meta.get("tokenizer")
    if isinstance(tok_ref, str) and (path.parent / tok_ref).is_file():
        tok = Tokenizer(path.parent / tok_ref)
    elif (path.parent / "tokenizer.model").is_file():
        tok = Tokenizer(path.parent / "tokenizer.model")
    else:
        tok = Tokenizer()
    if model.config.lm.vocab_size < tok.vocab_size:
        raise CheckpointError(f"{path}: the model has {model.config.lm.vocab_size} token ids but the "
                              f"tokenizer has {tok.vocab_size}")
    return LoadedModel(model, tok, path, file_sha256(path), cfg_d, meta)


def save_checkpoint(model, path: str | Path, **info) -> Path:
    """Writes a checkpoint :func:`load_checkpoint` reads (``voxelprompt.checkpoint.save_model``:
    safetensors + ``NAME.json``); ``info`` goes into the JSON (``model_id``, ``tokenizer``,
    ``volume_tolerance``, ...)."""
    from .checkpoint import save_model
    return save_model(model, path, info=info)


def policy_factory(spec: str | None = None, *, checkpoint: str | Path | None = None, device: str = "cpu",
                   max_step_tokens: int = 512) -> tuple[Callable, Path | None]:
    """``(factory, checkpoint)`` for a policy named on the command line or in a config.

    Args:
        spec: ``None`` or ``"model"``: the trained model (``checkpoint``, default the shipped one);
            ``"module:function"``: a function ``inputs -> Policy`` (e.g. a scripted policy with
            ground-truth masks), imported from the Python path. Its ``checkpoint`` attribute, if
            any, names the checkpoint its kernels load.

    Raises:
        CheckpointError: the model is asked for and no checkpoint is available.
    """
    if spec in (None, "", "model"):
        model = load_checkpoint(checkpoint, device)

        def factory(inputs):
            return ModelPolicy(model, max_step_tokens=max_step_tokens)
        factory.model = model
        return factory, model.path
    import importlib
    mod, sep, fn = str(spec).partition(":")
    if not sep or not mod or not fn:
        raise ValueError(f"policy {spec!r}: use 'model' or 'module:function'")
    factory = getattr(importlib.import_module(mod), fn)
    ck = getattr(factory, "checkpoint", None)
    return factory, Path(ck) if ck else None
