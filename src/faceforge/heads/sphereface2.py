"""SphereFace2 (Wen et al., ICLR 2022): N one-vs-all binary classifiers on the hypersphere with one shared bias.

The loss is a sum of independent per-class terms, so a class shard computes its own part and the shards only
sum scalars per sample; no partition function is reduced across ranks. The loss over a shard's centres is one
autograd function (sphereface2_loss.py) that keeps only the cosines [B, C] for backward.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from faceforge import distributed
from faceforge.errors import ConfigError
from faceforge.heads.base import CentreHead, HeadOutput
from faceforge.heads.centres import ClassSample, ClassShard, class_max, class_sum
from faceforge.heads.sphereface2_loss import OneVsAll, adjust, one_vs_all_terms, positive_cosine
from faceforge.registry import HEADS
from faceforge.runtime import at_least_fp32, fp32_only

DEFAULT_MARGIN = {"C": 0.4, "A": 0.5, "M": 1.7}


def initial_bias(variant: str, num_classes: int, lam: float, r: float, m: float, t: float) -> float:
    """b₀ with ∂L/∂b = 0 when every cosine is 0: the root of λσ(−(a_p + b)) = (1−λ)(N−1)σ(a_n + b).

    The quadratic in e^(a_n + b) is solved in its rationalised form, which does not cancel for large N.
    """
    if variant == "C":
        a_p, a_n = r * (adjust(0.0, t) - m), r * (adjust(0.0, t) + m)
    else:
        a_p, a_n = r * adjust(positive_cosine(0.0, variant, m), t), r * adjust(0.0, t)
    z = lam / ((1.0 - lam) * (num_classes - 1))
    return math.log(2.0 * z) - a_n - math.log(1.0 - z + math.sqrt((1.0 - z) ** 2 + 4.0 * z * math.exp(a_p - a_n)))


def _check_params(variant: str, num_classes: int, lam: float, r: float, t: float, lw: float) -> None:
    """ConfigError naming the `head.*` key of the first value SphereFace2 cannot use."""
    if variant not in DEFAULT_MARGIN:
        raise ConfigError(f"head.variant must be one of {', '.join(DEFAULT_MARGIN)} for SphereFace2, got {variant!r}")
    if num_classes < 2:
        raise ConfigError(f"SphereFace2 needs at least 2 classes (head.num_classes), got {num_classes}")
    if not 0.0 < lam < 1.0:
        raise ConfigError(f"head.lam must be in (0, 1), got {lam}")
    for key, value in (("r", r), ("t", t), ("lw", lw)):
        if value <= 0:
            raise ConfigError(f"head.{key} must be positive, got {value}")


class SphereFace2(CentreHead):
    """One-vs-all binary classifiers: per sample (λ/r)·softplus(−s_y) + ((1−λ)/r)·Σ_{i≠y} softplus(s_i), times lw.

    s_i = r·g(cos θ_i) + b with the variant's margin: C subtracts m from the positive's g and adds it to every
    negative's; A and M margin the positive's angle only. `detach_adjust` makes g and the margin a constant offset
    (∂s/∂cos = r, the official `main` branch); it defaults to False for C and True for A and M.
    `sample_rate` < 1 samples the negative classes per shard; a sampled negative then weighs 1 / its inclusion
    probability, so the loss stays an unbiased estimate of the whole sum.
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        variant: str = "C",
        lam: float = 0.7,
        r: float = 40.0,
        m: float | None = None,
        t: float = 3.0,
        lw: float = 10.0,
        detach_adjust: bool | None = None,
        sample_rate: float = 1.0,
        shard: ClassShard | None = None,
    ) -> None:
        _check_params(variant, num_classes, lam, r, t, lw)
        super().__init__(embedding_size, num_classes, sample_rate, shard)
        self.variant = variant
        self.lam, self.r, self.t, self.lw = float(lam), float(r), float(t), float(lw)
        self.m = float(DEFAULT_MARGIN[variant] if m is None else m)
        self.detach_adjust = variant != "C" if detach_adjust is None else bool(detach_adjust)
        self.bias = nn.Parameter(torch.tensor(initial_bias(variant, num_classes, self.lam, self.r, self.m, self.t)))

    def no_weight_decay(self) -> list[str]:
        return ["bias"]

    def shared_bias(self) -> torch.Tensor:
        """b in fp32; with a process group its gradient is summed over the shards, so every copy stays equal."""
        b = at_least_fp32(self.bias)
        return distributed.sum_grad_over_ranks(b, self.shard.group)

    def loss_spec(self) -> OneVsAll:
        """The settings the loss function reads, as they are now."""
        return OneVsAll(self.variant, self.lam, self.r, self.m, self.t, self.detach_adjust)

    def negative_coefficients(self, like: torch.Tensor, count: int, sample: ClassSample | None) -> torch.Tensor:
        """Each column's weight [count] as a negative: 1 − λ, times others / kept for a sampled negative (a column
        that no label forced in); a positive weighs λ."""
        coef = like.new_full((count,), 1.0 - self.lam)
        if sample is None:
            return coef
        factor = sample.others / sample.kept_others
        return coef * (1.0 + (factor - 1.0) * (~sample.positive).to(coef.dtype))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> HeadOutput:
        self.check_input(embeddings, labels)
        with fp32_only(embeddings.device):
            weight, labels, shard, sample = self.step_centres(labels)
            x, weight = at_least_fp32(embeddings), at_least_fp32(weight)
            local, owned = shard.local_labels(labels)
            rows, row_max, target_cos = one_vs_all_terms(
                x, weight, self.shared_bias(), local, owned, self.negative_coefficients(x, shard.count, sample),
                self.loss_spec(),
            )
            per_sample = (self.lw / self.r) * class_sum(rows[:, None], shard)  # the shards' row sums, summed
            target = distributed.sum_over_ranks(target_cos, shard.group)
            acc = (target >= class_max(row_max[:, None], shard)).float().mean()
        return HeadOutput(
            loss=per_sample.mean(),
            per_sample_loss=per_sample,
            metrics={"acc": acc, "bias": self.bias.detach().clone()},
        )

    def extra_repr(self) -> str:
        return (
            f"variant={self.variant}, lam={self.lam}, r={self.r}, m={self.m}, t={self.t}, lw={self.lw}, "
            f"detach_adjust={self.detach_adjust}, sample_rate={self.sample_rate}, "
            f"classes={self.shard.count}/{self.num_classes}"
        )


HEADS.register("sphereface2")(SphereFace2)
