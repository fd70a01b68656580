"""Head contract and the reductions over the class dimension, written once for all classes or a class shard."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import math

import torch
from torch import nn

from faceforge import distributed


@dataclass
class HeadOutput:
    """What every head returns; the trainer minimises mean(sample_weights * per_sample_loss).

    `softmax` is set by heads whose loss is a softmax cross-entropy over the classes (what SDE reads).
    `metrics` values may be 0-dim tensors still on the device: the trainer reads them to the host together, and
    only on the steps it logs, so that a step needs no host synchronisation.
    """

    loss: torch.Tensor
    per_sample_loss: torch.Tensor
    logits_for_metrics: torch.Tensor | None = None
    metrics: dict[str, float | torch.Tensor] = field(default_factory=dict)
    softmax: "SoftmaxView | None" = None


@dataclass(frozen=True)
class ClassShard:
    """The contiguous range of classes [start, start + count) this process holds; `group` spans all shards."""

    start: int
    count: int
    group: Any = None

    @staticmethod
    def whole(num_classes: int) -> "ClassShard":
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


def replace_target(values: torch.Tensor, labels: torch.Tensor, target: torch.Tensor, shard: ClassShard) -> torch.Tensor:
    """A copy of `values` whose owned target entries are replaced by `target` [B]."""
    local, owned = shard.local_labels(labels)
    onehot = torch.zeros_like(values, dtype=torch.bool).scatter_(1, local[:, None], owned[:, None])
    return torch.where(onehot, target[:, None].to(values.dtype), values)


def top1_accuracy(values: torch.Tensor, labels: torch.Tensor, shard: ClassShard) -> torch.Tensor:
    """Fraction of rows whose target score is the largest over all classes (0-dim, on the device)."""
    return (pick_target(values.detach(), labels, shard) >= class_max(values, shard)).float().mean()


@dataclass
class SoftmaxView:
    """A head's softmax over all classes (this shard's logits + cross-shard reductions), read without gradient.

    `extra` [B, k] holds log-terms outside the classes (UNPG's negatives, merged); they count as k more outcomes.
    """

    logits: torch.Tensor
    labels: torch.Tensor
    shard: ClassShard
    extra: torch.Tensor | None = None

    @torch.no_grad()
    def log_partition(self) -> torch.Tensor:
        return class_logsumexp(self.logits, self.shard, self.extra)

    @torch.no_grad()
    def target_prob(self) -> torch.Tensor:
        """p(label | x) [B] as a float."""
        return torch.exp(pick_target(self.logits, self.labels, self.shard) - self.log_partition())

    @torch.no_grad()
    def entropy(self) -> torch.Tensor:
        """Shannon entropy [B] of each row's softmax, in nats."""
        lse = self.log_partition()
        mean_logit = class_sum(torch.exp(self.logits - lse[:, None]) * self.logits, self.shard)
        if self.extra is not None:
            mean_logit = mean_logit + (torch.exp(self.extra - lse[:, None]) * self.extra).sum(dim=1)
        return lse - mean_logit


def softmax_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, shard: ClassShard, extra: torch.Tensor | None = None
) -> HeadOutput:
    """Cross-entropy over all classes (plus optional extra log-terms [B, k] that are never targets)."""
    per_sample = class_logsumexp(logits, shard, extra) - pick_target(logits, labels, shard)
    return HeadOutput(
        loss=per_sample.mean(),
        per_sample_loss=per_sample,
        logits_for_metrics=logits,
        metrics={"acc": top1_accuracy(logits, labels, shard)},
        softmax=SoftmaxView(logits, labels, shard, extra),
    )


class Head(nn.Module):
    """Base of all heads: owns class centres `weight` [count, D] for its shard, hears training progress.

    `class_parameters` names the parameters whose rows are this shard's classes: a head that has some is split
    across processes; one without any (e.g. GIF) is replicated.
    """

    class_parameters: tuple[str, ...] = ()

    def __init__(self, embedding_size: int, num_classes: int, shard: ClassShard | None = None) -> None:
        super().__init__()
        self.embedding_size = embedding_size
        self.num_classes = num_classes
        self.shard = shard or ClassShard.whole(num_classes)
        self.progress = 0.0
        self.epoch = 0.0

    def set_progress(self, progress: float, epoch: float = 0.0) -> None:
        """Training progress in [0, 1] and epochs done (fractional); heads with schedules read them."""
        self.progress = float(progress)
        self.epoch = float(epoch)

    def no_weight_decay(self) -> list[str]:
        """Names of parameters that must not be weight-decayed."""
        return []

    def sampled_class_rows(self) -> dict[str, torch.Tensor]:
        """Class parameter -> the rows the last training step used, for heads that sample; {} when all were used.
        The step leaves the other rows and their optimizer state untouched."""
        return {}

    def check_input(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(f"head expects embeddings [B, {self.embedding_size}], got {list(embeddings.shape)}")
        if labels.shape != embeddings.shape[:1]:
            raise ValueError(f"head expects labels [{embeddings.shape[0]}], got {list(labels.shape)}")


def is_class_rows(value: object, param: torch.Tensor, rows: int | None = None) -> bool:
    """Whether `value` holds one row per class of the class parameter `param` (the centres themselves, their
    optimizer state): a tensor shaped as `param` but with `rows` rows (default: param's, i.e. this shard's).

    The one rule the step (which rows to leave untouched) and checkpoints (which tensors to gather and cut to a
    shard) share; scalars such as AdamW's `step` are not rows.
    """
    if not torch.is_tensor(value) or value.ndim != param.ndim or value.ndim == 0:
        return False
    return value.shape[0] == (param.shape[0] if rows is None else rows) and value.shape[1:] == param.shape[1:]
