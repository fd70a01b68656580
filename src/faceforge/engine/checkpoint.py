"""Training checkpoints: weights as safetensors plus a trainer-state file, both written atomically."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from faceforge.errors import DataError
from faceforge.fileio import LATEST, atomic_write


def model_state(backbone: nn.Module, head: nn.Module) -> dict[str, torch.Tensor]:
    """Flat `backbone.*` / `head.*` tensors, contiguous and on the CPU, as safetensors wants them."""
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    state.update({f"head.{k}": v for k, v in head.state_dict().items()})
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def save_checkpoint(ckpt_dir: Path, step: int, backbone: nn.Module, head: nn.Module, trainer_state: dict) -> Path:
    """Write step_N.safetensors and step_N.state.pt, then point latest.json at them."""
    weights = ckpt_dir / f"step_{step:08d}.safetensors"
    state = ckpt_dir / f"step_{step:08d}.state.pt"
    atomic_write(weights, lambda tmp: save_file(model_state(backbone, head), tmp, metadata={"step": str(step)}))
    atomic_write(state, lambda tmp: torch.save(trainer_state, tmp))
    latest = {"step": step, "weights": weights.name, "state": state.name}
    atomic_write(ckpt_dir / LATEST, lambda tmp: Path(tmp).write_text(json.dumps(latest)))
    return weights


def load_trainer_state(path: Path) -> dict:
    """Trainer state (optimizer, scaler, RNG, counters), loaded with weights_only so it runs no code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling failure of a corrupt or foreign file is a data error
        raise DataError(f"cannot read trainer state {path}: {exc}") from None
