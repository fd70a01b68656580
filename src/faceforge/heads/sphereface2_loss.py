"""SphereFace2's per-sample loss over one shard's centres as a single autograd function, so that a step keeps one
[B, C] buffer (the raw cosines) through backward instead of every intermediate of the formula.

The rest ([B, chunk] at a time) is computed over column chunks in forward and again in backward; each row's target
term is a [B] vector computed apart (by the labels, no one-hot matrix), so the chunks see negatives only.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple, TypeVar

import torch

from faceforge.heads.centres import NORM_EPS, angle, unit_rows_backward_
from faceforge.runtime import fp32_only

# Columns per chunk: a chunk's temporaries are two fp32 [B, CHUNK_COLUMNS] buffers and [CHUNK_COLUMNS, D] ones,
# whatever the shard's width, so the [B, C] cosines are the only buffer that grows with the classes (what the
# memory planner, probing a small step, then scales correctly). 1,024 columns: ~100 chunks for a 100k-class shard.
CHUNK_COLUMNS = 1024

Scalar = TypeVar("Scalar", float, torch.Tensor)


def adjust(z: Scalar, t: float) -> Scalar:
    """Similarity adjustment g(z) = 2((z+1)/2)^t − 1: maps [−1, 1] onto itself; t = 1 is the identity."""
    return 2.0 * ((z + 1.0) / 2.0) ** t - 1.0


def positive_cosine(cos_y: Scalar, variant: str, m: float) -> Scalar:
    """The positive's margined cosine for A (cos(min(θ + m, π))) and M (cos(min(m·θ, π)))."""
    if isinstance(cos_y, torch.Tensor):
        theta = angle(cos_y)
        return torch.cos((theta + m if variant == "A" else theta * m).clamp(max=math.pi))
    theta = math.acos(cos_y)
    return math.cos(min(theta + m if variant == "A" else theta * m, math.pi))


def softplus(x: torch.Tensor) -> torch.Tensor:
    """log(1 + e^x) without overflow and without torch's linear cut-off at x > 20 (exact in float64)."""
    return torch.logaddexp(x, x.new_zeros(()))


class OneVsAll(NamedTuple):
    """The loss's settings: variant C/A/M, λ, r, m, t, and whether g and the margin are a constant offset."""

    variant: str
    lam: float
    r: float
    m: float
    t: float
    detach_adjust: bool


def positive_term(raw: torch.Tensor, bias: torch.Tensor, spec: OneVsAll) -> torch.Tensor:
    """λ·softplus(−s_y) of each row's target cosine `raw` [B] (before the clamp to ±1), s_y = r·(the variant's
    margined, adjusted cosine) + b; differentiable, so backward takes its gradient from autograd on [B]."""
    cos = raw.clamp(-1.0, 1.0)
    if spec.variant == "C":
        adjusted = adjust(cos, spec.t) - spec.m
    else:
        adjusted = adjust(positive_cosine(cos, spec.variant, spec.m), spec.t)
    if spec.detach_adjust:
        adjusted = cos + (adjusted - cos).detach()
    return spec.lam * softplus(-(spec.r * adjusted + bias))


def _negative_logits(half: torch.Tensor, bias: torch.Tensor, spec: OneVsAll) -> torch.Tensor:
    """s = r·(g(c) + m_C) + b of a chunk as negatives, from half = (c + 1)/2, in place (adjust's g, fused)."""
    offset = spec.m if spec.variant == "C" else 0.0
    return half.pow_(spec.t).mul_(2.0).sub_(1.0).add_(offset).mul_(spec.r).add_(bias)


def _chunks(cos: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """(first column, view) of each block of CHUNK_COLUMNS columns (the last one may be narrower)."""
    width = CHUNK_COLUMNS
    for start in range(0, cos.shape[1], width):
        yield start, cos[:, start:start + width]


def _put_target(
    values: torch.Tensor, start: int, local: torch.Tensor, owned: torch.Tensor, target: torch.Tensor | float
) -> None:
    """Writes `target` (a number or [B, 1]) into each owned row's target entry of a chunk whose first column is
    `start`, where that entry falls in it; every other entry is left as it is. In place, no host sync."""
    at = local - start
    hit = owned & (at >= 0) & (at < values.shape[1])
    at = at.clamp(0, values.shape[1] - 1)[:, None]
    values.scatter_(1, at, torch.where(hit[:, None], target, values.gather(1, at)))


class _OneVsAllTerms(torch.autograd.Function):
    """Per-row sum of the weighted softplus terms over this shard's columns, with the rows' max cosine and target
    cosine (no gradient) for accuracy. Keeps the raw cosines [B, C] for backward and recomputes the rest."""

    @staticmethod
    def forward(ctx, x, weight, bias, local, owned, negative_weight, spec):
        x_norm = torch.linalg.vector_norm(x, dim=1).clamp_min(NORM_EPS)
        w_norm = torch.linalg.vector_norm(weight, dim=1).clamp_min(NORM_EPS)
        cos = torch.mm(x / x_norm[:, None], weight.t()).div_(w_norm)
        target = cos.gather(1, local[:, None]).squeeze(1)
        rows = positive_term(target, bias, spec) * owned
        for start, chunk in _chunks(cos):
            rows += _chunk_terms(chunk, start, bias, negative_weight[start:start + chunk.shape[1]], local, owned, spec)
        ctx.save_for_backward(x, weight, bias, local, owned, negative_weight, cos, x_norm, w_norm)
        ctx.spec = spec
        row_max, target_cos = cos.amax(dim=1).clamp_(-1.0, 1.0), torch.where(owned, target.clamp(-1.0, 1.0), 0.0)
        ctx.mark_non_differentiable(row_max, target_cos)
        return rows, row_max, target_cos

    @staticmethod
    def backward(ctx, grad_rows, _grad_max, _grad_target):
        x, weight, bias, local, owned, negative_weight, cos, x_norm, w_norm = ctx.saved_tensors
        with fp32_only(x.device):
            d_target, grad_bias = _target_grads(cos, bias, local, owned, grad_rows, ctx.spec)
            x_unit = x / x_norm[:, None]
            grad_x_unit, grad_w = torch.zeros_like(x), torch.empty_like(weight)
            for start, chunk in _chunks(cos):
                end = start + chunk.shape[1]
                d_cos, row_grad = _chunk_grads(chunk, start, bias, negative_weight[start:end], local, owned, ctx.spec)
                grad_bias += grad_rows @ row_grad
                d_cos.mul_(grad_rows[:, None])
                _put_target(d_cos, start, local, owned, d_target[:, None])
                d_cos.div_(w_norm[start:end])
                grad_x_unit.addmm_(d_cos, weight[start:end])
                unit_rows_backward_(torch.mm(d_cos.t(), x_unit, out=grad_w[start:end]), weight[start:end],
                                    w_norm[start:end])
                del d_cos  # the next chunk's buffers then replace this one's instead of adding to them
            grad_x = unit_rows_backward_(grad_x_unit.div_(x_norm[:, None]), x, x_norm)
        return grad_x, grad_w, grad_bias.reshape(bias.shape), None, None, None, None


def _chunk_terms(chunk, start, bias, negative_weight, local, owned, spec) -> torch.Tensor:
    """Σ_j coef_j·softplus(s_j) [B] of a chunk's columns as negatives, each row's target entry left out."""
    terms = softplus(_negative_logits(chunk.clamp(-1.0, 1.0).add_(1.0).div_(2.0), bias, spec))
    _put_target(terms, start, local, owned, 0.0)
    return terms @ negative_weight


def _target_grads(cos, bias, local, owned, grad_rows, spec) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of Σ grad_rows·(owned target terms) w.r.t. each row's raw target cosine [B] and the bias (0-dim),
    by autograd through positive_term on [B]."""
    with torch.enable_grad():
        raw = cos.gather(1, local[:, None]).squeeze(1).requires_grad_()
        b = bias.detach().requires_grad_()
        total = (positive_term(raw, b, spec) * owned * grad_rows).sum()
        d_raw, d_b = torch.autograd.grad(total, (raw, b))
    return d_raw, d_b


def _chunk_grads(chunk, start, bias, negative_weight, local, owned, spec) -> tuple[torch.Tensor, torch.Tensor]:
    """A chunk's negatives: ∂terms/∂(raw cosine) [B, chunk] and each row's Σ ∂terms/∂b [B], the target entries
    left out (0 in the first). The clamp to ±1 passes the gradient even outside: a cosine leaves [−1, 1] only by
    rounding, where x ≈ ±w and the normalisations' projections (unit_rows_backward_) take it to zero anyway."""
    half = chunk.clamp(-1.0, 1.0).add_(1.0).div_(2.0)
    slope = None if spec.detach_adjust else half.pow(spec.t - 1.0).mul_(spec.t * spec.r)
    d_logit = _negative_logits(half, bias, spec).sigmoid_().mul_(negative_weight)
    _put_target(d_logit, start, local, owned, 0.0)
    row_grad = d_logit.sum(dim=1)
    d_cos = d_logit.mul_(spec.r) if slope is None else d_logit.mul_(slope)
    return d_cos, row_grad


def one_vs_all_terms(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    local: torch.Tensor,
    owned: torch.Tensor,
    negative_weight: torch.Tensor,
    spec: OneVsAll,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SphereFace2's terms of embeddings x [B, D] against raw centres `weight` [C, D] (both L2-normalised inside):
    per row Σ_j coef_j·softplus(±s_j) over these C columns [B] (differentiable in x, weight and bias), the row's
    largest cosine [B] and its target cosine [B] (0 where not `owned`) for accuracy.

    `local`, `owned`: each row's target column and whether it is one of these (ClassShard.local_labels);
    `negative_weight` [C]: each column's coefficient as a negative (the target's is λ).
    """
    return _OneVsAllTerms.apply(x, weight, bias, local, owned, negative_weight, spec)
