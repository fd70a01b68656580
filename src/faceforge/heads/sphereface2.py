"""SphereFace2 (Wen et al., ICLR 2022): N one-vs-all binary classifiers on the hypersphere with one shared bias.

The loss is a sum of independent per-class terms, so a class shard computes its own part and the shards only
sum scalars per sample; no partition function is reduced across ranks.
"""

from __future__ import annotations

import math
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from faceforge import distributed
from faceforge.errors import ConfigError
from faceforge.heads.base import CentreHead, HeadOutput
from faceforge.heads.centres import ClassSample, ClassShard, angle, class_sum, target_mask, top1_accuracy
from faceforge.registry import HEADS
from faceforge.runtime import at_least_fp32, fp32_only

DEFAULT_MARGIN = {"C": 0.4, "A": 0.5, "M": 1.7}

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


def softplus(x: torch.Tensor) -> torch.Tensor:
    """log(1 + e^x) without overflow and without torch's linear cut-off at x > 20 (exact in float64)."""
    return torch.logaddexp(x, x.new_zeros(()))


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

    def logits(self, cos: torch.Tensor, onehot: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """Binary logits s = r·(adjusted cosine) + b, the target column margined as the variant says."""
        if self.variant == "C":
            adjusted = adjust(cos, self.t) + self.m * (1.0 - 2.0 * onehot.to(cos.dtype))
        else:
            target = adjust(positive_cosine(cos.gather(1, local[:, None]), self.variant, self.m), self.t)
            adjusted = torch.where(onehot, target, adjust(cos, self.t))
        if self.detach_adjust:
            adjusted = cos + (adjusted - cos).detach()
        return self.r * adjusted + self.shared_bias()

    def coefficients(self, positive: torch.Tensor, sample: ClassSample | None) -> torch.Tensor:
        """Each term's weight from the 0/1 target matrix: λ for the positive, 1 − λ for a negative, times
        others / kept for a sampled negative."""
        coef = self.lam * positive + (1.0 - self.lam) * (1.0 - positive)
        if sample is None:
            return coef
        factor = sample.others / sample.kept_others
        return coef * (1.0 + (factor - 1.0) * (~sample.positive).to(coef.dtype))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> HeadOutput:
        self.check_input(embeddings, labels)
        with fp32_only(embeddings.device):
            weight, labels, shard, sample = self.step_centres(labels)
            x = F.normalize(at_least_fp32(embeddings), dim=1)
            cos = (x @ F.normalize(at_least_fp32(weight), dim=1).t()).clamp(-1.0, 1.0)
            onehot = target_mask(cos, labels, shard)
            logits = self.logits(cos, onehot, shard.local_labels(labels)[0])
            positive = onehot.to(cos.dtype)
            terms = self.coefficients(positive, sample) * softplus(logits * (1.0 - 2.0 * positive))
            per_sample = (self.lw / self.r) * class_sum(terms, shard)
            acc = top1_accuracy(cos, labels, shard)
        return HeadOutput(
            loss=per_sample.mean(),
            per_sample_loss=per_sample,
            logits_for_metrics=logits,
            metrics={"acc": acc, "bias": self.bias.detach().clone()},
        )

    def extra_repr(self) -> str:
        return (
            f"variant={self.variant}, lam={self.lam}, r={self.r}, m={self.m}, t={self.t}, lw={self.lw}, "
            f"detach_adjust={self.detach_adjust}, sample_rate={self.sample_rate}, "
            f"classes={self.shard.count}/{self.num_classes}"
        )


HEADS.register("sphereface2")(SphereFace2)
