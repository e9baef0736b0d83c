"""VoxelPrompt's networks: the language model α, the vision network m, and the joint model.

Language model (seeds/004 §3.1, A.1): a randomly initialised LLaMA decoder (``transformers``,
built from a config, never downloaded) fed ``inputs_embeds`` so that image embeddings ε can sit
in the sequence. A linear token head predicts code; a φ head (linear → SiLU, 32 channels) reads
the hidden state at every ``<MOD>`` position and conditions the vision network on that volume.

Vision network (A.3): a UNet that runs each volume on its own grid. Voxel→world affines are
tracked through every level; an axis is max-pooled only while its spacing is below
``pool_ratio`` × the volume's finest spacing (a 1×1×5 mm volume pools in-plane until the
spacings even out); the decoder upsamples to the skip's geometry by world-space resampling.
After every block below the top level, the features of the n volumes are resampled to a shared
grid, concatenated with each volume's φ, mixed by a one-layer MLP, passed through a transformer
layer that attends across the volumes at each voxel, resampled back and added (residual); the
shared grid is processed in slabs, so the attention's temporaries stay small
(``VisionConfig.checkpoint_interaction`` also recomputes them in the backward pass instead of
storing them). Encoder → global max-pool → linear gives ε ∈ R^{n×b}; the decoder → 1×1×1 conv →
sigmoid gives one mask per volume, and masks of one session are max-merged on the grid of that
session's first volume. All resampling is ``grid_sample`` (differentiable).

Shared grid (:func:`shared_grid`): per axis the *geometric mean* of the volumes' spacings along
it; the union of the fields of view; the axes of the volume whose frame gives the fewest voxels;
coarsened if it would hold more than ``shared_grid_factor`` × the largest volume's voxel count.
For grids aligned with it, its voxel has the geometric mean of the volumes' voxel volumes, so over
a common field of view it holds the geometric mean of their voxel counts (at most their mean):
the interaction costs about one more volume's worth of voxels per input, whatever the mix of
slice directions. seeds/004 (§3.1) resamples to "the minimum voxel spacing across volumes"; taken
per axis (as this module did before), an axial 1×1×5 mm and a sagittal 5×1×1 mm scan interact on
a 1 mm grid over their union, five times the voxels of either, and a session of thick-slice scans
costs as much as conforming everything to 1 mm, which native processing exists to avoid. The
coarser grid loses little: the attention only exchanges information *across* volumes, each
volume's own features stay on its native grid, and the interaction comes back as a trilinearly
resampled residual.

Intensities: every input is scaled per volume so its 0.5/99.5 % quantiles map to 0/1
(:func:`normalize_intensity`), whatever its unit.

Working-resolution floor: with ``VisionConfig.min_spacing`` set (``cpu``: 3 mm), volumes finer
than the floor are resampled down (per axis, antialiased) before the network, and the masks are
resampled back to each volume's native grid. ``paper`` has no floor.

Joint model: :meth:`VoxelPrompt.loss` computes teacher-forced cross-entropy on the targets of a
:class:`~voxelprompt.sequence.TokenSequence` (code, ``<ENDSTEP>``, ``<STOP>``), splices ε after
``<OUT>`` for ``encode`` calls, runs every ``segment`` call with its φ and adds λ × (soft Dice +
``bce_weight`` × voxel BCE). The paper uses the soft Dice alone; the BCE term (nnU-Net's recipe)
gives the network a dense gradient from the first step and teaches empty masks for targets that
are not in the images (where the Dice gradient vanishes). ``LossOutput.dice`` is the Dice part.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, replace
from typing import Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")   # the model is built from a config: never touch a hub

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from transformers import DynamicCache, LlamaConfig, LlamaModel  # noqa: E402

from .configs import LMConfig, ModelConfig, VisionConfig, get_config
from .sequence import IGNORE, TokenSequence
from .tokenizer import BOS_ID, ENDSTEP_ID, EOS_ID, MOD_ID, PAD_ID, STOP_ID

_F64 = torch.float64
_SLAB_VOXELS = 4_000_000  # resample large grids in slabs of this many voxels
_INTERACT_TOKENS = 8_192  # cross-volume interaction in shared-grid slabs of about this many (voxel, volume) pairs


# =============================================================================== language model
@dataclass
class LMState:
    """Generation state: every input embedding so far, the KV cache and the next-token logits."""

    embeds: torch.Tensor               # (1, L, b)
    cache: DynamicCache | None
    logits: torch.Tensor | None = None  # (vocab,) after the last input


@dataclass
class StepOutput:
    """One generated code step."""

    ids: list[int]           # generated ids, ending with <ENDSTEP> or <STOP> unless truncated
    phi: torch.Tensor        # (M, phi_dim): φ at each generated <MOD>, in order
    stopped: bool            # the model emitted <STOP>
    truncated: bool          # hit max_tokens before <ENDSTEP>/<STOP>


class LanguageModel(nn.Module):
    """α: LLaMA decoder + token head + φ head."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        config = LlamaConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
            num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
            max_position_embeddings=cfg.max_positions, rope_parameters={"rope_type": "default",
                                                                        "rope_theta": cfg.rope_theta},
            tie_word_embeddings=False, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
        self.llama = LlamaModel(config)
        self.head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
        self.phi_head = nn.Sequential(nn.Linear(cfg.hidden, cfg.phi_dim), nn.SiLU())
        nn.init.normal_(self.head.weight, std=0.02)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings ``(..., b)``."""
        return self.llama.embed_tokens(ids)

    def forward(self, embeds: torch.Tensor, cache: DynamicCache | None = None) -> torch.Tensor:
        """Hidden states ``(1, L, b)`` for input embeddings ``(1, L, b)``; extends ``cache`` if given."""
        return self.llama(inputs_embeds=embeds, cache=cache, use_cache=cache is not None).last_hidden_state

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.llama.config)

    # ------------------------------------------------------------------ generation
    def start(self, use_cache: bool = True) -> LMState:
        """An empty generation state (feed the header next)."""
        p = self.head.weight
        return LMState(p.new_zeros(1, 0, self.cfg.hidden), self.new_cache() if use_cache else None)

    @torch.no_grad()
    def feed(self, state: LMState, ids: Sequence[int] | None = None,
             embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Appends tokens (``ids``) or embeddings (``embeds``, ``(k, b)``: ε) to the state.

        Returns the hidden states ``(1, k, b)`` of the new positions and updates ``state.logits``.
        """
        if (ids is None) == (embeds is None):
            raise ValueError("feed needs exactly one of ids= or embeds=")
        if ids is not None:
            e = self.embed(torch.as_tensor(list(ids), dtype=torch.long, device=self.head.weight.device))[None]
        else:
            e = embeds.to(self.head.weight)[None]
        state.embeds = torch.cat([state.embeds, e], 1)
        if state.cache is not None:
            h = self(e, state.cache)
        else:
            h = self(state.embeds)[:, -e.shape[1]:]
        state.logits = self.head(h[0, -1])
        return h

    @torch.no_grad()
    def generate_step(self, state: LMState, max_tokens: int = 512) -> StepOutput:
        """Greedily writes one code step; stops after ``<ENDSTEP>`` or ``<STOP>``.

        Every generated token (including the final one) is fed back, so the state is ready for
        ``<OUT>`` + ε + output tokens. φ is read at each generated ``<MOD>``.
        """
        if state.logits is None:
            raise ValueError("feed the header before generating")
        ids, phis = [], []
        for _ in range(max_tokens):
            tok = int(state.logits.argmax())
            ids.append(tok)
            h = self.feed(state, ids=[tok])
            if tok == MOD_ID:
                phis.append(self.phi_head(h[0, -1]))
            if tok in (ENDSTEP_ID, STOP_ID):
                break
        phi = torch.stack(phis) if phis else self.head.weight.new_zeros(0, self.cfg.phi_dim)
        done = bool(ids) and ids[-1] in (ENDSTEP_ID, STOP_ID)
        return StepOutput(ids, phi, stopped=bool(ids) and ids[-1] == STOP_ID, truncated=not done)


# ============================================================================= geometry helpers
def pool_factors(spacing: Sequence[float], shape: Sequence[int], ratio: float = 2.0) -> tuple[int, int, int]:
    """Per-axis pooling factor (1 or 2): pool where size > 1 and spacing < ``ratio`` × the finest
    spacing among the axes longer than one voxel."""
    live = [s for s, n in zip(spacing, shape) if n > 1]
    if not live:
        return (1, 1, 1)
    fine = min(live)
    return tuple(2 if (n > 1 and s < ratio * fine - 1e-6) else 1 for s, n in zip(spacing, shape))


def _spacing(affine: torch.Tensor) -> tuple[float, float, float]:
    return tuple(float(s) for s in torch.linalg.norm(affine[:3, :3], dim=0))


def pyramid(shape: Sequence[int], affine: torch.Tensor, levels: int, ratio: float = 2.0):
    """The grids ``[(shape, affine), ...]`` a volume passes through, top level first."""
    out = [(tuple(int(n) for n in shape), affine.to(_F64))]
    for _ in range(levels - 1):
        shp, aff = out[-1]
        f = pool_factors(_spacing(aff), shp, ratio)
        t = torch.eye(4, dtype=_F64)
        for i in range(3):
            t[i, i], t[i, 3] = f[i], (f[i] - 1) / 2   # new voxel j is centred on old 2j + 0.5
        out.append((tuple(math.ceil(n / k) for n, k in zip(shp, f)), aff @ t))
    return out


def sampling_grid(src_shape, src_affine, dst_shape, dst_affine, device=None):
    """``grid_sample`` grid ``(1, X, Y, Z, 3)`` sampling a src grid at dst voxel centres.

    Returns ``(grid, inside)``: normalised coordinates (align_corners=True) and a bool map
    ``(X, Y, Z)`` of the dst voxels within half a voxel of the src grid.
    """
    m = torch.linalg.solve(src_affine.to(_F64), dst_affine.to(_F64)).float().to(device)  # dst -> src voxel
    idx = m[:3, 3].expand(*dst_shape, 3)
    for i, n in enumerate(dst_shape):
        shape = [1, 1, 1, 3]
        shape[i] = n
        idx = idx + (torch.arange(n, dtype=torch.float32, device=device)[:, None] * m[:3, i]).view(shape)
    idx = idx.flip(-1)[None]          # grid_sample orders the axes (Z, Y, X)
    n = torch.tensor(list(src_shape)[::-1], dtype=torch.float32, device=device)
    inside = ((idx >= -0.5) & (idx <= n - 0.5)).all(-1)[0]
    return idx * (2 / (n - 1).clamp(min=1)) - 1, inside


def resample(x: torch.Tensor, src_affine, dst_shape, dst_affine, padding: str = "border") -> torch.Tensor:
    """Trilinear world-space resampling of features ``(1, C, *src)`` onto a dst grid (differentiable).

    Large grids are done in slabs along the first axis to bound the sampling-grid memory.
    """
    X, Y, Z = dst_shape
    step = max(1, _SLAB_VOXELS // (Y * Z))
    outs = []
    for x0 in range(0, X, step):
        x1 = min(X, x0 + step)
        aff = dst_affine.to(_F64).clone()
        aff[:3, 3] += aff[:3, 0] * x0
        g, _ = sampling_grid(x.shape[2:], src_affine, (x1 - x0, Y, Z), aff, x.device)
        outs.append(F.grid_sample(x, g.to(x.dtype), mode="bilinear", padding_mode=padding, align_corners=True))
    return outs[0] if len(outs) == 1 else torch.cat(outs, 2)


def _axis_spacings(affines, axes) -> torch.Tensor:
    """``(n, 3)``: each volume's spacing along each frame axis, ``1 / |A⁻¹ e|`` (exact for grids
    aligned with the frame; for oblique ones a blend of the volume's spacings)."""
    return torch.stack([1 / torch.linalg.norm(torch.linalg.solve(a[:3, :3].to(_F64), axes), dim=0)
                        for a in affines])


def shared_grid(shapes, affines, factor: float = 2.0):
    """The grid on which n volumes interact: ``(shape, affine)``.

    - spacing, per axis: the **geometric mean** of the volumes' spacings along it. For grids
      aligned with the frame the shared voxel then has the geometric mean of the volumes' voxel
      volumes, so over a common field of view it holds the geometric mean of their voxel counts
      (≤ their mean, ≤ the largest): an axial 1×1×5 mm and a sagittal 5×1×1 mm volume interact on
      a 2.2×1×2.2 mm grid with as many voxels as either, not on a 1 mm grid with five times more.
      Volumes that share a spacing along an axis keep it exactly; a single volume keeps its grid;
    - extent: the union of the fields of view (voxel centres);
    - axes: those of one of the volumes, the one whose frame gives the fewest voxels (tilted
      fields of view inflate the union's bounding box less in some frames than in others); ties go
      to the finest volume, then to the affine, so the choice does not depend on the input order;
    - cap: coarsened isotropically to at most ``factor`` × the largest volume's voxel count (only
      binds when the fields of view barely overlap).
    """
    def key(i):
        a = affines[i]
        return (round(abs(float(torch.linalg.det(a[:3, :3]))), 6), tuple(round(float(v), 6) for v in a.flatten()))

    corners = []
    for shp, a in zip(shapes, affines):
        c = torch.cartesian_prod(*[torch.tensor([0.0, n - 1.0], dtype=_F64) for n in shp])
        corners.append(c @ a[:3, :3].to(_F64).T + a[:3, 3].to(_F64))
    corners = torch.cat(corners).T                                  # (3, 8n) world

    def grid(axes, spacing, lo, hi):
        return tuple(int(math.ceil(float(v) - 1e-4)) + 1 for v in (hi - lo) / spacing)

    best = None
    for i in range(len(affines)):
        a = affines[i].to(_F64)
        axes = a[:3, :3] / torch.linalg.norm(a[:3, :3], dim=0)
        spacing = _axis_spacings(affines, axes).log().sort(0).values.mean(0).exp()   # sorted: order-free bits
        q = torch.linalg.solve(axes, corners).T                     # corners in the frame
        lo, hi = q.min(0).values, q.max(0).values
        cand = (math.prod(grid(axes, spacing, lo, hi)), key(i))
        if best is None or cand < best[0]:
            best = (cand, axes, spacing, lo, hi)
    _, axes, spacing, lo, hi = best
    cap = factor * max(math.prod(s) for s in shapes)
    while True:
        shape = grid(axes, spacing, lo, hi)
        if math.prod(shape) <= cap:
            break
        spacing = spacing * max(1.01, (math.prod(shape) / cap) ** (1 / 3))
    aff = torch.eye(4, dtype=_F64)
    aff[:3, :3] = axes * spacing
    aff[:3, 3] = axes @ lo
    return shape, aff


# ============================================================================== vision network
class ConvBlock(nn.Module):
    """3³ conv → GroupNorm → SiLU."""

    def __init__(self, cin: int, cout: int, group_size: int):
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, 3, padding=1)
        self.norm = nn.GroupNorm(max(1, cout // group_size), cout)

    def forward(self, x):
        return F.silu(self.norm(self.conv(x)))


class CrossVolumeAttention(nn.Module):
    """Per-voxel conditioning and attention across the n volumes (no order information: equivariant).

    Input ``(V, n, c)`` features, ``(n, d)`` φ and a ``(V, n)`` mask of the volumes covering each
    voxel; output ``(V, n, c)``.
    """

    def __init__(self, channels: int, cond_dim: int, hidden: int = 32, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.mix = nn.Linear(channels + cond_dim, channels)      # the single-layer MLP
        self.norm1 = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * hidden)
        self.proj = nn.Linear(hidden, channels)
        self.norm2 = nn.LayerNorm(channels)
        self.ff = nn.Sequential(nn.Linear(channels, hidden), nn.SiLU(), nn.Linear(hidden, channels))

    def forward(self, x: torch.Tensor, phi: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        V, n, c = x.shape   # mix([x, φ]) without materialising the concatenation at every voxel
        h = F.silu(x @ self.mix.weight[:, :c].T + F.linear(phi.to(x), self.mix.weight[:, c:], self.mix.bias))
        q, k, v = self.qkv(self.norm1(h)).view(V, n, 3, self.heads, -1).unbind(2)   # (V, n, H, hd)
        att = torch.einsum("vihd,vjhd->vhij", q, k) / math.sqrt(q.shape[-1])
        att = att.masked_fill(~valid[:, None, None, :], float("-inf")).softmax(-1)
        h = h + self.proj(torch.einsum("vhij,vjhd->vihd", att, v).reshape(V, n, -1))
        return h + self.ff(self.norm2(h))


@dataclass
class _Level:
    """Geometry of one level for all n volumes, and the grids to and from their shared grid."""

    shapes: list
    affines: list
    factors: list = field(default_factory=list)    # pooling into this level
    to_shared: list = field(default_factory=list)  # grid or None (same grid)
    back: list = field(default_factory=list)
    valid: torch.Tensor | None = None               # (V, n)
    shared_shape: tuple = ()


class VisionNet(nn.Module):
    """m: the native-resolution UNet with cross-volume attention.

    Args:
        cfg: levels, channels, pooling, attention and working-resolution settings.
        embed_dim: b, the size of ε.
        cond_dim: the size of φ.
    """

    def __init__(self, cfg: VisionConfig, embed_dim: int, cond_dim: int = 32):
        super().__init__()
        if len(cfg.channels) != cfg.levels:
            raise ValueError(f"channels {cfg.channels} must list one width per level ({cfg.levels})")
        self.cfg = cfg
        c, g = cfg.channels, cfg.group_size
        attn = lambda ch: CrossVolumeAttention(ch, cond_dim, cfg.attn_hidden, cfg.attn_heads)  # noqa: E731
        self.enc = nn.ModuleList([ConvBlock(cfg.in_channels if l == 0 else c[l - 1], c[l], g)
                                  for l in range(cfg.levels)])
        self.enc_attn = nn.ModuleList([attn(c[l]) for l in range(1, cfg.levels)])
        self.dec = nn.ModuleList([ConvBlock(c[l] + c[l + 1], c[l], g) for l in range(cfg.levels - 1)])
        self.dec_attn = nn.ModuleList([attn(c[l]) for l in range(1, cfg.levels - 1)])
        self.out = nn.Conv3d(c[0], 1, 1)
        nn.init.constant_(self.out.bias, -2.0)   # prior foreground probability ≈ 0.12: masks are sparse
        self.to_eps = nn.Linear(c[-1], embed_dim)
        self.anatomy = self.anatomy_mlp = self.select = None
        if cfg.anatomy_classes:                  # dense anatomy heads + φ → classes selection
            self.anatomy = nn.Linear(c[0], sum(cfg.anatomy_classes))
            if cfg.anatomy_hidden:
                self.anatomy_mlp = _residual_mlp(c[0], cfg.anatomy_hidden, sum(cfg.anatomy_classes))
            self.select = nn.Linear(cond_dim, sum(cfg.anatomy_classes))
            nn.init.constant_(self.select.bias, -4.0)   # selects nothing at first: the free head alone
        self.mask_source = "union"

    #: what a mask is made of (:meth:`_union`): both parts, or one alone (to diagnose which one
    #: scores; ``voxelprompt eval threshold --sources``). An inference setting, not saved.
    MASK_SOURCES = ("union", "free", "selection")

    @property
    def device(self) -> torch.device:
        return self.out.weight.device

    # ------------------------------------------------------------------ public API
    def forward(self, volumes: Sequence, phi: torch.Tensor, anatomy: bool = False):
        """Soft masks in [0, 1], one ``(X, Y, Z)`` tensor per input on its native grid.

        With anatomy heads (``VisionConfig.anatomy_classes``) a mask is the free mask head's
        output or'ed with the union of the anatomy classes φ selects:
        ``1 − (1 − σ(free)) · Π_partitions (1 − Σ_k softmax_k · σ(select(φ))_k)``.

        Args:
            volumes: n ``voxel_lib.Volume`` s (any shapes, spacings, orientations, intensity units).
            phi: ``(n, cond_dim)`` conditioning, one row per volume.
            anatomy: also return the anatomy heads' log-probabilities, one ``(maps, shape, affine)``
                per volume on its working grid: a ``(X·Y·Z, K)`` map per partition, voxels in C
                order (training targets: :mod:`voxelprompt.anatomy_classes`).

        Returns:
            The masks, or ``(masks, anatomy log-probabilities)`` with ``anatomy=True``.
        """
        xs, affs, native = self._prepare(volumes, phi)
        plan = self._plan([x.shape[2:] for x in xs], affs)
        skips = self._encode(xs, phi, plan)
        x = skips[-1]
        for l in range(self.cfg.levels - 2, -1, -1):
            lv, up = plan[l], plan[l + 1]
            x = [self.dec[l](torch.cat([s, _unpool(xi, f, s.shape[2:])], 1))
                 for s, xi, f in zip(skips[l], x, up.factors)]
            if l > 0:
                x = self._interact(self.dec_attn[l - 1], x, phi, lv)
        outs, anat = [], []
        for i, xi in enumerate(x):
            prob = torch.sigmoid(self.out(xi))
            if self.anatomy is not None:    # 1x1x1 convs, run as maps on (voxels, channels)
                logp = [part.log_softmax(1) for part in
                        self._anatomy_logits(xi.reshape(xi.shape[1], -1).T).split(list(self.cfg.anatomy_classes), 1)]
                prob = self._union(prob, logp, phi[i])
                if anatomy:
                    anat.append((logp, plan[0].shapes[i], plan[0].affines[i]))
            shape, aff = native[i]
            if shape != plan[0].shapes[i] or not torch.allclose(aff, plan[0].affines[i], atol=1e-5):
                prob = resample(prob, plan[0].affines[i], shape, aff)
            outs.append(prob[0, 0])
        return (outs, anat) if anatomy else outs

    def _anatomy_logits(self, feats: torch.Tensor) -> torch.Tensor:
        """The anatomy heads' logits ``(voxels, Σ K)`` of top-level features ``(voxels, c[0])``: the
        linear map, plus the residual MLP when the design has one (``VisionConfig.anatomy_hidden``)."""
        out = self.anatomy(feats)
        return out if self.anatomy_mlp is None else out + self.anatomy_mlp(feats)

    def _union(self, prob: torch.Tensor, logp: list, phi: torch.Tensor) -> torch.Tensor:
        """The free mask ``prob`` (1, 1, X, Y, Z) or'ed with the φ-selected anatomy classes
        (``logp``: one ``(voxels, K)`` log-probability map per partition); with
        ``mask_source`` ``"free"`` or ``"selection"``, that part alone."""
        if self.mask_source not in self.MASK_SOURCES:
            raise ValueError(f"mask_source {self.mask_source!r}: expected one of {self.MASK_SOURCES}")
        if self.mask_source == "free":
            return prob
        sel = torch.sigmoid(self.select(phi.to(prob))).split(list(self.cfg.anatomy_classes))
        keep = 1 - prob.reshape(-1) if self.mask_source == "union" else torch.ones_like(prob.reshape(-1))
        for lp, s in zip(logp, sel):
            keep = keep * (1 - (lp.exp() @ s).clamp(0, 1))
        return (1 - keep).reshape(prob.shape)

    def grow_anatomy(self, sizes: Sequence[int], hidden: int | None = None) -> None:
        """Extends the anatomy heads to the partitions ``sizes``, of which the current ones are a
        prefix (``VisionConfig.anatomy_classes``): trained rows are kept, new partitions start fresh
        (their selection bias at −4, so they select nothing at first).

        ``hidden`` (> 0) gives heads that have no residual MLP one of that width
        (``VisionConfig.anatomy_hidden``); its output layer starts at zero, so the grown network's
        outputs are the trained network's. A trained MLP is kept (its new rows start at zero)."""
        old, sizes = tuple(self.cfg.anatomy_classes), tuple(int(k) for k in sizes)
        if not old or sizes[:len(old)] != old:
            raise ValueError(f"anatomy partitions {old} are not a prefix of {sizes}")
        n = sum(old)
        if sizes != old:
            anatomy = nn.Linear(self.anatomy.in_features, sum(sizes)).to(self.anatomy.weight)
            select = nn.Linear(self.select.in_features, sum(sizes)).to(self.select.weight)
            nn.init.constant_(select.bias, -4.0)
            with torch.no_grad():
                for new, cur in ((anatomy, self.anatomy), (select, self.select)):
                    new.weight[:n] = cur.weight
                    new.bias[:n] = cur.bias
            self.anatomy, self.select = anatomy, select
            if self.anatomy_mlp is not None:
                cur = self.anatomy_mlp[2]
                out = nn.Linear(cur.in_features, sum(sizes)).to(cur.weight)
                with torch.no_grad():
                    nn.init.zeros_(out.weight)
                    nn.init.zeros_(out.bias)
                    out.weight[:n] = cur.weight
                    out.bias[:n] = cur.bias
                self.anatomy_mlp[2] = out
            self.cfg = replace(self.cfg, anatomy_classes=sizes)
        if hidden and self.anatomy_mlp is None:
            select = self.select            # registered after the MLP, as a fresh network of this design
            del self.select
            self.anatomy_mlp = _residual_mlp(self.anatomy.in_features, hidden, sum(sizes)).to(self.anatomy.weight)
            self.select = select
            self.cfg = replace(self.cfg, anatomy_hidden=int(hidden))

    def encode(self, volumes: Sequence, phi: torch.Tensor) -> torch.Tensor:
        """ε ``(n, b)``: encoder → global max-pool → linear, one row per volume."""
        xs, affs, _ = self._prepare(volumes, phi)
        plan = self._plan([x.shape[2:] for x in xs], affs)
        bottom = self._encode(xs, phi, plan)[-1]
        return self.to_eps(torch.stack([b.amax(dim=(0, 2, 3, 4)) for b in bottom]))

    def segment(self, volumes: Sequence, phi: torch.Tensor, sessions: Sequence[int] | None = None,
                threshold: float | None = None) -> list:
        """Masks as ``voxel_lib.Volume`` s, max-merged per session (sorted by session index).

        Each merged mask lies on the grid of its session's first volume. With ``threshold`` the
        masks are binary label volumes, otherwise soft probabilities.
        """
        from voxel_lib import Volume
        sessions = list(range(len(volumes))) if sessions is None else list(sessions)
        merged = merge_sessions(self(volumes, phi), [v.shape for v in volumes],
                                [v.affine for v in volumes], sessions)
        out = []
        for m, (_, aff) in merged:
            m = m.detach().cpu()
            out.append(Volume((m > threshold).to(torch.uint8), aff, "label") if threshold is not None
                       else Volume(m.float(), aff, "image"))
        return out

    # ------------------------------------------------------------------ internals
    def _prepare(self, volumes, phi):
        """Input tensors ``(1, C, X, Y, Z)`` and affines on the working grid, and the native grids."""
        if not 1 <= len(volumes) == phi.shape[0]:
            raise ValueError(f"need one φ row per volume: {len(volumes)} volumes, φ {tuple(phi.shape)}")
        xs, affs, native = [], [], []
        floor = self.cfg.min_spacing
        for v in volumes:
            if v.channels != self.cfg.in_channels:
                raise ValueError(f"vision network takes {self.cfg.in_channels}-channel volumes, got {v.channels}")
            native.append((tuple(v.shape), v.affine.to(_F64)))
            w = v.as_image()
            if floor is not None and min(v.spacing) < floor - 1e-6:
                w = w.resample(spacing=[max(s, floor) for s in v.spacing])
            xs.append(normalize_intensity(w.tensor.to(self.device, torch.float32))[None])
            affs.append(w.affine.to(_F64))
        return xs, affs, native

    def _plan(self, shapes, affines) -> list[_Level]:
        pyr = [pyramid(s, a, self.cfg.levels, self.cfg.pool_ratio) for s, a in zip(shapes, affines)]
        plan = []
        for l in range(self.cfg.levels):
            lv = _Level([p[l][0] for p in pyr], [p[l][1] for p in pyr])
            if l > 0:
                lv.factors = [pool_factors(_spacing(p[l - 1][1]), p[l - 1][0], self.cfg.pool_ratio) for p in pyr]
                shape, aff = shared_grid(lv.shapes, lv.affines, self.cfg.shared_grid_factor)
                lv.shared_shape, valid = shape, []
                for s, a in zip(lv.shapes, lv.affines):
                    if s == shape and torch.allclose(a, aff, atol=1e-5):
                        lv.to_shared.append(None)
                        lv.back.append(None)
                        valid.append(torch.ones(shape, dtype=torch.bool, device=self.device))
                    else:
                        g, inside = sampling_grid(s, a, shape, aff, self.device)
                        lv.to_shared.append(g)
                        lv.back.append(sampling_grid(shape, aff, s, a, self.device)[0])
                        valid.append(inside)
                valid = torch.stack([v.reshape(-1) for v in valid], 1)
                valid[~valid.any(1)] = True          # voxels no volume covers: unused, keep finite
                lv.valid = valid
            plan.append(lv)
        return plan

    def _encode(self, xs, phi, plan) -> list[list[torch.Tensor]]:
        skips = []
        for l in range(self.cfg.levels):
            if l > 0:
                xs = [F.max_pool3d(x, f, f, ceil_mode=True) if f != (1, 1, 1) else x
                      for x, f in zip(xs, plan[l].factors)]
            xs = [self.enc[l](x) for x in xs]
            if l > 0:
                xs = self._interact(self.enc_attn[l - 1], xs, phi, plan[l])
            skips.append(xs)
        return skips

    def _interact(self, attn: CrossVolumeAttention, xs, phi, lv: _Level):
        """Resample to the shared grid, attend across volumes, resample back, residual.

        The shared grid is processed in slabs along its first axis of about ``_INTERACT_TOKENS``
        (voxel, volume) pairs: each slab samples the volumes' features at its voxels, attends and
        keeps only its output, so the attention's many per-token temporaries stay small (and in the
        allocator's reused memory instead of fresh pages) whatever the grid size. Same result as one
        pass. With ``VisionConfig.checkpoint_interaction`` and gradients on, each slab is
        recomputed in the backward pass instead of storing its activations (activation memory of
        the interaction ≈ its output only).
        """
        c, n = xs[0].shape[1], len(xs)
        X, Y, Z = lv.shared_shape
        step = max(1, _INTERACT_TOKENS // (n * Y * Z))
        ckpt = self.cfg.checkpoint_interaction and torch.is_grad_enabled()
        slabs = []
        for x0 in range(0, X, step):
            x1 = min(X, x0 + step)
            if ckpt:
                slabs.append(torch.utils.checkpoint.checkpoint(_interact_slab, attn, lv, x0, x1, phi, *xs,
                                                               use_reentrant=False))
            else:
                slabs.append(_interact_slab(attn, lv, x0, x1, phi, *xs))
        out = []
        for i, (x, g) in enumerate(zip(xs, lv.back)):
            hi = torch.cat([sl[i] for sl in slabs], 2) if len(slabs) > 1 else slabs[0][i]
            if g is not None:
                hi = F.grid_sample(hi, g.to(hi.dtype), mode="bilinear", padding_mode="border", align_corners=True)
            out.append(x + hi)
        return out


def _interact_slab(attn: CrossVolumeAttention, lv: _Level, x0: int, x1: int, phi, *xs):
    """The interaction on shared-grid slab ``[x0, x1)``: one ``(1, c, x1 - x0, Y, Z)`` output per volume."""
    c = xs[0].shape[1]
    _, Y, Z = lv.shared_shape
    shared = [x[:, :, x0:x1] if g is None else
              F.grid_sample(x, g[:, x0:x1].to(x.dtype), mode="bilinear", padding_mode="border", align_corners=True)
              for x, g in zip(xs, lv.to_shared)]
    h = attn(torch.stack([s.reshape(c, -1).T for s in shared], 1), phi, lv.valid[x0 * Y * Z:x1 * Y * Z])
    return tuple(h[:, i].T.reshape(1, c, x1 - x0, Y, Z) for i in range(len(xs)))


def _residual_mlp(cin: int, hidden: int, cout: int) -> nn.Sequential:
    """The anatomy heads' per-voxel MLP ``cin → hidden → cout`` (SiLU), added to their linear map; its
    output layer starts at zero, so adding it leaves a trained network's outputs unchanged. On one
    synthetic volume a 64-wide one takes the heads' class-Dice loss from 0.945 to 0.54 in 80 Adam
    steps, the linear map alone to 0.71 (session 10, docs/model.md)."""
    mlp = nn.Sequential(nn.Linear(cin, hidden), nn.SiLU(), nn.Linear(hidden, cout))
    nn.init.zeros_(mlp[2].weight)
    nn.init.zeros_(mlp[2].bias)
    return mlp


def normalize_intensity(x: torch.Tensor, lo: float = 0.005, hi: float = 0.995) -> torch.Tensor:
    """Robust per-volume intensity scaling: the ``lo``/``hi`` quantiles map to 0/1 (clamped to
    [-0.5, 1.5]), so T1w in a.u., ADC in 10⁻⁶ mm²/s and CT in HU all reach the network alike."""
    flat = x.reshape(-1)
    if flat.numel() > 1_000_000:
        flat = flat[:: math.ceil(flat.numel() / 1_000_000)]
    q = torch.quantile(flat.float(), torch.tensor([lo, hi], device=x.device))
    scale = (q[1] - q[0]).clamp(min=1e-6)
    return ((x - q[0]) / scale).clamp(-0.5, 1.5)


def _unpool(x: torch.Tensor, factors, shape) -> torch.Tensor:
    """Inverse of the pooling step: trilinear upsampling onto the skip's grid.

    Equals world-space resampling between the two tracked affines (pooled voxel j is centred on
    fine voxel 2j + 0.5, which is ``interpolate``'s half-pixel convention), only faster.
    """
    if tuple(factors) == (1, 1, 1):
        return x
    up = F.interpolate(x, scale_factor=tuple(float(f) for f in factors), mode="trilinear", align_corners=False)
    return up[:, :, :shape[0], :shape[1], :shape[2]]


def merge_sessions(masks: Sequence[torch.Tensor], shapes, affines, sessions: Sequence[int]):
    """Max-merges masks of one session on the grid of its first volume.

    Returns ``[(mask, (shape, affine)), ...]`` sorted by session index.
    """
    out = []
    for s in sorted(set(sessions)):
        idx = [i for i, si in enumerate(sessions) if si == s]
        r = idx[0]
        m = masks[r]
        for j in idx[1:]:
            mj = masks[j]
            if tuple(shapes[j]) != tuple(shapes[r]) or not torch.allclose(affines[j], affines[r], atol=1e-5):
                mj = resample(mj[None, None], affines[j], tuple(shapes[r]), affines[r], padding="zeros")[0, 0]
            m = torch.maximum(m, mj)
        out.append((m, (tuple(shapes[r]), affines[r].to(_F64))))
    return out


def soft_dice_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 − soft Dice of a probability map and a (soft) target on the same grid."""
    inter = (pred * target).sum()
    return 1 - (2 * inter + eps) / (pred.sum() + target.sum() + eps)


def balanced_bce(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-3,
                 max_ratio: float | None = None) -> torch.Tensor:
    """Class-balanced binary cross-entropy: ½ · mean over the target + ½ · mean over the background,
    a target voxel weighing at most ``max_ratio`` background voxels.

    The soft Dice alone gives a network trained from scratch a weak gradient that dies once the
    output saturates: on an empty target (a prompted structure that is not in the images)
    1 − 1/(1 + Σp), and after an overshoot to all-background, where every sigmoid is flat. A
    cross-entropy term keeps a dense, non-saturating gradient (∂/∂logit = p − y). It must be
    balanced: our targets fill ~0.1–1 % of a whole-brain grid, and with the voxel-mean BCE the
    background outweighs them ~300:1 and pushes every output to zero (measured on a fit of 30
    lesion calls: Dice 0.02–0.03 with it from weights it had saturated; 0.21, stably, with this
    from a fresh network; docs/model.md).

    Fully balanced, though, it over-segments: where the network cannot yet tell the target from
    its surroundings, a constant output over a region in which the target is a fraction f is best
    at p* = w·f / (w·f + 1 − f), w the weight of a target voxel relative to a background one
    (``|background| / |target|``, ~100–300 here). p* passes 0.5 as soon as f > 1 / (1 + w): an
    undecided output lights up every region that holds ~1 % target (session 7: the free channel
    above threshold on 14–26 % of the grid for every call). ``max_ratio`` caps w
    (``ModelConfig.bce_max_ratio``): the loss is
    ``(Σ_bg −log(1 − p) + w Σ_fg −log p) / (|bg| + w·|fg|)`` with ``w = min(|bg| / |fg|, max_ratio)``
    — the balanced form when uncapped, the voxel mean at ``max_ratio`` 1.
    A soft target weights each voxel by ``t`` and ``1 − t``; an empty target has the background
    term alone.
    """
    p = pred.clamp(1e-6, 1 - 1e-6)
    t = target.to(p.dtype)
    fg, bg = t.sum(), (1 - t).sum()
    sum_bg = -((1 - t) * torch.log1p(-p)).sum()
    if float(fg) < eps:
        return sum_bg / bg.clamp_min(eps)
    sum_fg = -(t * torch.log(p)).sum()
    if float(bg) < eps:
        return sum_fg / fg
    w = bg / fg
    if max_ratio is not None and max_ratio > 0:
        w = w.clamp(max=float(max_ratio))
    return (sum_bg + w * sum_fg) / (bg + w * fg)


# ================================================================================= joint model
@dataclass
class LossOutput:
    """The joint loss and its parts."""

    total: torch.Tensor
    ce: torch.Tensor
    dice: torch.Tensor            # mean soft-Dice loss over segment targets (0 if none)
    n_tokens: int                 # number of CE targets
    n_masks: int                  # number of Dice targets
    anatomy: torch.Tensor | None = None   # mean anatomy-head cross-entropy (None if not computed)
    anatomy_dice: torch.Tensor | None = None   # mean anatomy-head soft-Dice loss (None if not computed)
    select: torch.Tensor | None = None    # mean BCE of φ's anatomy-class selection (None if not computed)


class VoxelPrompt(nn.Module):
    """α and m, trained jointly.

    Args:
        config: a :class:`~voxelprompt.configs.ModelConfig` or the name of one (``"cpu"``, ``"paper"``).
    """

    def __init__(self, config: ModelConfig | str = "cpu"):
        super().__init__()
        self.config = get_config(config) if isinstance(config, str) else config
        self.lm = LanguageModel(self.config.lm)
        self.vision = VisionNet(self.config.vision, self.config.lm.hidden, self.config.lm.phi_dim)

    def num_parameters(self) -> dict[str, int]:
        """Parameter counts of the language model, the vision network and the total."""
        lm = sum(p.numel() for p in self.lm.parameters())
        vis = sum(p.numel() for p in self.vision.parameters())
        return {"lm": lm, "vision": vis, "total": lm + vis}

    def generate_step(self, state: LMState, max_tokens: int = 512) -> StepOutput:
        """See :meth:`LanguageModel.generate_step`."""
        return self.lm.generate_step(state, max_tokens)

    def _call_inputs(self, seq: TokenSequence, call):
        vols = []
        for name in call.volumes:
            v = seq.volumes.get(name)
            if v is None:
                raise KeyError(f"vision call argument {name!r} is not an input volume with data; "
                               f"inputs: {sorted(k for k, x in seq.volumes.items() if x is not None)}")
            vols.append(v)
        return vols, [seq.sessions.get(n, 0) for n in call.volumes]

    def _padded(self, seqs: Sequence[TokenSequence]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ``(B, L)`` ids (``<pad>``) and labels (``IGNORE``) on the model's device."""
        n = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), n), PAD_ID, dtype=torch.long)
        labels = torch.full((len(seqs), n), IGNORE, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = s.ids
            labels[i, :len(s)] = s.labels
        dev = self.lm.head.weight.device
        return ids.to(dev), labels.to(dev)

    def lm_loss(self, seqs: Sequence[TokenSequence], segment: bool = False,
                rois: re.Pattern | None = None) -> LossOutput:
        """Batched teacher-forced CE of the language model (the ``lm`` training stage).

        The sequences are right-padded into one batch (causal attention: no real token sees a pad);
        no ``encode`` call runs, so the ε slots keep the zero embedding of ``<pad>``. Several times
        faster per example than :meth:`loss` on CPU: it teaches the program grammar, the
        prompt → structure mapping and when to stop.

        With ``segment=True`` the segment calls also run, with φ read from the same batched pass,
        and add λ · (soft Dice + w · BCE) as in :meth:`loss`: the vision network and φ train at
        the batched pass's cost (a φ whose ``<MOD>`` comes after an ε slot sees zeros there; the
        ``joint`` stage trains that case and ε). ``rois`` restricts the mask loss to the calls
        whose ROI (``"lesion:1"``, ``"absent:glioma"``, ``"Left-Hippocampus"``) it matches.
        """
        dev = self.lm.head.weight.device
        ids, labels = self._padded(seqs)
        h = self.lm(self.lm.embed(ids))
        keep = labels != IGNORE                 # the token head runs on target positions only
        ce = F.cross_entropy(self.lm.head(h[keep]), labels[keep])
        dices, bces, anat, sels = [], [], [], []
        for i, s in enumerate(seqs):
            if segment:
                self._mask_losses(s, h[i], s.mod_positions.to(dev), dices, bces, rois, anat, sels)
            else:
                self._selection_losses(s, h[i], s.mod_positions.to(dev), sels, rois)
        return self._total(ce, dices, bces, int(keep.sum()), anat, sels)

    def vision_loss(self, seqs: Sequence[TokenSequence], rois: re.Pattern | None = None,
                    crop_mm: float | None = None) -> LossOutput:
        """The mask loss of the segment calls alone, the language model frozen (the ``vision`` stage).

        The batched language-model pass runs without gradients; φ's head and the vision network
        train on soft Dice + w · BCE (+ w_a · the anatomy heads' cross-entropy). ``total`` is that
        mask loss (no λ, no CE: ``ce`` is 0). ``crop_mm``: each call on a random crop of its
        volumes (:func:`training_crop`), a cheaper step.
        """
        dev = self.lm.head.weight.device
        ids, _ = self._padded(seqs)
        with torch.no_grad():
            h = self.lm(self.lm.embed(ids))
        dices, bces, anat, sels = [], [], [], []
        for i, s in enumerate(seqs):
            self._mask_losses(s, h[i], s.mod_positions.to(dev), dices, bces, rois, anat, sels, crop_mm)
        out = self._total(h.new_zeros(()), dices, bces, 0, anat, sels)
        out.total = out.total / max(self.config.dice_weight, 1e-12)     # λ · mask → mask
        return out

    def segment_predictions(self, seq: TokenSequence, h: torch.Tensor, mods: torch.Tensor,
                            rois: re.Pattern | None = None, anatomy: list | None = None,
                            selections: list | None = None, crop_mm: float | None = None):
        """Yields ``(call, predicted probabilities, truth)`` per session target of ``seq`` 's segment calls.

        φ is read from the hidden states ``h`` ``(L, b)`` at the call's ``<MOD>`` s (``mods``: the
        sequence's ``<MOD>`` positions); the truth is resampled to the prediction's grid.
        ``rois`` keeps only the calls whose ROI it matches. With a list ``anatomy``, a network
        with anatomy heads and a sequence that carries its subject's anatomy
        (``TokenSequence.anatomy``), each call appends the heads' losses on its volumes
        (``(CE, Dice)``, :meth:`_anatomy_loss`); with a list ``selections``, the BCE of φ's class
        selection (:meth:`_selection_loss`) of each call whose volumes have anatomy truth. With
        ``crop_mm`` each call's volumes are cut to one world box first (:func:`training_crop`): the
        masks, targets and anatomy truth are then those of the crop.
        """
        heads = anatomy is not None and self.vision.anatomy is not None and bool(seq.anatomy)
        for call in seq.calls:
            if call.kind != "segment" or not call.targets or (rois is not None and not rois.search(call.roi)):
                continue
            vols, sessions = self._call_inputs(seq, call)
            if crop_mm:
                vols = training_crop(vols, call.targets, crop_mm)
            phi = self.lm.phi_head(h[mods[call.mods]])
            if selections is not None and self.vision.select is not None and seq.anatomy:
                sel = self._selection_loss(seq, call, phi, sessions)
                if sel is not None:
                    selections.append(sel)
            masks = self.vision(vols, phi, anatomy=heads)
            if heads:
                masks, logits = masks
                parts = self._anatomy_loss(seq, logits, sessions)
                if parts is not None:
                    anatomy.append(parts)
            merged = merge_sessions(masks, [v.shape for v in vols],
                                    [v.affine for v in vols], sessions)
            if len(merged) != len(call.targets):
                raise ValueError(f"segment call on {call.volumes} has {len(merged)} sessions but "
                                 f"{len(call.targets)} targets")
            for (pred, (shape, aff)), tgt in zip(merged, call.targets):
                yield call, pred, _target_on(tgt, shape, aff).to(pred)

    def _anatomy_loss(self, seq: TokenSequence, logits: list, sessions: Sequence[int]) -> torch.Tensor | None:
        """The anatomy heads' losses over a call's volumes and partitions: ``(CE, Dice)``, or None
        when none of the volumes has anatomy truth.

        ``logits``: :meth:`VisionNet.forward` 's per-volume ``(log-probability maps, shape, affine)``;
        each volume's session anatomy is resampled (nearest) onto its working grid once per sequence.
        Network and targets are scored on the partitions both have (the first ones: an older design
        has fewer partitions, and targets may stop early).

        * CE: class-weighted cross-entropy (:func:`~voxelprompt.anatomy_classes.class_weights`).
        * Dice: soft-Dice loss averaged over the foreground classes present, each class counting
          alike however small (SynthSeg's loss; CE alone lets the heads settle on the few large
          classes).

        φ's class selection has its own loss, :meth:`_selection_loss`.
        """
        from .anatomy_classes import IGNORE as ANAT_IGNORE
        from .anatomy_classes import class_weights
        ces, dices = [], []
        for (lg, shape, aff), s in zip(logits, sessions):
            truth = seq.anatomy.get(s)
            if truth is None:
                continue
            key = (s, tuple(shape), aff.numpy().tobytes())
            if key not in seq._anatomy_cache:
                t = truth
                if tuple(t.shape) != tuple(shape) or not torch.allclose(t.affine, aff.to(_F64), atol=1e-5):
                    t = t.resample(shape=shape, affine=aff, mode="nearest")
                seq._anatomy_cache[key] = t.tensor.long()
            t = seq._anatomy_cache[key]
            n = min(len(lg), t.shape[0])
            t = t[:n].to(lg[0].device).reshape(n, -1)
            for k, (lp, w) in enumerate(zip(lg[:n], class_weights([x.shape[1] for x in lg[:n]]))):
                w = None if w is None else lp.new_tensor(w)
                ces.append(F.nll_loss(lp, t[k], weight=w, ignore_index=ANAT_IGNORE))
                ok = t[k] != ANAT_IGNORE
                lab = t[k][ok]
                count = torch.bincount(lab, minlength=lp.shape[1]).to(lp)
                fg = (count > 0).nonzero().flatten()
                fg = fg[fg > 0]
                if len(fg):             # per class: Σ p over its truth voxels, Σ p, |truth|
                    prob = lp[ok].exp()
                    inter = count.new_zeros(len(count)).index_add(0, lab, prob.gather(1, lab[:, None])[:, 0])
                    dices.append(1 - ((2 * inter[fg] + 1) / (prob.sum(0)[fg] + count[fg] + 1)).mean())
        if not ces:
            return None
        ce = torch.stack(ces).mean()
        return torch.stack([ce, torch.stack(dices).mean() if dices else ce.new_zeros(())])

    def selection_targets(self, seq: TokenSequence, call) -> dict:
        """φ's selection targets of a segment call: ``{session: [(wanted, present), ...]}``, one pair of
        ``(K,)`` bool tensors per anatomy partition, read off the session's anatomy truth.

        A class present in the session is wanted when over half its voxels lie inside the call's
        target (resampled, nearest, onto the anatomy grid). Cached on ``seq``.
        """
        from .anatomy_classes import IGNORE as ANAT_IGNORE
        key = ("select", id(call))
        if key in seq._anatomy_cache:
            return seq._anatomy_cache[key]
        sizes = list(self.vision.cfg.anatomy_classes)
        order = sorted({seq.sessions.get(n, 0) for n in call.volumes})   # one target per session
        out = {}
        if len(call.targets) == len(order):
            for s, tgt in zip(order, call.targets):
                truth = seq.anatomy.get(s)
                if truth is None:
                    continue
                inside = tgt.resample(shape=truth.shape, affine=truth.affine, mode="nearest").tensor[0] > 0.5
                lab = truth.tensor.long()
                pairs = []
                for k, n in enumerate(sizes[:lab.shape[0]]):
                    ok = lab[k] != ANAT_IGNORE
                    count = torch.bincount(lab[k][ok], minlength=n)[:n]
                    covered = torch.bincount(lab[k][ok & inside], minlength=n)[:n]
                    pairs.append((covered > 0.5 * count, count > 0))
                out[s] = pairs
        seq._anatomy_cache[key] = out
        return out

    def _selection_loss(self, seq: TokenSequence, call, phi: torch.Tensor, sessions: Sequence[int]):
        """BCE of φ's selection (:meth:`VisionNet._union`) against :meth:`selection_targets`, over
        the present classes of each partition and the call's volumes (``phi``: one row per volume);
        None when the call has no anatomy truth.

        It teaches the selection the classes the call's truth covers: a class present in the volume
        is wanted when over half its voxels lie in the target, else not (classes absent from the
        volume are not scored). Without it the selection only learns through the mask loss, and
        settles on one selection for every prompt.

        Every present class weighs alike, wanted or not, and the sum is divided by the number of
        wanted classes (at least 1): the gradient on a wanted class is that of a balanced BCE, but
        the unwanted ones are not discounted ~100:1, so a selection that cannot yet tell a class
        apart settles at its frequency (σ ≈ 0.01) rather than at σ ≈ 0.25 — with a balanced BCE the
        or over five partitions then put every voxel above threshold (session 6, docs/model.md)."""
        targets = self.selection_targets(seq, call)
        losses = []
        for v, s in enumerate(sessions):
            if s not in targets:
                continue
            logits = self.vision.select(phi[v]).split(list(self.vision.cfg.anatomy_classes))
            for lg, (want, present) in zip(logits, targets[s]):
                present = present.to(lg.device)
                if present.any():
                    y = want.to(lg)[present]
                    bce = F.binary_cross_entropy_with_logits(lg[present], y, reduction="sum")
                    losses.append(bce / y.sum().clamp_min(1))
        return torch.stack(losses).mean() if losses else None

    def _selection_losses(self, seq: TokenSequence, h: torch.Tensor, mods: torch.Tensor, out: list,
                          rois: re.Pattern | None = None) -> None:
        """Appends the selection loss of each of ``seq`` 's segment calls (φ from ``h`` ``(L, b)``) to
        ``out``, without running the vision network: how the ``lm`` stage (and ``joint`` examples
        whose segment calls do not run) teach the language model to put the target in φ."""
        if self.vision.select is None or not seq.anatomy:
            return
        for call in seq.calls:
            if call.kind != "segment" or not call.targets or (rois is not None and not rois.search(call.roi)):
                continue
            _, sessions = self._call_inputs(seq, call)
            sel = self._selection_loss(seq, call, self.lm.phi_head(h[mods[call.mods]]), sessions)
            if sel is not None:
                out.append(sel)

    def _mask_losses(self, seq: TokenSequence, h: torch.Tensor, mods: torch.Tensor,
                     dices: list, bces: list, rois: re.Pattern | None = None,
                     anatomy: list | None = None, selections: list | None = None,
                     crop_mm: float | None = None) -> None:
        """Appends the soft-Dice and BCE losses of ``seq`` 's segment calls, φ read from ``h`` ``(L, b)``
        (and the anatomy heads' losses to ``anatomy``, the selection's to ``selections``; ``crop_mm``:
        on random crops, :func:`training_crop`)."""
        for _, pred, t in self.segment_predictions(seq, h, mods, rois, anatomy, selections, crop_mm):
            dices.append(soft_dice_loss(pred, t))
            bces.append(balanced_bce(pred, t, max_ratio=self.config.bce_max_ratio))

    def _total(self, ce: torch.Tensor, dices: list, bces: list, n_tokens: int,
               anatomy: list | None = None, selections: list | None = None) -> LossOutput:
        """CE + λ · (mean soft Dice + w · mean BCE + w_a · (mean anatomy loss + mean selection BCE)).

        The anatomy loss of a call is its heads' CE + Dice (:meth:`_anatomy_loss`); ``selections``
        holds the selection BCE of each call with anatomy truth (:meth:`_selection_loss`), whether
        its vision network ran or not."""
        dice = torch.stack(dices).mean() if dices else ce.new_zeros(())
        mask = dice + self.config.bce_weight * torch.stack(bces).mean() if bces else dice
        parts = torch.stack(anatomy).mean(0) if anatomy else None
        if parts is not None:
            mask = mask + self.config.anatomy_weight * parts.sum()
        sel = None
        if selections:
            sel = torch.stack(selections).mean()
            mask = mask + self.config.anatomy_weight * sel
        return LossOutput(ce + self.config.dice_weight * mask, ce, dice, n_tokens, len(dices),
                          *(() if parts is None else (parts[0], parts[1])), **({} if sel is None else {"select": sel}))

    def loss(self, seq: TokenSequence, segment: bool = True, rois: re.Pattern | None = None) -> LossOutput:
        """Teacher-forced CE (code, ``<ENDSTEP>``, ``<STOP>``) + λ · (soft Dice + w · BCE) of the segment calls.

        With ``segment=False`` the segment calls are not run (no Dice term; ``encode`` calls still
        run, their ε are inputs): the language-model-only step training uses on a share of the
        examples, since on CPU the vision network costs ~20× the language model. ``rois`` restricts the
        mask loss to the calls whose ROI it matches (see :meth:`lm_loss`).

        The sequence is run in chunks split at the ε slots of ``encode`` calls: each chunk
        extends the KV cache, so the φ of a call (read at its ``<MOD>`` s, earlier in the
        sequence) is known before its ε enter the language model; gradients flow through ε and
        φ into both networks.
        """
        dev = self.vision.device
        ids = seq.ids.to(dev)
        emb = self.lm.embed(ids)[None]
        mods = seq.mod_positions.to(dev)
        blocks = seq.eps_blocks
        cache = self.lm.new_cache() if blocks else None
        bounds = [0] + [p for p, _ in blocks] + [len(seq)]
        hidden: list[torch.Tensor] = []
        for k in range(len(bounds) - 1):
            x = emb[:, bounds[k]:bounds[k + 1]]
            if k > 0:
                h = torch.cat(hidden, 1)[0]
                eps = []
                for ci in blocks[k - 1][1]:
                    call = seq.calls[ci]
                    vols, _ = self._call_inputs(seq, call)
                    eps.append(self.vision.encode(vols, self.lm.phi_head(h[mods[call.mods]])))
                eps = torch.cat(eps)[None]
                x = torch.cat([eps.to(x), x[:, eps.shape[1]:]], 1)
            hidden.append(self.lm(x, cache))
        h = torch.cat(hidden, 1)[0]
        labels = seq.labels.to(dev)
        ce = F.cross_entropy(self.lm.head(h), labels, ignore_index=IGNORE)
        dices, bces, anat, sels = [], [], [], []
        if segment:
            self._mask_losses(seq, h, mods, dices, bces, rois, anat, sels)
        else:
            self._selection_losses(seq, h, mods, sels, rois)
        return self._total(ce, dices, bces, int((labels != IGNORE).sum()), anat, sels)


def training_crop(volumes: Sequence, targets: Sequence, size_mm: float, rng=None,
                  target_prob: float = 0.5) -> list:
    """A segment call's volumes cut to one world box, for a cheaper training step.

    The box spans the whole left–right extent (world x: a crop that lost the midline could not
    tell a left structure from its mirror image) and ``size_mm`` along y and z (posterior–anterior,
    inferior–superior), centred at a random voxel of a random non-empty target with probability
    ``target_prob`` (nnU-Net's foreground oversampling), else at a uniform point of the first
    volume's field of view. Every volume, oblique ones too, is cut to the bounding box of its voxels
    inside that slab (``Volume.crop``: the affines follow), so the volumes of a call overlap as
    they did; if the slab misses one of them the call keeps its full volumes.

    Args:
        volumes: the call's ``voxel_lib.Volume`` s.
        targets: its truth masks (``Volume`` s, any grid).
        size_mm: edge of the box along y and z, in mm.
        rng: a ``random.Random`` (default: the ``random`` module, which training seeds and checkpoints).
    """
    import random as _random

    from voxel_lib import GeometryError
    rng = rng or _random
    full = [t for t in targets if t is not None and bool((t.tensor[:1] > 0.5).any())]
    if full and rng.random() < target_prob:
        t = full[rng.randrange(len(full))]
        idx = torch.nonzero(t.tensor[0] > 0.5)
        centre = t.voxel_to_world(idx[rng.randrange(len(idx))].numpy().astype(float))
    else:
        v = volumes[0]
        corners = v.voxel_to_world(np.array([[i, j, k] for i in (0, v.shape[0] - 1)
                                             for j in (0, v.shape[1] - 1) for k in (0, v.shape[2] - 1)], float))
        lo, hi = corners.min(0), corners.max(0)
        centre = np.array([rng.uniform(lo[a], hi[a]) for a in range(3)])
    half = size_mm / 2.0
    out = []
    for v in volumes:               # the voxels whose centres lie in the slab, for any orientation
        w = v.world_coordinates()
        inside = ((w[1] - centre[1]).abs() <= half) & ((w[2] - centre[2]).abs() <= half)
        if not inside.any():
            return list(volumes)
        try:
            out.append(v.crop(v.new(inside[None].to(torch.uint8), kind="label")))
        except GeometryError:
            return list(volumes)
    return out


def _target_on(target, shape, affine) -> torch.Tensor:
    """A truth mask as a float ``(X, Y, Z)`` tensor on the given grid (linear resampling if needed)."""
    t = target.tensor[:1].float()
    if target.is_label:
        t = (t > 0).float()
    v = target.new(t, kind="image")
    if tuple(target.shape) != tuple(shape) or not torch.allclose(target.affine, affine.to(_F64), atol=1e-5):
        v = v.resample(shape=shape, affine=affine, mode="linear", antialias=False)
    return v.tensor[0]
