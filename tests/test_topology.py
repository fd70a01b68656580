"""persistence0 (0-dim persistence pairs = MST edges) against scipy's minimum spanning tree."""

import numpy as np
import pytest
import torch
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components, minimum_spanning_tree
from scipy.spatial.distance import cdist

from faceforge.topology import persistence0


def _points_distances(n: int, seed: int) -> np.ndarray:
    return cdist(*[np.random.default_rng(seed).normal(size=(n, 6))] * 2)


def _scipy_mst(d: np.ndarray) -> tuple[set[tuple[int, int]], float]:
    """scipy's MST edges (i < j) and total weight; the upper triangle is the same undirected graph, read faster."""
    tree = minimum_spanning_tree(csr_matrix(np.triu(d))).tocoo()
    return {(min(a, b), max(a, b)) for a, b in zip(tree.row.tolist(), tree.col.tolist())}, tree.data.sum()


@pytest.mark.parametrize("n", [2, 3, 4, 5, 8, 9, 31, 128, 257, 2048])
def test_matches_scipy_mst(n):
    d = _points_distances(n, seed=n)
    edges, deaths = persistence0(torch.from_numpy(d))
    assert edges.dtype == torch.long and edges.shape == (n - 1, 2) and deaths.shape == (n - 1,)
    ref_edges, ref_total = _scipy_mst(d)
    assert {tuple(e) for e in edges.tolist()} == ref_edges  # distinct weights: the MST is unique
    assert deaths.sum().item() == pytest.approx(ref_total, rel=1e-12)
    assert bool((edges[:, 0] < edges[:, 1]).all()) and bool((deaths[1:] >= deaths[:-1]).all())
    np.testing.assert_array_equal(deaths.numpy(), d[edges[:, 0].numpy(), edges[:, 1].numpy()])


@pytest.mark.parametrize("n", [6, 40, 300])
def test_tied_weights_give_a_minimum_spanning_tree(n):
    d = np.random.default_rng(n).integers(1, 4, size=(n, n)).astype(np.float64)
    d = np.triu(d, 1) + np.triu(d, 1).T
    edges, deaths = persistence0(torch.from_numpy(d))
    assert deaths.sum().item() == _scipy_mst(d)[1]  # integer weights: exact
    adjacency = np.zeros((n, n))
    adjacency[edges[:, 0].numpy(), edges[:, 1].numpy()] = 1
    assert len({tuple(e) for e in edges.tolist()}) == n - 1
    assert connected_components(adjacency, directed=False)[0] == 1


def test_degenerate_sizes_and_bad_shapes():
    for n in (0, 1):
        edges, deaths = persistence0(torch.zeros(n, n))
        assert edges.shape == (0, 2) and deaths.shape == (0,)
    with pytest.raises(ValueError, match="square"):
        persistence0(torch.zeros(3, 4))


def test_stack_matches_single_matrices_and_keeps_dtype():
    mats = torch.stack([torch.from_numpy(_points_distances(50, s)).float() for s in range(3)])
    edges, deaths = persistence0(mats)
    assert edges.shape == (3, 49, 2) and deaths.dtype == torch.float32
    for g in range(3):
        e, w = persistence0(mats[g])
        assert torch.equal(edges[g], e) and torch.equal(deaths[g], w)


def test_gradient_flows_only_into_tree_entries():
    d = torch.from_numpy(_points_distances(20, 3)).requires_grad_(True)
    edges, deaths = persistence0(d)
    (deaths * torch.arange(1.0, 20.0, dtype=torch.float64)).sum().backward()
    expected = torch.zeros(20, 20, dtype=torch.float64)
    expected[edges[:, 0], edges[:, 1]] = torch.arange(1.0, 20.0, dtype=torch.float64)
    assert torch.equal(d.grad, expected)
