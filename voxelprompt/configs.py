"""Model sizes: the CPU default that ships, the paper's configuration, and a tiny one for tests.

``cpu`` is sized so the whole system (language model + vision network) trains on two CPU cores in
a few hours and runs a request in seconds: its vision network has 16/16/32/32 channels and dense
anatomy heads (``VisionConfig.anatomy_classes``, voxelprompt/anatomy_classes.py) and works on a
grid no finer than 3 mm (``VisionConfig.min_spacing``; finer volumes are resampled down before
the network and the masks back up to the native grid), and it is trained on 3 mm synthetic data.
At 2 mm with 16/32/32/32 channels a training example took 11–14 s on one core; at 3 mm a segment
call takes ~1 s per input volume without the heads, ~2 s with them. ``paper`` is seeds/004
A.1/A.3: a 16-layer LLaMA with b = 512, a 32k vocabulary and a six-level 32/96-channel UNet at
native resolution, without anatomy heads.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from .anatomy_classes import SIZES as ANATOMY_SIZES


@dataclass(frozen=True)
class LMConfig:
    """The language model α (a LLaMA decoder built from config; never downloaded)."""

    vocab_size: int = 3000
    hidden: int = 256            # b: token embedding size, also the size of ε
    layers: int = 4
    heads: int = 8
    intermediate: int = 704      # SwiGLU hidden size
    phi_dim: int = 32            # φ channels (linear + SiLU on the hidden state at <MOD>)
    max_positions: int = 8192
    rope_theta: float = 10000.0


@dataclass(frozen=True)
class VisionConfig:
    """The native-resolution UNet m with cross-volume attention."""

    levels: int = 4
    channels: tuple[int, ...] = (8, 16, 16, 16)    # output channels per level (top first)
    in_channels: int = 1
    group_size: int = 4           # GroupNorm: channels per group
    pool_ratio: float = 2.0       # pool an axis only while spacing < pool_ratio x the finest spacing
    attn_hidden: int = 32         # width of the cross-volume transformer (seeds/004 A.3)
    attn_heads: int = 4
    min_spacing: float | None = 3.0   # working-resolution floor (mm); None = native resolution
    shared_grid_factor: float = 2.0   # cap: the shared interaction grid (per-axis geometric-mean
    #   spacing over the union of the fields of view) holds at most this x the largest volume's voxels
    checkpoint_interaction: bool = False   # training: recompute the cross-volume interaction in the
    #   backward pass instead of storing its activations (less memory, ~1 more interaction pass)
    mask_threshold: float = 0.5   # a mask is the voxels above this probability; chosen on validation
    #   subjects by `voxelprompt eval threshold --write` (voxelprompt/calibrate.py)
    anatomy_classes: tuple[int, ...] = ()   # dense anatomy heads, one per partition (class counts,
    #   voxelprompt/anatomy_classes.SIZES); () = the paper's network (mask head alone)
    anatomy_hidden: int = 0       # > 0: the heads add a residual per-voxel MLP (c[0] -> this -> classes,
    #   SiLU) to their linear map; its output layer starts at zero (VisionNet.grow_anatomy adds one)


@dataclass(frozen=True)
class ModelConfig:
    """The joint model: α, m and the loss weight λ of the Dice term."""

    name: str = "cpu"
    lm: LMConfig = field(default_factory=LMConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    dice_weight: float = 0.1      # λ (seeds/004 A.4)
    bce_weight: float = 1.0       # mask loss = soft Dice + this x class-balanced BCE (model.balanced_bce)
    bce_max_ratio: float | None = 10.0   # in that BCE a target voxel weighs at most this many background
    #   voxels (None: fully balanced, stages up to sel-v15; it over-segments, docs/model.md)
    anatomy_weight: float = 1.0   # + this x the anatomy heads' cross-entropy (when the network has them)

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (for checkpoints)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Inverse of :meth:`to_dict`."""
        v = dict(d["vision"])
        v["channels"] = tuple(v["channels"])
        v["anatomy_classes"] = tuple(v.get("anatomy_classes", ()))
        return cls(name=d.get("name", "custom"), lm=LMConfig(**d["lm"]), vision=VisionConfig(**v),
                   dice_weight=d.get("dice_weight", 0.1),
                   bce_weight=d.get("bce_weight", 1.0),
                   bce_max_ratio=d.get("bce_max_ratio", cls.bce_max_ratio), anatomy_weight=d.get("anatomy_weight", 1.0))


CONFIGS: dict[str, ModelConfig] = {
    "cpu": ModelConfig(vision=VisionConfig(channels=(16, 16, 32, 32), anatomy_classes=ANATOMY_SIZES,
                                           anatomy_hidden=64)),
    "paper": ModelConfig(
        name="paper",
        lm=LMConfig(vocab_size=32000, hidden=512, layers=16, heads=32, intermediate=1024),
        vision=VisionConfig(levels=6, channels=(32, 96, 96, 96, 96, 96), min_spacing=None,
                            checkpoint_interaction=True),   # GPU training is memory-bound
    ),
    "tiny": ModelConfig(
        name="tiny",
        lm=LMConfig(vocab_size=512, hidden=64, layers=2, heads=4, intermediate=128, max_positions=4096),
        vision=VisionConfig(levels=3, channels=(4, 8, 8), attn_hidden=8, attn_heads=2, min_spacing=None,
                            anatomy_classes=ANATOMY_SIZES),
    ),
}


def get_config(name: str = "cpu", **lm_overrides) -> ModelConfig:
    """A named configuration; keyword arguments override ``LMConfig`` fields (e.g. ``vocab_size``)."""
    if name not in CONFIGS:
        raise KeyError(f"unknown model config {name!r}; known: {', '.join(CONFIGS)}")
    cfg = CONFIGS[name]
    return replace(cfg, lm=replace(cfg.lm, **lm_overrides)) if lm_overrides else cfg
