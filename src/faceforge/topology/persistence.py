"""0-dimensional Vietoris–Rips persistence of a distance matrix, i.e. its minimum spanning tree, in pure torch.

Every H0 class is born at 0 and dies when the edge that merges its component enters the filtration, so the
persistence pairs are exactly the edges Kruskal keeps. They are found here by Borůvka's algorithm: a fixed number of
rounds of whole-matrix tensor operations, with no Python loop over edges and no host synchronisation, so the same
code runs on CPU and GPU.
"""

from __future__ import annotations

import torch


def _boruvka_rounds(n: int) -> int:
    """Rounds that always suffice: every round pairs each component with at least one other, so the count of
    components c becomes at most ⌊c/2⌋."""
    return max(n.bit_length() - 1, 0)


@torch.no_grad()
def _mst_edge_keys(w: torch.Tensor) -> torch.Tensor:
    """Keys g·n² + i·n + j (i < j) of the n − 1 MST edges of each of the G symmetric matrices w [G, n, n].

    Edges are ordered by (weight, i·n + j), a strict total order, so Borůvka's simultaneous choices never close
    a cycle even when weights tie. Component labels are global vertex numbers g·n + v.
    """
    g_count, n, _ = w.shape
    device = w.device
    vertices = torch.arange(g_count * n, device=device)
    local = torch.arange(n, device=device)
    graph_start = vertices - vertices % n
    comp = vertices.view(g_count, n)
    keys, kept = [], []
    for r in range(_boruvka_rounds(n)):
        cross = comp[:, :, None] != comp[:, None, :]
        # For row u, the edge id i·n + j grows with the column v, so argmin's first minimum has the smallest id.
        masked = torch.where(cross, w, float("inf"))
        best_v = masked.argmin(dim=2)
        best_w = masked.gather(2, best_v[..., None]).squeeze(2)
        best_id = torch.minimum(local, best_v) * n + torch.maximum(local, best_v)
        labels = comp.reshape(-1)
        comp_w = torch.full_like(best_w.reshape(-1), float("inf")).scatter_reduce(
            0, labels, best_w.reshape(-1), "amin")
        at_min = best_w.reshape(-1) == comp_w[labels]
        comp_id = torch.full_like(labels, n * n).scatter_reduce(
            0, labels, torch.where(at_min, best_id.reshape(-1), n * n), "amin")
        valid = comp_w < float("inf")
        edge = torch.where(valid, comp_id, 0)
        a = labels[graph_start + edge // n]
        b = labels[graph_start + edge % n]
        other = torch.where(a == vertices, b, a)
        mutual = valid & (comp_id[other] == comp_id)
        keep = valid & ~(mutual & (other < vertices))
        parent = torch.where(valid & ~(mutual & (vertices < other)), other, vertices)
        depth = max((n >> r) - 1, 1)
        for _ in range(depth.bit_length()):
            parent = parent[parent]
        comp = parent[comp]
        keys.append(graph_start * n + edge)
        kept.append(keep)
    if not keys:
        return torch.zeros(g_count, 0, dtype=torch.long, device=device)
    keys_all, kept_all = torch.cat(keys), torch.cat(kept)
    # Exactly G·(n − 1) edges are kept; a stable sort moves them to the front without a data-dependent size.
    first = torch.argsort(kept_all.to(torch.uint8), descending=True, stable=True)[: g_count * (n - 1)]
    return keys_all[first].sort().values.view(g_count, n - 1)


def persistence0(dist: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """H0 persistence pairs of a symmetric distance matrix [n, n] (or a stack [G, n, n]): the MST edges.

    Returns edges [n − 1, 2] (LongTensor, i < j) and their death times [n − 1] (births are all 0), sorted by death
    as Kruskal meets them; leading G dimension for a stack. The edges come from the detached matrix; the deaths
    are `dist[edges]`, so gradients flow into the selected entries. Distances must be finite.
    """
    if dist.ndim not in (2, 3) or dist.shape[-1] != dist.shape[-2]:
        raise ValueError(f"persistence0 expects a square matrix [n, n] or a stack [G, n, n], got {list(dist.shape)}")
    stacked = dist if dist.ndim == 3 else dist[None]
    g_count, n, _ = stacked.shape
    d = stacked.detach()
    keys = _mst_edge_keys(torch.minimum(d, d.transpose(1, 2)))
    graph = keys // (n * n)
    i, j = keys % (n * n) // n, keys % n
    order = d[graph, i, j].argsort(dim=1, stable=True)
    graph, i, j = (t.gather(1, order) for t in (graph, i, j))
    edges, deaths = torch.stack([i, j], dim=-1), stacked[graph, i, j]
    return (edges, deaths) if dist.ndim == 3 else (edges[0], deaths[0])
