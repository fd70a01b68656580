"""Balanced hierarchical k-means: every identity gets a unique code of l tokens, each token < v.

Level d splits every node of the tree into at most v children of at most v**(l - d - 1) identities, so a node
never holds more identities than its subtree has codes. The children are not clustered node by node: each level
fits one set of v unit "anchors" (spherical k-means) to the directions in which identities lie from their node's
mean, and a node's members go to the anchors they point at, under the size cap. Token c at position d thus means
the same direction from the parent in every node, which is what lets GIF predict all positions with independent
heads; at the first level it is plain spherical k-means.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from faceforge.errors import ConfigError
from faceforge.tokenizer.codebook import check_codes


def code_length(num_identities: int, v: int) -> int:
    """The smallest l >= 1 with v**l >= num_identities."""
    length, capacity = 1, v
    while capacity < num_identities:
        length, capacity = length + 1, capacity * v
    return length


def build_codes(
    prototypes: torch.Tensor,
    v: int,
    seed: int = 0,
    length: int | None = None,
    iters: int = 20,
    sample: int = 65536,
) -> torch.Tensor:
    """Codes [N, l] (int64, on the CPU) from prototypes [N, D]: similar prototypes share long prefixes.

    `length` defaults to code_length(N, v). Each level's anchors are fitted on a random `sample` of the
    identities (mini-batch k-means, on the prototypes' device), then every identity is assigned.
    """
    if not isinstance(v, int) or v < 2:
        raise ConfigError(f"v must be an integer >= 2, got {v!r}")
    if prototypes.ndim != 2 or len(prototypes) == 0:
        raise ConfigError(f"prototypes must be a non-empty [N, D] matrix, got {list(prototypes.shape)}")
    n = len(prototypes)
    length = code_length(n, v) if length is None else length
    if length < 1 or v**length < n:
        raise ConfigError(f"codes of length {length} over v={v} give {v**length} codes, fewer than {n} identities")
    x = F.normalize(prototypes.detach().float(), dim=1)
    gen = torch.Generator().manual_seed(seed)
    node = torch.zeros(n, dtype=torch.long, device=x.device)
    num_nodes = 1
    codes = torch.empty(n, length, dtype=torch.long, device=x.device)
    directions = torch.empty_like(x)  # the one N×D buffer reused by every level: N×D may be 2M×512 (4 GB)
    for depth in range(length):
        counts = torch.bincount(node, minlength=num_nodes).clamp_min(1)
        means = torch.zeros(num_nodes, x.shape[1], device=x.device).index_add_(0, node, x) / counts[:, None]
        torch.index_select(means, 0, node, out=directions).neg_().add_(x)
        directions.div_(directions.norm(dim=1, keepdim=True).clamp_min(1e-12))
        picked = torch.randperm(n, generator=gen)[:sample].to(x.device)
        anchors = spherical_kmeans(directions[picked], v, gen, iters)
        codes[:, depth] = capped_assign(directions @ anchors.t(), node, num_nodes, v ** (length - depth - 1))
        node_keys, node = torch.unique(node * v + codes[:, depth], return_inverse=True)
        num_nodes = len(node_keys)
    codes = codes.cpu()
    check_codes(codes, v, "build_codes")
    return codes


def spherical_kmeans(points: torch.Tensor, k: int, gen: torch.Generator, iters: int = 20) -> torch.Tensor:
    """k unit centres [k, D] of unit (or zero) rows: greedy k-means++ seeding (the best of 2 + ln k draws per
    centre, as scikit-learn does), then Lloyd steps on cosine similarity. With fewer distinct points than k, the
    spare centres are random directions."""
    n, dim = points.shape
    centres = F.normalize(torch.randn(k, dim, generator=gen), dim=1).to(points.device)
    if n == 0:
        return centres
    first = int(torch.randint(n, (1,), generator=gen))
    centres[0] = points[first]
    nearest = points @ points[first]
    tries = 2 + int(math.log(k))
    for c in range(1, k):
        d2 = (2.0 - 2.0 * nearest).clamp_min(0.0)
        if float(d2.sum()) <= 1e-12:
            break
        picks = torch.multinomial(d2.cpu(), tries, replacement=True, generator=gen).to(points.device)
        candidates = torch.maximum(nearest[:, None], points @ points[picks].t())
        best = int(candidates.sum(dim=0).argmax())
        centres[c] = points[picks[best]]
        nearest = candidates[:, best]
    labels = None
    for _ in range(iters):
        new_labels = (points @ centres.t()).argmax(dim=1)
        if labels is not None and torch.equal(new_labels, labels):
            break
        labels = new_labels
        sums = torch.zeros_like(centres).index_add_(0, labels, points)
        filled = sums.norm(dim=1) > 0
        centres[filled] = F.normalize(sums[filled], dim=1)
    return centres


def capped_assign(sims: torch.Tensor, node: torch.Tensor, num_nodes: int, cap: int) -> torch.Tensor:
    """Each point's cluster [n] given its similarity [n, k] to the k clusters of its node, at most `cap` points per
    (node, cluster): points propose to their best open cluster, the most similar win, the others try again."""
    k = sims.shape[1]
    remaining = torch.full((num_nodes * k,), cap, dtype=torch.long, device=sims.device)
    token = torch.full((len(sims),), -1, dtype=torch.long, device=sims.device)
    todo = torch.arange(len(sims), device=sims.device)
    while len(todo):
        open_ = remaining.view(num_nodes, k)[node[todo]] > 0
        best, choice = sims[todo].masked_fill(~open_, float("-inf")).max(dim=1)
        slot = node[todo] * k + choice
        order = torch.argsort(-best, stable=True)
        order = order[torch.argsort(slot[order], stable=True)]
        sorted_slot = slot[order]
        rank = torch.arange(len(order), device=sims.device) - torch.searchsorted(sorted_slot, sorted_slot)
        accept = rank < remaining[sorted_slot]
        if not accept.any():
            raise RuntimeError("balanced k-means: no open cluster left for some identities")
        token[todo[order[accept]]] = choice[order[accept]]
        remaining -= torch.bincount(sorted_slot[accept], minlength=len(remaining))
        todo = todo[order[~accept]]
    return token
