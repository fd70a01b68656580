"""Training checkpoints: weights as safetensors plus a trainer-state file (optimizer, scaler, RNG, counters).

Both are independent of the number of processes: class-sharded head tensors (centres and their optimizer state)
are written whole and sliced to the reading rank's shard on loading. Neither way does any process but rank 0 hold
a whole [N, D] matrix: saving sends each rank's rows to rank 0's host in chunks (distributed.gather_rows_to_main),
loading reads each rank's rows alone out of memory maps of the files.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from faceforge.engine import checkpoint_files as files
from faceforge.distributed import all_reduce_scalars, gather_rows_to_main
from faceforge.engine.parallel import Parallel
from faceforge.engine.step import StepParts
from faceforge.errors import DataError, FaceforgeError
from faceforge.fileio import load_into, load_weight_rows, split_state
from faceforge.heads import Head
from faceforge.heads.base import is_class_rows


def _class_keys(head: Head) -> set[str]:
    return {f"head.{name}" for name in head.class_parameters}


def named_parameters(backbone: nn.Module, head: Head) -> dict[str, nn.Parameter]:
    """Every trained parameter under its checkpoint name (`backbone.*`, `head.*`)."""
    params = {f"backbone.{k}": v for k, v in backbone.named_parameters()}
    params.update({f"head.{k}": v for k, v in head.named_parameters()})
    return params


def _sharded_keys(head: Head) -> set[str]:
    return _class_keys(head) if head.shard.group is not None else set()


def _whole_rows(value: torch.Tensor, head: Head, par: Parallel) -> torch.Tensor | None:
    """A class-sharded tensor made whole on rank 0's host (None on the other ranks); every rank calls it."""
    return gather_rows_to_main(value, head.num_classes, par.group, par.device)


def model_state(backbone: nn.Module, head: Head, par: Parallel | None = None) -> dict[str, torch.Tensor]:
    """Flat `backbone.*` / `head.*` tensors, whole, contiguous and on the CPU: what rank 0 writes.

    Every rank calls it (in the same order: the class-sharded tensors are gathered to rank 0); on the other ranks
    the class-sharded tensors are left out, since only rank 0 writes.
    """
    par = par or Parallel()
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    state.update({f"head.{k}": v for k, v in head.state_dict().items()})
    sharded = _sharded_keys(head)
    out = {}
    for key, value in state.items():
        value = _whole_rows(value, head, par) if key in sharded else value
        if value is not None:
            out[key] = value.detach().cpu().contiguous()
    return out


def optimizer_state(optimizer: torch.optim.Optimizer, backbone: nn.Module, head: Head, par: Parallel) -> dict:
    """The optimizer's per-parameter state keyed by parameter name, on the CPU, class rows whole on rank 0 and left
    out on the other ranks (as in model_state)."""
    sharded = _sharded_keys(head)
    out = {}
    for name, p in named_parameters(backbone, head).items():
        out[name] = {}
        for key, value in optimizer.state.get(p, {}).items():
            value = _whole_rows(value, head, par) if name in sharded and is_class_rows(value, p) else value
            if value is not None:
                out[name][key] = value.cpu()
    return out


def shard_head_state(head: Head, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A whole head state dict cut to this head's class shard (a no-op for a whole or replicated head)."""
    params = dict(head.named_parameters())
    cut = set(head.class_parameters)
    return {
        k: head.shard.rows_of(v) if k in cut and is_class_rows(v, params[k], head.num_classes) else v
        for k, v in state.items()
    }


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, backbone: nn.Module, head: Head, saved: dict[str, dict[str, torch.Tensor]]
) -> None:
    """Put name-keyed state back on this process's parameters, class rows sliced to its shard.

    Every value is copied out of `saved`, which may be a memory map of the file (load_trainer_state's `mmap`):
    then only this shard's rows are read, and nothing keeps the file mapped (nor, once deleted, on disk).

    It goes through the optimizer's own load_state_dict, which puts every value where that optimizer expects it:
    a fused or capturable AdamW's `step` on the parameter's device, the other tensors on its device and dtype.
    The param groups (learning rate, weight decay) stay those of the current config.
    """
    cut = _class_keys(head)
    index = {id(p): i for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"])}
    state = {}
    for name, p in named_parameters(backbone, head).items():
        if name not in saved:
            raise DataError(f"trainer state has no optimizer state for {name}")
        if saved[name] and id(p) in index:
            state[index[id(p)]] = {
                k: head.shard.rows_of(v) if name in cut and is_class_rows(v, p, head.num_classes) else v.clone()
                for k, v in saved[name].items()
            }
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


def rng_state(device: torch.device, par: Parallel) -> dict[str, list[torch.Tensor | None]]:
    """Every rank's CPU generator state and, when it trains on CUDA, its device's generator state (rank order).

    No head or regularizer owns a torch.Generator: PartialFC's class sampling (heads/centres.py sample_classes), SDE's
    random sign (regularizers/sde.py), PTSA's draws (regularizers/rsp.py), GIF's random codes and dropout all draw
    from the global CPU or device generator, so these states make a resumed run replay every draw. (The flip mask
    has a generator seeded from the step.)
    """
    mine = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
    if not par.active:
        return {k: [v] for k, v in mine.items()}
    every: list = [None] * par.world_size
    dist.all_gather_object(every, mine, group=par.group)
    return {k: [ranks[k] for ranks in every] for k in mine}


def restore_rng(saved: dict | torch.Tensor, device: torch.device, par: Parallel) -> None:
    """Set this rank's generators from rng_state's record: its own at the same world size, else rank 0's."""
    if torch.is_tensor(saved):  # checkpoints from before CUDA states: the CPU state of rank 0
        saved = {"cpu": [saved], "cuda": [None]}

    def own(states: list) -> torch.Tensor | None:
        return states[par.rank] if len(states) == par.world_size else states[0]

    torch.set_rng_state(own(saved["cpu"]))
    cuda = own(saved["cuda"])
    if device.type == "cuda" and cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def save_checkpoint(ckpt_dir: Path, step: int, backbone: nn.Module, head: Head, trainer_state: dict,
                    par: Parallel | None = None, keep: int = 0) -> Path:
    """Write step_N.safetensors and step_N.state.pt (rank 0), record them in latest.json, keep the newest `keep`.

    Every rank calls it. Under torchrun the ranks then agree (MIN) on whether rank 0's write worked, so that every
    rank stops with CheckpointNotWritten when it did not.
    """
    par = par or Parallel()
    tensors = model_state(backbone, head, par)
    failure = None
    if par.is_main:
        writers = {
            files.weights_name(step): lambda tmp: save_file(tensors, tmp, metadata={"step": str(step)}),
            files.state_name(step): lambda tmp: torch.save(trainer_state, tmp),
        }
        try:
            files.write_checkpoint(ckpt_dir, step, writers, keep)
        except FaceforgeError as exc:  # CheckpointNotWritten, or a bad train.keep_checkpoints
            failure = exc
    if par.active:
        ok = all_reduce_scalars([float(failure is None)], dist.ReduceOp.MIN, par.group, par.device)
        if not par.is_main and not bool(ok[0]):
            failure = files.CheckpointNotWritten(f"rank 0 could not write the checkpoint of step {step}; "
                                                 "its message says why")
    if failure is not None:
        raise failure
    return ckpt_dir / files.weights_name(step)


def _shard_rows(head: Head) -> Callable[[str, list[int]], slice | None]:
    """Which rows of a checkpoint tensor this rank reads: for a class parameter of a sharded head stored whole (as
    shard_head_state cuts), its shard's; all of any other tensor."""
    params = dict(head.named_parameters())
    cut = _sharded_keys(head)

    def rows(name: str, shape: list[int]) -> slice | None:
        stored = torch.empty(shape, device="meta")  # the shape alone, for the rule every class-row test uses
        if name not in cut or not is_class_rows(stored, params[name.removeprefix("head.")], head.num_classes):
            return None
        return slice(head.shard.start, head.shard.start + head.shard.count)

    return rows


def _load_model(weights: Path, backbone: nn.Module, head: Head) -> None:
    """The weights file into the backbone and the head, this rank reading only its class shard's rows."""
    state = load_weight_rows(weights, _shard_rows(head))
    load_into(backbone, split_state(state, "backbone"), f"{weights} (backbone)")
    load_into(head, split_state(state, "head"), f"{weights} (head)")


def load_checkpoint(ckpt_dir: Path, step: int, parts: StepParts) -> dict:
    """Load checkpoint `step` into `parts` (weights, optimizer, scaler, this rank's RNG); returns its run counters.

    Each rank reads its class shard's rows of the centres and their optimizer state, not the whole matrices.
    """
    _load_model(ckpt_dir / files.weights_name(step), parts.backbone, parts.head)
    saved = load_trainer_state(ckpt_dir / files.state_name(step), mmap=True)
    load_optimizer_state(parts.optimizer, parts.backbone, parts.head, saved["optimizer"])
    parts.scaler.load_state_dict(saved["scaler"])
    restore_rng(saved["rng"], parts.device, parts.par)
    return saved["run"]


def load_trainer_state(path: Path, mmap: bool = False) -> dict:
    """Trainer state (optimizer, scaler, RNG, counters), loaded with weights_only so it runs no code.

    With `mmap` its tensors are views of a memory map of the file, read only where used (a rank's rows): the file
    must then stay as it is while they are alive (overwriting it in place would make them fault).
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # any unpickling failure of a corrupt or foreign file is a data error
        raise DataError(f"cannot read trainer state {path}: {exc}") from None
