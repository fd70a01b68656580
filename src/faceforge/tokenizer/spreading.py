"""Uniformity spreading of code vectors on the sphere (Gaussian potential, Wang & Isola 2020), as GIF does."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm import tqdm

_SIMILARITY_ELEMENTS = 1 << 25  # bounds one [queries, N] block of neighbour_overlap (128 MB in fp32)


def gaussian_potential(h: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """log mean over pairs i != j of exp(−t‖h_i − h_j‖²), for L2-normalised rows h [m, D] (m >= 2)."""
    m = len(h)
    logits = -t * (2.0 - 2.0 * (h @ h.t()))
    logits = logits.masked_fill(torch.eye(m, dtype=torch.bool, device=h.device), float("-inf"))
    return torch.logsumexp(logits.flatten(), 0) - math.log(m * (m - 1))


def spread(
    vectors: torch.Tensor,
    epochs: int,
    t: float = 2.0,
    lr: float = 0.1,
    subset: int = 2048,
    seed: int = 0,
    progress: bool = False,
) -> torch.Tensor:
    """Unit vectors [N, D] moved apart by SGD on the Gaussian potential of random identity subsets.

    Each epoch visits every identity once, `subset` at a time; after every step the moved rows are put back
    on the sphere, so the vectors stay unit length throughout.
    """
    if subset < 2:
        raise ValueError(f"subset must hold at least 2 identities, got {subset}")
    h = F.normalize(vectors.detach().float(), dim=1)
    gen = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(epochs), desc="spread", disable=not progress, dynamic_ncols=True):
        for ids in torch.randperm(len(h), generator=gen).to(h.device).split(subset):
            if len(ids) < 2:
                continue
            rows = h[ids].requires_grad_()
            (grad,) = torch.autograd.grad(gaussian_potential(F.normalize(rows, dim=1), t), rows)
            h[ids] = F.normalize(rows.detach() - lr * grad, dim=1)
    return h


@torch.no_grad()
def sampled_potential(h: torch.Tensor, t: float = 2.0, sample: int = 4096, seed: int = 0) -> float:
    """The Gaussian potential of a fixed random subset of the rows: comparable before and after spreading."""
    ids = torch.randperm(len(h), generator=torch.Generator().manual_seed(seed))[:sample].to(h.device)
    return float(gaussian_potential(F.normalize(h[ids].float(), dim=1), t)) if len(ids) >= 2 else 0.0


@torch.no_grad()
def neighbour_overlap(before: torch.Tensor, after: torch.Tensor, k: int = 10, sample: int = 1000, seed: int = 0) -> float:
    """Mean fraction of each sampled identity's k nearest neighbours (cosine) that are the same after spreading."""
    n = len(before)
    k = min(k, n - 1)
    if k < 1:
        return 1.0
    queries = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:sample].to(before.device)
    a, b = F.normalize(before.float(), dim=1), F.normalize(after.float(), dim=1)
    step = max(1, _SIMILARITY_ELEMENTS // n)
    kept = 0
    for q in queries.split(step):
        self_hit = torch.zeros(len(q), n, dtype=torch.bool, device=a.device)
        self_hit[torch.arange(len(q)), q] = True
        near_a = (a[q] @ a.t()).masked_fill(self_hit, float("-inf")).topk(k, dim=1).indices
        near_b = (b[q] @ b.t()).masked_fill(self_hit, float("-inf")).topk(k, dim=1).indices
        kept += int((near_a[:, :, None] == near_b[:, None, :]).any(dim=2).sum())
    return kept / (len(queries) * k)
