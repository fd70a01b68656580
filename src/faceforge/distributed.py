"""Process-group bookkeeping and the collectives with gradient that heads and the trainer share.

With one process (no torch.distributed initialised) every function is the identity, so the same code runs both ways.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    return dist.get_rank(group) if is_distributed() else 0


def world_size(group: Any = None) -> int:
    return dist.get_world_size(group) if is_distributed() else 1


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
        t = values.detach().to(device=device, dtype=torch.float64).reshape(-1).clone()
    else:
        t = torch.tensor(list(values), dtype=torch.float64, device=device)
    if is_distributed() and group is not None:
        dist.all_reduce(t, op=op, group=group)
    return t
