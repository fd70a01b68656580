"""IJB scoring on template features: media/template pooling, 1:1 pair scores and 1:N searches, in bounded memory.

IJB pairs join a few thousand enrolment templates with the probe templates, so scoring the pairs as blocks of a
template-by-template matrix product and gathering the wanted entries costs far less than one dot product per
pair; pairs spread thinly over many templates fall back to gathered dot products.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import scipy.sparse
import torch

from faceforge.eval.metrics import SearchOutcomes, search_outcomes

BLOCK_ELEMENTS = 1 << 24  # entries of one block of the score matrix (64 MB of float32)
GATHER_PAIRS = 2048  # pairs per chunk of gathered dot products: small enough to stay in cache
# A gathered dot product costs ~18x one entry of a blocked matrix product (2 CPU cores, D = 512: 1.4 us vs 75 ns,
# benchmarks/ijb_scoring.py), so blocks win while at least one entry in 16 of the template-by-template matrix
# is a wanted pair (IJB-C: one in 4.4).
DENSE_RATIO = 16


def pool_templates(
    features: np.ndarray,
    templates: np.ndarray,
    medias: np.ndarray,
    weights: np.ndarray | None = None,
    normalize_images: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(sorted template ids, float32 [T, D] unit template features), pooled as InsightFace does by default.

    Each image feature is scaled by its weight (the detector's faceness score: "D1") and, unless
    `normalize_images` ("N0"), keeps its norm as a quality weight ("N1"). Within a template the images of one
    media (the frames of a video) are averaged, the media are summed and the sum is L2-normalised.
    """
    features = np.asarray(features, dtype=np.float32)
    templates, medias = np.asarray(templates).ravel(), np.asarray(medias).ravel()
    n = len(features)
    if features.ndim != 2 or templates.size != n or medias.size != n:
        raise ValueError(f"need [N, D] features with N template and media ids, got {features.shape}, "
                         f"{templates.size}, {medias.size}")
    scale = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    if normalize_images:
        scale = scale / np.maximum(np.linalg.norm(features, axis=1), 1e-12)
    template_ids, template_of = np.unique(templates, return_inverse=True)
    _, media_of, media_size = np.unique(
        np.stack([template_of, medias], axis=1), axis=0, return_inverse=True, return_counts=True
    )
    media_of = media_of.ravel()
    # One sparse product does both steps: image i enters its template with weight scale_i / |media(i)|.
    pooling = scipy.sparse.csr_matrix(
        ((scale / media_size[media_of]).astype(np.float32), (template_of, np.arange(n))), shape=(template_ids.size, n)
    )
    pooled = np.asarray(pooling @ features, dtype=np.float64)
    pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
    return template_ids, pooled.astype(np.float32)


def _compact(rows: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(the distinct rows used, each entry's position among them) in linear time (no sort of the pairs)."""
    used = np.zeros(count, dtype=bool)
    used[rows] = True
    position = np.cumsum(used) - 1
    return np.flatnonzero(used), position[rows]


def score_pairs(
    features: np.ndarray,
    left: np.ndarray,
    right: np.ndarray,
    device: str | torch.device = "cpu",
    method: Literal["auto", "blocked", "gather"] = "auto",
) -> np.ndarray:
    """float32 dot products features[left[k]] . features[right[k]] of every pair k (cosines for unit rows).

    "blocked" multiplies blocks of the left templates by all the right templates and gathers the pairs of each
    block; "gather" takes dot products of gathered rows; "auto" picks by the density of pairs in that matrix.
    """
    left, right = np.asarray(left, dtype=np.int64).ravel(), np.asarray(right, dtype=np.int64).ravel()
    if left.shape != right.shape:
        raise ValueError(f"left and right differ in length: {left.size} vs {right.size}")
    features = np.asarray(features, dtype=np.float32)
    if left.size == 0:
        return np.empty(0, dtype=np.float32)
    rows_a, a = _compact(left, len(features))
    rows_b, b = _compact(right, len(features))
    if rows_a.size > rows_b.size:
        rows_a, a, rows_b, b = rows_b, b, rows_a, a
    if method == "auto":
        method = "blocked" if rows_a.size * rows_b.size <= DENSE_RATIO * left.size else "gather"
    device = torch.device(device)
    if method == "gather":
        return _gathered(features, left, right, device)
    fa, fb = (torch.from_numpy(features[rows]).to(device) for rows in (rows_a, rows_b))
    return _blocked(fa, fb, a, b)


def _gathered(features: np.ndarray, left: np.ndarray, right: np.ndarray, device: torch.device) -> np.ndarray:
    # numpy's row gathers and einsum run ~10x faster than torch's indexing on the CPU; torch serves GPUs.
    out = np.empty(left.size, dtype=np.float32)
    feats = torch.from_numpy(features).to(device) if device.type != "cpu" else None
    for start in range(0, left.size, GATHER_PAIRS):
        chunk = slice(start, start + GATHER_PAIRS)
        if feats is None:
            out[chunk] = np.einsum("ij,ij->i", features[left[chunk]], features[right[chunk]])
        else:
            x, y = (feats[torch.from_numpy(rows[chunk]).to(device)] for rows in (left, right))
            out[chunk] = (x * y).sum(dim=1).cpu().numpy()
    return out


def _blocked(fa: torch.Tensor, fb: torch.Tensor, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Scores fa[a[k]] . fb[b[k]], one block of fa's rows times all of fb at a time."""
    block = max(1, BLOCK_ELEMENTS // len(fb))
    which = a // block
    # Counting sort of the pairs by block: a stable argsort of small unsigned ints is a radix sort in numpy.
    order = np.argsort(which.astype(np.uint16 if which.max() < 1 << 16 else np.uint32), kind="stable")
    bounds = np.r_[0, np.cumsum(np.bincount(which))]
    out = np.empty(a.size, dtype=np.float32)
    fb_t = fb.T.contiguous()
    for k in range(bounds.size - 1):
        pairs = order[bounds[k]:bounds[k + 1]]
        if pairs.size == 0:
            continue
        start = k * block
        scores = (fa[start:start + block] @ fb_t).view(-1)
        flat = (a[pairs] - start) * len(fb) + b[pairs]
        if scores.device.type == "cpu":
            out[pairs] = np.take(scores.numpy(), flat)
        else:
            out[pairs] = scores[torch.from_numpy(flat).to(scores.device)].cpu().numpy()
    return out


def search(
    features: np.ndarray,
    probe_rows: np.ndarray,
    probe_subjects: np.ndarray,
    gallery_rows: np.ndarray,
    gallery_subjects: np.ndarray,
    device: str | torch.device = "cpu",
) -> SearchOutcomes:
    """1:N search of every probe template against a gallery, a block of probes at a time (bounded memory)."""
    feats = torch.as_tensor(np.asarray(features, dtype=np.float32)).to(device)
    gallery = feats[torch.as_tensor(np.asarray(gallery_rows, dtype=np.int64)).to(device)].T.contiguous()
    probe_rows = np.asarray(probe_rows, dtype=np.int64)
    block = max(1, BLOCK_ELEMENTS // max(1, gallery.shape[1]))
    parts = []
    for start in range(0, probe_rows.size, block):
        rows = torch.from_numpy(probe_rows[start:start + block]).to(device)
        scores = (feats[rows] @ gallery).cpu().numpy()
        parts.append(search_outcomes(scores, probe_subjects[start:start + block], gallery_subjects))
    return SearchOutcomes.concatenate(parts)
