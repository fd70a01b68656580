"""The head contract: what a head is given and returns (Head, HeadOutput), the heads that own class centres
(CentreHead) and the declared softmax-head interface (SoftmaxHead) that wrappers (UNPG) and regularizers (SDE)
rely on. The machinery over classes lives in centres.py.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

import torch
from torch import nn

from faceforge.errors import ConfigError
from faceforge.heads.centres import ClassShard, SampledBlock, SoftmaxView, StepCentres, sample_classes
from faceforge.heads.margin_loss import MarginSpec, SoftmaxRows, class_rows, shard_rows
from faceforge.runtime import fp32_only


@dataclass
class HeadOutput:
    """What every head returns; the trainer minimises mean(sample_weights * per_sample_loss).

    `softmax` is set by heads whose loss is a softmax cross-entropy over the classes (what SDE reads), as row
    statistics. `logits_for_metrics` is a head's [B, C] scores where it keeps them anyway (SphereFace2); the
    softmax family's fused loss keeps none past the step, so theirs is None (`SoftmaxHead.logits` computes them).
    `metrics` values may be 0-dim tensors still on the device: the trainer reads them to the host together, and
    only on the steps it logs, so that a step needs no host synchronisation.
    """

    loss: torch.Tensor
    per_sample_loss: torch.Tensor
    logits_for_metrics: torch.Tensor | None = None
    metrics: dict[str, float | torch.Tensor] = field(default_factory=dict)
    softmax: SoftmaxView | None = None


def softmax_cross_entropy(rows: SoftmaxRows, shard: ClassShard, extra: torch.Tensor | None = None) -> HeadOutput:
    """Cross-entropy over all classes (plus optional extra log-terms [B, k] that are never targets) from this
    shard's row statistics: what crosses shards are [B] vectors, and no [B, C] tensor outlives the step."""
    whole = class_rows(rows, shard, extra)
    per_sample = whole.lse - whole.target
    target = whole.target.detach()
    return HeadOutput(
        loss=per_sample.mean(),
        per_sample_loss=per_sample,
        metrics={"acc": (target >= whole.row_max).float().mean()},
        softmax=SoftmaxView(whole.lse.detach(), target, whole.mean_logit),
    )


class Head(nn.Module):
    """Base of all heads: embeddings [B, D] and labels [B] -> HeadOutput; hears training progress.

    `class_parameters` names the parameters whose rows are this shard's classes: a head that has some is split
    across processes; one without any (e.g. GIF) is replicated. `gives_softmax` says that forward's HeadOutput
    carries a SoftmaxView (what SDE needs); it is declared here so that nothing tests a head's class for it.
    """

    class_parameters: tuple[str, ...] = ()
    gives_softmax: bool = False

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

    def sampled_blocks(self) -> dict[str, SampledBlock]:
        """Class parameter -> the rows the last training step used and the leaf block it computed on, for heads
        that sample; {} when all were used. The step updates those rows only (engine/sampled_rows.py)."""
        return {}

    def sampled_class_rows(self) -> dict[str, torch.Tensor]:
        """Class parameter -> the rows the last training step used (sampled_blocks' indices)."""
        return {name: sampled.index for name, sampled in self.sampled_blocks().items()}

    def check_input(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """ValueError unless embeddings are [B, embedding_size] and labels [B] (a caller's bug, not a config)."""
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(f"head expects embeddings [B, {self.embedding_size}], got {list(embeddings.shape)}")
        if labels.shape != embeddings.shape[:1]:
            raise ValueError(f"head expects labels [{embeddings.shape[0]}], got {list(labels.shape)}")


class CentreHead(Head):
    """A head that owns class centres `weight` [shard.count, D], split over processes under torchrun, and with
    `sample_rate` < 1 trains each step on the batch's classes plus that fraction of the others (PartialFC)."""

    class_parameters = ("weight",)

    def __init__(
        self, embedding_size: int, num_classes: int, sample_rate: float = 1.0, shard: ClassShard | None = None
    ) -> None:
        super().__init__(embedding_size, num_classes, shard)
        if not 0.0 < sample_rate <= 1.0:
            raise ConfigError(f"head.sample_rate must be in (0, 1], got {sample_rate}")
        self.sample_rate = float(sample_rate)
        self.weight = nn.Parameter(torch.empty(self.shard.count, embedding_size).normal_(0.0, 0.01))
        self._sampled: SampledBlock | None = None

    def step_centres(self, labels: torch.Tensor) -> StepCentres:
        """This step's centres: the whole shard, or in training with sampling a detached leaf block of the sampled
        rows (sample_classes), remembered for sampled_blocks: `weight` itself then gets no gradient, so the
        optimizer skips it and the step updates only those rows."""
        self._sampled = None  # before sampling: the last step's block is freed before this one is gathered
        sample = sample_classes(self.shard, labels, self.sample_rate) if self.training else None
        if sample is None:
            return StepCentres(self.weight, labels, self.shard, None)
        block = self.weight.detach().index_select(0, sample.index).requires_grad_()
        self._sampled = SampledBlock(sample.index, block)
        return StepCentres(block, sample.labels, sample.shard, sample)

    def sampled_blocks(self) -> dict[str, SampledBlock]:
        return {} if self._sampled is None else {"weight": self._sampled}


class SoftmaxHead(CentreHead, abc.ABC):
    """The declared softmax-head interface: logits over the class centres and a softmax cross-entropy loss.

    What wrappers and regularizers may rely on: `s`, the scale of the logits over a cosine (1 for unnormalised
    logits); `rows(embeddings, labels) -> (rows, shard)`, this step's per-row statistics (margin_loss.shard_rows,
    over a sampled subset in training) with the shard they are relative to; `schedule_metrics()`, host numbers
    the head's schedule is at (a margin warm-up), logged with every step. A subclass writes `margin_spec`, what
    the fused loss computes, and `class_logits`, the same logits with plain autograd ops (evaluation, GIF).
    """

    gives_softmax = True
    s: float = 1.0

    @abc.abstractmethod
    def margin_spec(self) -> MarginSpec:
        """The fused loss's scale, margins (at the current training progress) and normalisation."""

    @abc.abstractmethod
    def class_logits(
        self, embeddings: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, shard: ClassShard
    ) -> torch.Tensor:
        """Logits [B, rows of `weight`] of the given centres; `labels` and `shard` locate each row's target."""

    def logits(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Logits against every centre of this shard."""
        return self.class_logits(embeddings, self.weight, labels, self.shard)

    def rows(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[SoftmaxRows, ClassShard]:
        """This step's per-row statistics over its centres (a sampled subset in training) and their shard."""
        weight, labels, shard, _ = self.step_centres(labels)
        return shard_rows(embeddings, weight, labels, shard, self.margin_spec()), shard

    def schedule_metrics(self) -> dict[str, float]:
        return {}

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> HeadOutput:
        self.check_input(embeddings, labels)
        with fp32_only(embeddings.device):
            out = softmax_cross_entropy(*self.rows(embeddings, labels))
        out.metrics.update(self.schedule_metrics())
        return out


def is_class_rows(value: object, param: torch.Tensor, rows: int | None = None) -> bool:
    """Whether `value` holds one row per class of the class parameter `param` (the centres themselves, their
    optimizer state): a tensor shaped as `param` but with `rows` rows (default: param's, i.e. this shard's).

    The one rule the step (which rows to leave untouched) and checkpoints (which tensors to gather and cut to a
    shard) share; scalars such as AdamW's `step` are not rows.
    """
    if not torch.is_tensor(value) or value.ndim != param.ndim or value.ndim == 0:
        return False
    return value.shape[0] == (param.shape[0] if rows is None else rows) and value.shape[1:] == param.shape[1:]
