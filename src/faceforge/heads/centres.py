"""Class-centre machinery shared by the heads that hold centres (softmax family, SphereFace2): the shard of classes
a process holds, PartialFC sampling, reductions over the class dimension written once for all classes or a class
shard (the cross-shard sums go through faceforge.distributed), and the softmax view that SDE reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from faceforge import distributed

_ACOS_EPS = 1e-7
NORM_EPS = 1e-12  # F.normalize's floor on a norm
# Rows per pass of unit_rows_backward_: 128 rows of 512 fp32 are 256 KiB, which stay in cache between the rows'
# dot products and the update with them (measured 2-3x faster on one core than 1,024-row passes).
_ROW_CHUNK = 128


@dataclass(frozen=True)
class ClassShard:
    """The contiguous range of classes [start, start + count) this process holds; `group` spans all shards."""

    start: int
    count: int
    group: Any = None

    @staticmethod
    def whole(num_classes: int) -> "ClassShard":
        """Every class, in one process (no group)."""
        return ClassShard(0, num_classes, None)

    def local_labels(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Labels shifted into this shard and the mask of rows whose class lives here."""
        local = labels - self.start
        owned = (local >= 0) & (local < self.count)
        return torch.where(owned, local, torch.zeros_like(local)), owned

    def rows_of(self, whole: torch.Tensor) -> torch.Tensor:
        """This shard's block (a copy) of a whole [num_classes, ...] tensor."""
        return whole[self.start:self.start + self.count].clone()


@dataclass(frozen=True)
class ClassSample:
    """The centres one step uses under sampling: this shard's rows `index` (sorted), a shard over just those rows,
    labels mapped into it (rows whose class lives elsewhere map outside), and which rows a label forced in."""

    index: torch.Tensor
    shard: ClassShard
    labels: torch.Tensor
    positive: torch.Tensor
    others: int
    kept_others: int


class SampledBlock(NamedTuple):
    """A sampled step's rows `index` of a class parameter and `block`, a detached leaf copy of those rows that the
    head computed on: its gradient is the rows' gradient, and the parameter itself gets none (no dense [N, D]
    gradient); the step then updates just those rows (engine/sampled_rows.py)."""

    index: torch.Tensor
    block: torch.Tensor


class StepCentres(NamedTuple):
    """The centres one step uses, the labels and shard they are relative to, and the sample (None: all rows)."""

    weight: torch.Tensor
    labels: torch.Tensor
    shard: ClassShard
    sample: ClassSample | None


def angle(cos: torch.Tensor) -> torch.Tensor:
    """θ = arccos(cos), cos kept 1e-7 inside ±1: arccos' gradient is infinite at ±1 (a NaN at cos = ±1 otherwise)."""
    return torch.acos(cos.clamp(-1.0 + _ACOS_EPS, 1.0 - _ACOS_EPS))


def angle_slope(cos: torch.Tensor) -> torch.Tensor:
    """dθ/dcos of `angle` (what autograd gives, for heads that write their gradient): −1/√(1 − cos²) inside the
    clamp, 0 where the clamp holds θ constant."""
    lo, hi = -1.0 + _ACOS_EPS, 1.0 - _ACOS_EPS
    c = cos.clamp(lo, hi)
    return torch.where((cos >= lo) & (cos <= hi), -torch.rsqrt(1.0 - c * c), torch.zeros_like(c))


def unit_rows_backward_(grad: torch.Tensor, rows: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """In place, the gradient w.r.t. raw rows v of v / n, n = max(‖v‖, NORM_EPS) (F.normalize), from `grad`, the
    gradient w.r.t. the unit rows already divided by n (what a head has that divides its products by the rows'
    norms instead of normalising a copy): grad − (v·grad)/n²·v, the projection left out where ‖v‖ <= NORM_EPS
    (n is then constant). `norms`: n [rows]. Works in passes of a few rows that stay in cache."""
    coef = norms.square().reciprocal() * (norms > NORM_EPS)
    for start in range(0, len(rows), _ROW_CHUNK):
        part = slice(start, start + _ROW_CHUNK)
        along = (rows[part] * grad[part]).sum(dim=1, keepdim=True)
        grad[part].addcmul_(rows[part], along.mul_(coef[part, None]), value=-1.0)
    return grad


def sample_classes(shard: ClassShard, labels: torch.Tensor, rate: float) -> ClassSample | None:
    """PartialFC sampling: every class that a label in the batch needs plus a random `rate` fraction of the other
    classes of this shard; None when nothing would be left out (at rate 1 without touching the labels)."""
    if rate >= 1.0:
        return None
    local, owned = shard.local_labels(labels)
    count = shard.count
    positive = torch.zeros(count, dtype=torch.bool, device=labels.device).index_fill_(0, local[owned], True)
    others = count - int(positive.sum())
    if others == 0:
        return None
    keep = math.ceil(rate * others)
    score = torch.rand(count, device=labels.device).masked_fill_(positive, 2.0)
    index = score.topk(count - others + keep).indices.sort().values
    position = torch.full((count,), -1, dtype=torch.long, device=labels.device)
    position[index] = torch.arange(len(index), device=labels.device)
    mapped = torch.where(owned, shard.start + position[local], torch.full_like(local, -1))
    return ClassSample(index, ClassShard(shard.start, len(index), shard.group), mapped, positive[index], others, keep)


def class_max(values: torch.Tensor, shard: ClassShard) -> torch.Tensor:
    """Row-wise max over all classes (no gradient: used for stability and accuracy)."""
    return distributed.max_over_ranks(values.detach().amax(dim=1), shard.group)


def class_sum(values: torch.Tensor, shard: ClassShard) -> torch.Tensor:
    """Row-wise sum over all classes, differentiable across shards."""
    return distributed.sum_over_ranks(values.sum(dim=1), shard.group)


def class_logsumexp(logits: torch.Tensor, shard: ClassShard, extra: torch.Tensor | None = None) -> torch.Tensor:
    """log Σ_j exp(logits_j) over all classes, plus optional per-row extra log-terms [B, k] outside the classes."""
    m = class_max(logits, shard)
    if extra is not None:
        m = torch.maximum(m, extra.detach().amax(dim=1))
    total = class_sum(torch.exp(logits - m[:, None]), shard)
    if extra is not None:
        total = total + torch.exp(extra - m[:, None]).sum(dim=1)
    return m + torch.log(total)


def pick_target(values: torch.Tensor, labels: torch.Tensor, shard: ClassShard) -> torch.Tensor:
    """values[i, labels[i]] for every row, wherever the label's class lives."""
    local, owned = shard.local_labels(labels)
    return distributed.sum_over_ranks(values.gather(1, local[:, None]).squeeze(1) * owned, shard.group)


def target_mask(values: torch.Tensor, labels: torch.Tensor, shard: ClassShard) -> torch.Tensor:
    """[B, columns] bool, True at each row's target column where that class lives in this shard."""
    local, owned = shard.local_labels(labels)
    return torch.zeros_like(values, dtype=torch.bool).scatter_(1, local[:, None], owned[:, None])


def replace_target(values: torch.Tensor, labels: torch.Tensor, target: torch.Tensor, shard: ClassShard) -> torch.Tensor:
    """A copy of `values` whose owned target entries are replaced by `target` [B]."""
    return torch.where(target_mask(values, labels, shard), target[:, None].to(values.dtype), values)


def top1_accuracy(values: torch.Tensor, labels: torch.Tensor, shard: ClassShard) -> torch.Tensor:
    """Fraction of rows whose target score is the largest over all classes (0-dim, on the device)."""
    return (pick_target(values.detach(), labels, shard) >= class_max(values, shard)).float().mean()


@dataclass
class SoftmaxView:
    """A head's softmax over all classes (and UNPG's extra outcomes, merged), as per-row statistics [B] without
    gradient: the log-partition, the target's logit and the mean logit Σ p·logit. Rows only, so that nothing of
    the [B, C] logits outlives the step."""

    log_partition: torch.Tensor
    target_logit: torch.Tensor
    mean_logit: torch.Tensor

    def target_prob(self) -> torch.Tensor:
        """p(label | x) [B] as a float."""
        return torch.exp(self.target_logit - self.log_partition)

    def entropy(self) -> torch.Tensor:
        """Shannon entropy [B] of each row's softmax, in nats: log Z − Σ p·logit."""
        return self.log_partition - self.mean_logit
