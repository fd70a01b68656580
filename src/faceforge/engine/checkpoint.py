"""Training checkpoints: weights as safetensors plus a trainer-state file, both written atomically.

Both are independent of the number of processes: class-sharded head tensors (centres and their optimizer state)
are gathered whole before writing and sliced to the reading rank's shard on loading.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from faceforge.engine.parallel import Parallel, gather_rows, own_rows
from faceforge.errors import DataError
from faceforge.fileio import LATEST, atomic_write
from faceforge.heads import Head


def _class_keys(head: Head) -> set[str]:
    return {f"head.{name}" for name in head.class_parameters}


def named_parameters(backbone: nn.Module, head: Head) -> dict[str, nn.Parameter]:
    """Every trained parameter under its checkpoint name (`backbone.*`, `head.*`)."""
    params = {f"backbone.{k}": v for k, v in backbone.named_parameters()}
    params.update({f"head.{k}": v for k, v in head.named_parameters()})
    return params


def model_state(backbone: nn.Module, head: Head, par: Parallel | None = None) -> dict[str, torch.Tensor]:
    """Flat `backbone.*` / `head.*` tensors, whole (shards gathered), contiguous and on the CPU."""
    par = par or Parallel()
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    state.update({f"head.{k}": v for k, v in head.state_dict().items()})
    sharded = _class_keys(head) if head.shard.group is not None else set()
    for key in sharded:
        state[key] = gather_rows(state[key], head.num_classes, par)
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def optimizer_state(optimizer: torch.optim.Optimizer, backbone: nn.Module, head: Head, par: Parallel) -> dict:
    """The optimizer's per-parameter state keyed by parameter name, sharded rows gathered whole."""
    sharded = _class_keys(head) if head.shard.group is not None else set()
    out = {}
    for name, p in named_parameters(backbone, head).items():
        state = optimizer.state.get(p, {})
        out[name] = {
            k: (gather_rows(v, head.num_classes, par) if name in sharded and v.shape == p.shape else v).cpu()
            for k, v in state.items()
        }
    return out


def shard_head_state(head: Head, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A whole head state dict cut to this head's class shard (a no-op for a whole or replicated head)."""
    cut = set(head.class_parameters)
    return {k: own_rows(v, head.shard) if k in cut and v.shape[0] == head.num_classes else v for k, v in state.items()}


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, backbone: nn.Module, head: Head, saved: dict[str, dict[str, torch.Tensor]]
) -> None:
    """Put name-keyed state back on this process's parameters, slicing class rows to its shard."""
    cut = _class_keys(head)
    for name, p in named_parameters(backbone, head).items():
        if name not in saved:
            raise DataError(f"trainer state has no optimizer state for {name}")
        optimizer.state[p] = {
            k: (own_rows(v, head.shard) if name in cut and v.ndim and v.shape[0] == head.num_classes else v).to(
                p.device if v.ndim else v.device)
            for k, v in saved[name].items()
        }


def save_checkpoint(
    ckpt_dir: Path, step: int, backbone: nn.Module, head: Head, trainer_state: dict, par: Parallel | None = None
) -> Path:
    """Write step_N.safetensors and step_N.state.pt (rank 0), then point latest.json at them; every rank calls it."""
    par = par or Parallel()
    weights = ckpt_dir / f"step_{step:08d}.safetensors"
    state = ckpt_dir / f"step_{step:08d}.state.pt"
    tensors = model_state(backbone, head, par)
    if par.is_main:
        atomic_write(weights, lambda tmp: save_file(tensors, tmp, metadata={"step": str(step)}))
        atomic_write(state, lambda tmp: torch.save(trainer_state, tmp))
        latest = {"step": step, "weights": weights.name, "state": state.name}
        atomic_write(ckpt_dir / LATEST, lambda tmp: Path(tmp).write_text(json.dumps(latest)))
    if par.active:
        dist.barrier(group=par.group)
    return weights


def load_trainer_state(path: Path) -> dict:
    """Trainer state (optimizer, scaler, RNG, counters), loaded with weights_only so it runs no code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling failure of a corrupt or foreign file is a data error
        raise DataError(f"cannot read trainer state {path}: {exc}") from None
