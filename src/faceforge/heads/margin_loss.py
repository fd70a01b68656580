"""Margin + softmax cross-entropy of one class shard in one autograd function, holding one [B, C] buffer.

Built from plain autograd ops (normalise, x·wᵀ, clamp, replace the target, scale, exp, log-sum-exp) the softmax
heads keep ~25 bytes per logit alive through backward. `_MarginSoftmax` keeps one fp32 [B, C] buffer instead:
the logits in forward, overwritten in place by their gradient in backward (as arcface_torch's margin + CE). The
centres are never normalised as a copy: the logits' columns are divided by their norms, and their gradient is
projected row by row; what works on [B, C] or [C, D] beyond the buffer and the centres' own gradient goes over
the columns in chunks of COLUMN_CHUNK, so that nothing else grows beyond [B, chunk] and [chunk, D].

`shard_rows` returns per-row statistics [B] of this shard's columns (SoftmaxRows); `class_rows` combines the
shards' rows, and UNPG's extra log-terms, with the cross-shard reductions on [B] vectors (heads/centres.py).
The plain-autograd logits (`SoftmaxHead.logits`) stay for evaluation, GIF's token heads and the tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from faceforge import distributed
from faceforge.heads.centres import (
    NORM_EPS, ClassShard, angle, angle_slope, class_logsumexp, class_max, class_sum, unit_rows_backward_,
)
from faceforge.runtime import fp32_only

# Columns per chunk: the largest temporaries are [B, COLUMN_CHUNK] and [COLUMN_CHUNK, D]. At a global batch of
# 8,192 a chunk is 32 MiB, ~1/60 of a 250k-class shard's buffer, and its matmuls are still large enough for a GPU.
COLUMN_CHUNK = 1024


@dataclass(frozen=True)
class MarginSpec:
    """The fused loss's logits: s·cos θ_j, the target s·(cos(m1·θ + m2) − m3), over L2-normalised embeddings and
    centres; with normalize=False (plain softmax: s = 1, no margin) the raw products x·w_j. `straight_through`
    makes the margin change the forward value only (arcface_torch): the target's gradient is that of cos θ."""

    s: float = 1.0
    m1: float = 1.0
    m2: float = 0.0
    m3: float = 0.0
    normalize: bool = False
    straight_through: bool = False

    def target(self, cos: torch.Tensor) -> torch.Tensor:
        """cos(m1·θ + m2) − m3 of the target cosines (differentiable), arccos kept away from ±1 (`angle`)."""
        if self.m1 == 1.0 and self.m2 == 0.0:
            out = cos - self.m3
        else:
            out = torch.cos(self.m1 * angle(cos) + self.m2) - self.m3
        if self.straight_through:
            out = cos + (out - cos).detach()
        return out

    def slope(self, cos: torch.Tensor) -> torch.Tensor:
        """d target / d cos [B], what autograd gives through `target`: 1 under straight_through or without an
        angular margin, else −m1·sin(m1·θ + m2)·dθ/dcos (0 where `angle`'s clamp holds θ constant)."""
        if self.straight_through or (self.m1 == 1.0 and self.m2 == 0.0):
            return torch.ones_like(cos)
        return -self.m1 * torch.sin(self.m1 * angle(cos) + self.m2) * angle_slope(cos)


class SoftmaxRows(NamedTuple):
    """Per-row statistics [B] over one shard's columns (shard_rows) or all classes (class_rows): the log-sum-exp
    of the logits and the target's logit (0 where the class lives in another shard), both with gradient; the row
    max and Σ p·logit under that softmax p, without (accuracy and SDE's entropy)."""

    lse: torch.Tensor
    target: torch.Tensor
    row_max: torch.Tensor
    mean_logit: torch.Tensor


def _chunks(columns: int) -> list[slice]:
    """The column ranges of the chunks, the last one possibly shorter."""
    return [slice(c, min(c + COLUMN_CHUNK, columns)) for c in range(0, columns, COLUMN_CHUNK)]


def _unit_rows(v: torch.Tensor, normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """v / max(‖v‖, eps) row-wise (F.normalize) and that divisor [rows]; (v, None) when not normalising."""
    if not normalize:
        return v, None
    norm = torch.linalg.vector_norm(v, dim=1).clamp_min_(NORM_EPS)
    return v / norm[:, None], norm


def _centre_norms(centres: torch.Tensor, dtype: torch.dtype, normalize: bool) -> torch.Tensor | None:
    """‖w_j‖ per centre [C] in `dtype`, or None without normalisation.

    The centres are never normalised as a copy: a logit's column is scaled instead (cos = x̂·w_j / max(‖w_j‖,
    eps), F.normalize's divisor), which reads the [C, D] centres once for the norms and once in the product."""
    return torch.linalg.vector_norm(centres, dim=1, dtype=dtype) if normalize else None


def _products(x: torch.Tensor, centres: torch.Tensor, norms: torch.Tensor | None) -> torch.Tensor:
    """The [B, C] buffer of cos θ (columns divided by the centres' norms, clamped to [−1, 1]) or, without norms,
    the raw products: one matmul into the buffer, nothing else of that size."""
    out = torch.mm(x, centres.to(x.dtype).t())
    return out if norms is None else out.div_(norms.clamp_min(NORM_EPS)).clamp_(-1.0, 1.0)


def _logits(embeddings, centres, local, owned, spec: MarginSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The [B, C] logits buffer (fp32, or fp64 for fp64 inputs) with the margin at the owned targets, the target
    cosines cos_t [B] before it, and the centres' norms (_centre_norms)."""
    dtype = torch.promote_types(torch.promote_types(embeddings.dtype, centres.dtype), torch.float32)
    norms = _centre_norms(centres, dtype, spec.normalize)
    logits = _products(_unit_rows(embeddings.to(dtype), spec.normalize)[0], centres, norms)
    cos_t = logits.gather(1, local[:, None]).squeeze(1)
    _at_target(logits, local, owned, spec.target(cos_t))
    if spec.s != 1.0:
        logits.mul_(spec.s)
    return logits, cos_t, norms


def _row_stats(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log-sum-exp, max, Σ softmax·logit) of every row, exp(logit − max) one chunk at a time."""
    row_max = logits.amax(dim=1)
    total = logits.new_zeros(len(logits))
    weighted = logits.new_zeros(len(logits))
    for cols in _chunks(logits.shape[1]):
        e = (logits[:, cols] - row_max[:, None]).exp_()
        total += e.sum(dim=1)
        weighted += e.mul_(logits[:, cols]).sum(dim=1)
        del e  # before the next chunk's
    return row_max + total.log(), row_max, weighted / total


def _at_target(values: torch.Tensor, local: torch.Tensor, owned: torch.Tensor, new: torch.Tensor) -> None:
    """values[i, local[i]] = new[i] in place for the owned rows (the others keep theirs: no host sync)."""
    index = local[:, None]
    values.scatter_(1, index, torch.where(owned, new, values.gather(1, index).squeeze(1))[:, None])


def _logit_grad_(buffer, lse, target, slope, local, owned, g_lse, g_target, s: float) -> None:
    """Turns the logits buffer into ∂loss/∂cos in place: s·g_lse·p_j off target, s·slope·(g_lse·p_t + g_target)
    at the owned target, p the shard's softmax exp(logit − lse)."""
    buffer.sub_(lse[:, None]).exp_().mul_((s * g_lse)[:, None])
    _at_target(buffer, local, owned, s * slope * (g_lse * torch.exp(target - lse) + g_target))


def _product_grads(grad, embeddings, centres, norms, needs):
    """Gradients of the embeddings and centres (None where not needed) from ∂loss/∂cos [B, C] (overwritten),
    back through the products and the normalisations.

    With r_j = 1 / max(‖w_j‖, eps) and ĝ = ∂loss/∂cos with column j times r_j: ∂/∂x̂ = ĝ·W and, per centre,
    g_j = ĝ_jᵀ·x̂, then ∂/∂w_j = g_j − r_j²·(w_j·g_j)·w_j: F.normalize's backward written on the raw rows
    (centres.unit_rows_backward_, for the embeddings too)."""
    raw_x = embeddings.to(grad.dtype)
    x, x_norm = _unit_rows(raw_x, norms is not None)
    if norms is not None:
        grad.div_(norms.clamp_min(NORM_EPS))
    w = centres.to(grad.dtype)
    grad_x = torch.mm(grad, w) if needs[0] else None
    grad_w = torch.mm(grad.t(), x) if needs[1] else None
    if grad_w is not None and norms is not None:
        unit_rows_backward_(grad_w, w, norms.clamp_min(NORM_EPS))
    if grad_x is not None and x_norm is not None:
        grad_x = unit_rows_backward_(grad_x.div_(x_norm[:, None]), raw_x, x_norm)
    return (None if grad_x is None else grad_x.to(embeddings.dtype),
            None if grad_w is None else grad_w.to(centres.dtype))


class _MarginSoftmax(torch.autograd.Function):
    """(embeddings [B, D], centres [C, D], local labels, owned) -> SoftmaxRows' four [B] tensors (see MarginSpec).

    The logits buffer is the one [B, C] tensor kept for backward, which overwrites it with its gradient; it is
    held on ctx rather than saved, so that a second backward through a retained graph (gradcheck) finds it gone
    and recomputes it. The clamp of cos to [−1, 1] is treated as the identity in backward: it only clips
    rounding, and where it does (an embedding equal to a centre or to its negative) the gradient of cos θ
    w.r.t. either vector is zero anyway.
    """

    @staticmethod
    def forward(ctx, embeddings, centres, local, owned, spec: MarginSpec):
        logits, cos_t, norms = _logits(embeddings, centres, local, owned, spec)
        lse, row_max, mean_logit = _row_stats(logits)
        target = torch.where(owned, logits.gather(1, local[:, None]).squeeze(1), 0.0)
        ctx.spec, ctx.logits, ctx.norms = spec, logits, norms
        ctx.save_for_backward(embeddings, centres, lse, target, spec.slope(cos_t), local, owned)
        ctx.mark_non_differentiable(row_max, mean_logit)
        return lse, target, row_max, mean_logit

    @staticmethod
    @once_differentiable
    def backward(ctx, g_lse, g_target, _g_max, _g_mean):
        embeddings, centres, lse, target, slope, local, owned = ctx.saved_tensors
        spec, buffer, norms, ctx.logits = ctx.spec, ctx.logits, ctx.norms, None
        if buffer is None:
            with fp32_only(embeddings.device):
                buffer, _, norms = _logits(embeddings, centres, local, owned, spec)
        g_lse, g_target = g_lse.to(buffer.dtype), g_target.to(buffer.dtype)
        _logit_grad_(buffer, lse, target, slope, local, owned, g_lse, g_target, spec.s)
        grad_x, grad_w = _product_grads(buffer, embeddings, centres, norms, ctx.needs_input_grad[:2])
        return grad_x, grad_w, None, None, None


def shard_rows(
    embeddings: torch.Tensor, centres: torch.Tensor, labels: torch.Tensor, shard: ClassShard, spec: MarginSpec
) -> SoftmaxRows:
    """SoftmaxRows of one shard's centres (the whole shard, or PartialFC's sampled block with its shard), from the
    raw embeddings [B, D] and centres [C, D]; `labels` are located with shard.local_labels. Full fp32 inside."""
    local, owned = shard.local_labels(labels)
    with fp32_only(embeddings.device):
        return SoftmaxRows(*_MarginSoftmax.apply(embeddings, centres, local, owned, spec))


def class_rows(rows: SoftmaxRows, shard: ClassShard, extra: torch.Tensor | None = None) -> SoftmaxRows:
    """The statistics over all classes from every shard's rows, plus optional extra log-terms [B, k] that are
    never targets (UNPG's negatives, with their own gradient); row_max stays over the classes alone.

    lse = log Σ_shards exp(lse_shard) (+ the extra terms), and a shard's Σ p·logit weighs by its share
    exp(lse_shard − lse): only [B] vectors cross shards.
    """
    lse = class_logsumexp(rows.lse[:, None], shard, extra)
    log_z = lse.detach()
    mean = class_sum((torch.exp(rows.lse.detach() - log_z) * rows.mean_logit)[:, None], shard)
    if extra is not None:
        terms = extra.detach()
        mean = mean + (torch.exp(terms - log_z[:, None]) * terms).sum(dim=1)
    target = distributed.sum_over_ranks(rows.target, shard.group)
    return SoftmaxRows(lse, target, class_max(rows.row_max[:, None], shard), mean)
