"""torchrun support for the engine: process-group set-up, this rank's class shard, DDP with summed gradients.

Training objective with K processes: the head loss over the global batch plus the mean of the per-rank
regularizer losses. Class-sharded heads see the all-gathered batch and each rank differentiates only its own
classes' terms; every replicated parameter (backbone, GIF heads, SphereFace2's bias) then needs its gradients
summed over ranks, never averaged: DDP gets a summing communication hook. The rows a replicated head sampled
(GIF's code vectors) are summed sparsely instead: the union of every rank's rows, so every rank updates the same.
The collectives themselves (with gradient, of scalars, of class rows) and the split of classes over ranks live in
faceforge/distributed.py, below the heads.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from faceforge import distributed
from faceforge.errors import ConfigError
from faceforge.heads import ClassShard, Head
from faceforge.heads.centres import SampledBlock


@dataclass(frozen=True)
class Parallel:
    """Where this process sits: rank, world size, local rank (its GPU), the process group (None alone) and the
    device its collectives take tensors on (NCCL: this rank's GPU; gloo: the CPU)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    group: Any = None
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.group is not None


def init_from_env(timeout_s: float) -> Parallel:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); alone without.

    Under torchrun the group is joined even by a single process, so that one GPU runs the multi-GPU path (NCCL,
    DDP, a class shard); a plain `python -m faceforge train` uses no torch.distributed at all.
    Collectives that wait longer than `timeout_s` (a rank died) raise instead of hanging.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not all(k in os.environ for k in ("RANK", "MASTER_ADDR", "MASTER_PORT")):
        return Parallel()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    device = torch.device("cuda", local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
    return Parallel(distributed.rank(), distributed.world_size(), local_rank, dist.group.WORLD, device)


def class_shard(num_classes: int, par: Parallel) -> ClassShard:
    """This rank's contiguous block of classes (distributed.shard_bounds: sizes differ by at most one)."""
    if num_classes < par.world_size:
        raise ConfigError(f"{num_classes} classes cannot be split over {par.world_size} processes")
    return ClassShard(*distributed.shard_range(num_classes, par.world_size, par.rank), par.group)


def _sum_hook(group, bucket):  # unannotated: DDP inspects a hook's annotations and rejects string ones
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def _compressed_sum_hook(state, bucket):
    """The summing all-reduce on a bf16/fp16 copy of the bucket: half the bytes on the wire, sum semantics kept
    (torch's own compress hooks average). The fp32 gradients get the rounded sum back."""
    group, dtype = state
    buffer = bucket.buffer()
    work = dist.all_reduce(buffer.to(dtype), group=group, async_op=True)

    def decompress(fut):
        return buffer.copy_(fut.value()[0])

    return work.get_future().then(decompress)


def wrap_backbone(
    backbone: nn.Module,
    par: Parallel,
    bucket_mb: float = 25.0,
    static_graph: bool = False,
    compress: torch.dtype | None = None,
) -> nn.Module:
    """DDP whose all-reduce sums the gradients (see the module docstring), sent as `compress` (bf16/fp16) when
    given; the backbone itself alone."""
    if not par.active:
        return backbone
    ids = [par.local_rank] if next(backbone.parameters()).is_cuda else None
    ddp = nn.parallel.DistributedDataParallel(backbone, device_ids=ids, forward_sync_buffers=False,
                                              bucket_cap_mb=bucket_mb, static_graph=static_graph)
    if compress is None:
        ddp.register_comm_hook(par.group, _sum_hook)
    else:
        ddp.register_comm_hook((par.group, compress), _compressed_sum_hook)
    return ddp


def unwrap(backbone: nn.Module) -> nn.Module:
    return backbone.module if isinstance(backbone, nn.parallel.DistributedDataParallel) else backbone


def _replicated(head: Head, par: Parallel) -> bool:
    return par.active and head.shard.group is None


def sum_replicated_head_grads(head: Head, par: Parallel) -> None:
    """A replicated head (no class shard, e.g. GIF) sums its gradients over ranks. A sharded head needs nothing:
    its centres are its own and its shared parameters get whole gradients in its backward (SphereFace2's bias).
    A parameter whose rows the head sampled has no gradient, so no dense all-reduce: its rows' gradients are
    summed sparsely by sampled_blocks_over_ranks."""
    if _replicated(head, par):
        distributed.sum_grads(head.parameters(), par.group)


def sampled_blocks_over_ranks(head: Head, par: Parallel) -> dict[str, SampledBlock]:
    """The sampled blocks the step updates: the head's own, or for a replicated head under torchrun every rank's
    merged (distributed.sum_rows_over_ranks): the union of the ranks' rows, read from this rank's parameter (the
    replicas are equal), with their gradients summed, so that every rank applies the same update to the same rows.
    A block without a gradient counts as zeros, so that every rank joins every collective."""
    blocks = head.sampled_blocks()
    if not _replicated(head, par):
        return blocks
    params = dict(head.named_parameters())
    merged = {}
    for name, (index, block) in blocks.items():
        grad = torch.zeros_like(block) if block.grad is None else block.grad
        union, summed = distributed.sum_rows_over_ranks(index, grad, par.group)
        rows = params[name].detach().index_select(0, union).requires_grad_()
        rows.grad = summed
        merged[name] = SampledBlock(union, rows)
    return merged
