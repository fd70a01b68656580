"""The one home of torch.distributed plumbing: rank and world size, the split of rows (classes) over ranks, the
collectives with gradient that heads and the step share, and the scalar and row collectives of the engine.

With one process (no torch.distributed initialised, or no group) every function is the identity, so the same code
runs both ways. Nothing here knows about heads or the engine: both import it, it imports neither.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def shutdown() -> None:
    """Leave the process group once every rank got here; destroying it while a peer still waits on its last
    collective makes gloo abort that peer ("terminate called without an active exception")."""
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


def rank(group: Any = None) -> int:
    """This process's rank in `group` (the default group when None); 0 alone."""
    return dist.get_rank(group) if is_distributed() else 0


def world_size(group: Any = None) -> int:
    """How many processes `group` spans (the default group when None); 1 alone."""
    return dist.get_world_size(group) if is_distributed() else 1


def shard_bounds(num_rows: int, world: int) -> list[int]:
    """Start of every rank's contiguous block of `num_rows` rows, and the end: blocks differ by at most one row.

    The one split of classes over ranks: the heads' class shards, checkpoint gathering and the memory planner use it.
    """
    return [num_rows * r // world for r in range(world + 1)]


def shard_range(num_rows: int, world: int, rank: int) -> tuple[int, int]:
    """(start, count) of rank `rank`'s block."""
    bounds = shard_bounds(num_rows, world)
    return bounds[rank], bounds[rank + 1] - bounds[rank]


def largest_shard(num_rows: int, world: int) -> int:
    """Rows of the largest block (what the memory planner sizes a rank's share by)."""
    bounds = shard_bounds(num_rows, world)
    return max(b - a for a, b in zip(bounds, bounds[1:]))


class _AllGather(torch.autograd.Function):
    """Concatenate every rank's [b, ...] tensor along dim 0; backward sums the gradients and keeps this rank's rows.

    The sum is right when each rank's loss carries a disjoint part of the gradient (class shards, chunked sums).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        size = grad.shape[0] // dist.get_world_size(ctx.group)
        start = dist.get_rank(ctx.group) * size
        return grad[start:start + size], None


def all_gather_with_grad(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Every rank's rows of `x` (equal sizes), differentiable; `x` itself without torch.distributed."""
    return _AllGather.apply(x, group) if is_distributed() else x


def all_gather_nograd(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Every rank's rows of `x` (equal sizes), e.g. labels."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts)


class _SumOverRanks(torch.autograd.Function):
    """All-reduce SUM whose backward passes the gradient through unchanged.

    Every rank computes the same (replicated) loss from the summed value, so each rank's inputs must receive
    exactly their own gradient; torch's differentiable all_reduce would multiply it by the world size.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def sum_over_ranks(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Elementwise sum of `x` over `group`, differentiable (each rank's `x` gets the gradient of the sum); `x`
    itself when group is None. Class-sharded heads sum their per-shard parts of a row's loss with it."""
    return x if group is None else _SumOverRanks.apply(x, group)


class _SumGradOverRanks(torch.autograd.Function):
    """Identity whose backward all-reduces the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def sum_grad_over_ranks(x: torch.Tensor, group: Any) -> torch.Tensor:
    """`x` unchanged, its gradient summed over `group` in backward: a parameter replicated on every rank of a
    class-sharded head (SphereFace2's bias) gets the whole gradient, so its copies stay equal. `x` when None."""
    return x if group is None else _SumGradOverRanks.apply(x, group)


def max_over_ranks(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Elementwise max of a detached `x` over `group`, in place (no gradient: stability shifts, accuracy)."""
    if group is not None:
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
    return x


def sum_grads(params: Iterable[torch.Tensor], group: Any) -> None:
    """Sum every parameter's gradient over `group` in place (parameters without one are skipped)."""
    if group is None:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)


ROW_CHUNK_BYTES = 1 << 24  # 16 MiB: the largest message of gather_rows_to_main, the most it adds on any device


def gather_rows_to_main(
    t: torch.Tensor, num_rows: int, group: Any, device: torch.device, chunk_rows: int | None = None
) -> torch.Tensor | None:
    """The whole [num_rows, ...] tensor in rank 0's host memory, from every rank's block of rows (shard_bounds'
    split); None on the other ranks; `t` itself when group is None.

    What a checkpoint of class-sharded centres needs without an all_gather's whole copy on every rank: rank r
    sends its block to rank 0 in chunks of `chunk_rows` rows (default: ROW_CHUNK_BYTES' worth), and rank 0 copies
    each into a preallocated CPU tensor as it arrives. A chunk travels on `device`, the group's (NCCL: this rank's
    GPU, through one reused buffer on rank 0; gloo: the CPU, received straight into the result), so no rank holds
    more than its block plus one chunk, and the whole matrix exists only on rank 0's host.
    """
    if group is None:
        return t
    t = t.detach().contiguous()
    row_bytes = max(1, t.element_size() * t[:1].numel())
    chunk_rows = chunk_rows or max(1, ROW_CHUNK_BYTES // row_bytes)
    if rank(group) != 0:
        for start in range(0, len(t), chunk_rows):
            dist.send(t[start:start + chunk_rows].to(device), group=group, group_dst=0)
        return None
    whole = torch.empty((num_rows, *t.shape[1:]), dtype=t.dtype)
    whole[: len(t)].copy_(t)
    bounds = shard_bounds(num_rows, world_size(group))
    buffer = None if device.type == "cpu" else torch.empty((chunk_rows, *t.shape[1:]), dtype=t.dtype, device=device)
    for src, (begin, end) in enumerate(zip(bounds[1:-1], bounds[2:]), start=1):
        for start in range(begin, end, chunk_rows):
            rows = whole[start:min(start + chunk_rows, end)]
            arrived = rows if buffer is None else buffer[: len(rows)]
            dist.recv(arrived, group=group, group_src=src)
            if buffer is not None:
                rows.copy_(arrived)
    return whole


def all_reduce_scalars(
    values: Sequence[float] | torch.Tensor, op: dist.ReduceOp.RedOpType, group: Any, device: torch.device
) -> torch.Tensor:
    """A few numbers reduced over the group in one collective, as a float64 tensor on `device`.

    `device` must be one the group's backend serves: NCCL serves CUDA tensors only, so a tensor made on the
    CPU by default fails there ("No backend type associated with device type cpu"). Every scalar collective of
    training (non-finite guard, time budget, stop signals) goes through here. No host read: the caller decides
    when to look. Without torch.distributed the values come back unchanged.
    """
    if isinstance(values, torch.Tensor):
        t = values.detach().to(device=device, dtype=torch.float64, copy=True).reshape(-1)
    else:
        t = torch.tensor(list(values), dtype=torch.float64, device=device)
    if is_distributed() and group is not None:
        dist.all_reduce(t, op=op, group=group)
    return t


def _all_gather_padded(t: torch.Tensor, counts: list[int], group: Any) -> list[torch.Tensor]:
    """Every rank's `t` (rank r's has counts[r] rows), each padded to the largest for the collective."""
    padded = t.new_zeros((max(counts), *t.shape[1:]))
    padded[: len(t)] = t
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded, group=group)
    return [part[:n] for part, n in zip(parts, counts)]


def sum_rows_over_ranks(index: torch.Tensor, rows: torch.Tensor, group: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's rows [S_r, ...] at its distinct row indices `index` [S_r] summed over `group`: the sorted union
    of all ranks' indices and, at each, the sum of the rows the ranks gave it, the same on every rank.

    What a replicated parameter's sampled rows need instead of an all-reduce of the whole [N, ...] gradient. The
    sizes differ by rank (one host read of them); duplicates are added rank after rank, so every rank rounds the
    same. (index, rows) when group is None.
    """
    if group is None:
        return index, rows
    size = torch.tensor([len(index)], device=rows.device)
    sizes = [torch.empty_like(size) for _ in range(world_size(group))]
    dist.all_gather(sizes, size, group=group)
    counts = torch.cat(sizes).tolist()
    indices = _all_gather_padded(index, counts, group)
    parts = _all_gather_padded(rows, counts, group)
    union = torch.unique(torch.cat(indices))
    summed = rows.new_zeros((len(union), *rows.shape[1:]))
    for part_index, part in zip(indices, parts):
        summed.index_add_(0, torch.searchsorted(union, part_index), part)
    return union, summed
