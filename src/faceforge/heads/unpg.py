"""UNPG (Jung et al., 2022): the batch's filtered sample-to-sample negatives join every row's softmax denominator.

The appended negatives are the same for every row, so they enter as one log-sum-exp scalar per batch: same value
and gradient as concatenating them to the logits, without the B x (C + K) matrix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from faceforge import distributed
from faceforge.errors import ConfigError
from faceforge.heads.base import Head, HeadOutput, SoftmaxHead, softmax_cross_entropy
from faceforge.heads.centres import SampledBlock
from faceforge.heads.wrappers import register_wrapper
from faceforge.runtime import at_least_fp32, fp32_only


def negative_pair_mask(labels: torch.Tensor) -> torch.Tensor:
    """[B, B] bool: pairs a < b whose labels differ (each unordered negative pair once)."""
    upper = torch.ones(len(labels), len(labels), dtype=torch.bool, device=labels.device).triu_(1)
    return upper & (labels[:, None] != labels[None, :])


def tukey_fences(values: torch.Tensor, k: float) -> tuple[torch.Tensor, torch.Tensor]:
    """[Q1 − k·IQR, Q3 + k·IQR] with Q1, Q3 = sorted[⌊0.25 L⌋], sorted[⌊0.75 L⌋] (0-based), as the official code.

    kthvalue instead of torch.quantile, which refuses more than 16M elements (a global batch of 8,192 has 33.5M pairs).
    """
    n = values.numel()
    q1 = values.kthvalue(n // 4 + 1).values
    q3 = values.kthvalue(3 * n // 4 + 1).values
    iqr = q3 - q1
    return q1 - k * iqr, q3 + k * iqr


@register_wrapper("unpg")
class UNPG(Head):
    """Wraps any SoftmaxHead (softmax, cosface, arcface, combined): its scale `s` also scales the negatives' cosines.

    Configured as a key of the wrapped head's table: `head: {name: arcface, unpg: {k: 1.5}}`.

    The head's input is the whole (global) batch: under torchrun the trainer all-gathers it before the head, so
    the negatives span every rank's samples. Each rank differentiates only its share of the pair rows and the
    shares are summed across the class-shard group, so every pair's gradient is counted once.
    """

    gives_softmax = True

    def __init__(self, base: Head, k: float = 1.5) -> None:
        if not isinstance(base, SoftmaxHead):
            raise ConfigError(f"head.unpg needs a softmax-family head (softmax/cosface/arcface/combined), got "
                              f"{type(base).__name__}")
        if not k >= 0:
            raise ConfigError(f"head.unpg.k must be >= 0, got {k}")
        super().__init__(base.embedding_size, base.num_classes, base.shard)
        self.base = base
        self.k = float(k)
        self.s = float(base.s)

    def set_progress(self, progress: float, epoch: float = 0.0) -> None:
        super().set_progress(progress, epoch)
        self.base.set_progress(progress, epoch)

    @property
    def class_parameters(self) -> tuple[str, ...]:
        return tuple(f"base.{name}" for name in self.base.class_parameters)

    def no_weight_decay(self) -> list[str]:
        return [f"base.{name}" for name in self.base.no_weight_decay()]

    def sampled_blocks(self) -> dict[str, SampledBlock]:
        return {f"base.{name}": sampled for name, sampled in self.base.sampled_blocks().items()}

    def negatives(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Cosine Gram matrix [B, B] (with gradient), the mask of negative pairs the Tukey filter keeps, and how
        many negative pairs there were before filtering (a host int: the quartiles' ranks need it)."""
        x = F.normalize(at_least_fp32(embeddings), dim=1)
        gram = x @ x.t()
        mask = negative_pair_mask(labels)
        found = int(mask.sum())
        if found:
            lo, hi = tukey_fences(gram.detach()[mask], self.k)
            mask &= (gram.detach() >= lo) & (gram.detach() <= hi)
        return gram, mask, found

    def negative_log_term(self, gram: torch.Tensor, kept: torch.Tensor) -> torch.Tensor | None:
        """log Σ_kept exp(s·cos), one scalar for the whole batch; None when no negative survives."""
        if not kept.any():
            return None
        scaled = self.s * gram
        top = scaled.detach()[kept].max()
        group = self.shard.group
        mine = torch.zeros_like(kept)
        mine[distributed.rank(group)::distributed.world_size(group)] = True
        partial = (torch.exp(scaled - top) * (kept & mine)).sum()
        return top + torch.log(distributed.sum_over_ranks(partial, group))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> HeadOutput:
        self.check_input(embeddings, labels)
        with fp32_only(embeddings.device):
            rows, shard = self.base.rows(embeddings, labels)
            gram, kept, found = self.negatives(embeddings, labels)
            log_z = self.negative_log_term(gram, kept)
            extra = None if log_z is None else log_z.expand(len(labels), 1)
            out = softmax_cross_entropy(rows, shard, extra)
        out.metrics["unpg_negatives"] = float(found)
        out.metrics["unpg_kept"] = kept.sum() / max(found, 1)
        out.metrics.update(self.base.schedule_metrics())
        return out

    def extra_repr(self) -> str:
        return f"k={self.k}, s={self.s}"
