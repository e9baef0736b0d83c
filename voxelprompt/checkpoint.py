"""Model weights on disk: safetensors + a JSON config, and the shipped default checkpoint.

A checkpoint is two files side by side: ``NAME.safetensors`` (the weights of
:class:`~voxelprompt.model.VoxelPrompt`, float32) and ``NAME.json`` (``{"config": ModelConfig dict,
...training info}``). The default model is ``voxelprompt/assets/voxelprompt-cpu.safetensors``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

DEFAULT_PATH = Path(__file__).parent / "assets" / "voxelprompt-cpu.safetensors"


def config_path(weights: str | Path) -> Path:
    """The JSON file that goes with a ``.safetensors`` file."""
    return Path(weights).with_suffix(".json")


def save_model(model, path: str | Path, info: dict | None = None) -> Path:
    """Writes ``path`` (safetensors) and its JSON config, each atomically (tmp file + rename)."""
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt", "config": json.dumps(model.config.to_dict())})
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    meta = {"config": model.config.to_dict(), **(info or {})}
    cj = config_path(path)
    tmpj = cj.with_name(cj.name + ".tmp")
    tmpj.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmpj, cj)
    return path


def load_model(path: str | Path | None = None, device: str | torch.device = "cpu"):
    """A :class:`~voxelprompt.model.VoxelPrompt` with trained weights, in eval mode.

    Args:
        path: a ``.safetensors`` file, or a training run directory (its latest checkpoint);
            the shipped default checkpoint if omitted.
        device: where to put the model.

    Raises:
        FileNotFoundError: when there is no such checkpoint (or none is shipped).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    from .configs import ModelConfig
    from .model import VoxelPrompt

    p = Path(path) if path is not None else DEFAULT_PATH
    if p.is_dir():
        for cand in (p / "ckpt" / "model.safetensors", p / "ckpt.old" / "model.safetensors", p / "model.safetensors"):
            if cand.exists():
                p = cand
                break
    if not p.exists():
        if path is None:
            raise FileNotFoundError(
                f"no trained VoxelPrompt checkpoint is shipped ({p} is missing); train one with "
                "`voxelprompt train --config cpu --out DIR` and pass its model.safetensors, or copy it there")
        raise FileNotFoundError(f"checkpoint {p} not found")
    cj = config_path(p)
    if cj.exists():
        cfg = json.loads(cj.read_text())["config"]
    else:
        with safe_open(str(p), "pt") as f:
            meta = f.metadata() or {}
        if "config" not in meta:
            raise ValueError(f"{p}: no {cj.name} next to it and no config in its metadata")
        cfg = json.loads(meta["config"])
    model = VoxelPrompt(ModelConfig.from_dict(cfg))
    missing, unexpected = model.load_state_dict(load_file(str(p)), strict=False)
    missing = [k for k in missing if not k.endswith("inv_freq")]
    if missing or unexpected:
        raise ValueError(f"{p} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(device).eval()
