"""Softmax baselines: plain softmax and the margin family cos(m1·θ + m2) − m3 (SphereFace/ArcFace/CosFace)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from faceforge.errors import ConfigError
from faceforge.heads.base import SoftmaxHead
from faceforge.heads.centres import ClassShard, pick_target, replace_target
from faceforge.heads.margin_loss import MarginSpec
from faceforge.registry import HEADS
from faceforge.runtime import at_least_fp32


class Softmax(SoftmaxHead):
    """Plain N-way classifier on unnormalised embeddings (logits W·x): the classic baseline.

    `sample_rate` < 1 trains each step on the batch's classes plus that fraction of the others (PartialFC).
    """

    def class_logits(
        self, embeddings: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, shard: ClassShard
    ) -> torch.Tensor:
        return at_least_fp32(embeddings) @ at_least_fp32(weight).t()

    def margin_spec(self) -> MarginSpec:
        """Raw products x·w, s = 1, no margin."""
        return MarginSpec()


class CombinedMargin(Softmax):
    """Normalised softmax with scale s; the target logit is s·(cos(m1·θ + m2) − m3), the others s·cos θ_j.

    m1 = 1, m3 = 0 is ArcFace; m1 = 1, m2 = 0 is CosFace; m2 = m3 = 0 is SphereFace's multiplicative margin.
    `straight_through=True` reproduces arcface_torch: the margin changes the forward value only, the gradient
    is that of cos θ. `margin_warmup` ramps every margin from zero over that fraction of training.
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        s: float = 64.0,
        m1: float = 1.0,
        m2: float = 0.5,
        m3: float = 0.0,
        straight_through: bool = False,
        margin_warmup: float = 0.0,
        sample_rate: float = 1.0,
        shard: ClassShard | None = None,
    ) -> None:
        super().__init__(embedding_size, num_classes, sample_rate, shard)
        if s <= 0:
            raise ConfigError(f"head.s (the logit scale) must be positive, got {s}")
        if not 0.0 <= margin_warmup <= 1.0:
            raise ConfigError(f"head.margin_warmup is a fraction of training in [0, 1], got {margin_warmup}")
        self.s, self.m1, self.m2, self.m3 = float(s), float(m1), float(m2), float(m3)
        self.straight_through = straight_through
        self.margin_warmup = margin_warmup

    def margins(self) -> tuple[float, float, float]:
        """(m1, m2, m3) at the current training progress."""
        ramp = 1.0 if self.margin_warmup == 0 else min(1.0, self.progress / self.margin_warmup)
        return 1.0 + ramp * (self.m1 - 1.0), ramp * self.m2, ramp * self.m3

    def cosines(self, embeddings: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """cos θ [B, rows] between L2-normalised embeddings and the centres (this shard's by default), in fp32."""
        x = F.normalize(at_least_fp32(embeddings), dim=1)
        w = F.normalize(at_least_fp32(self.weight if weight is None else weight), dim=1)
        return (x @ w.t()).clamp(-1.0, 1.0)

    def margin_spec(self) -> MarginSpec:
        m1, m2, m3 = self.margins()
        return MarginSpec(self.s, m1, m2, m3, normalize=True, straight_through=self.straight_through)

    def target_margin(self, cos_target: torch.Tensor) -> torch.Tensor:
        """cos(m1·θ + m2) − m3 of the target cosines, with arccos kept away from ±1 (MarginSpec.target)."""
        return self.margin_spec().target(cos_target)

    def margined_cosines(
        self, cos: torch.Tensor, labels: torch.Tensor, shard: ClassShard | None = None
    ) -> torch.Tensor:
        """The cosine matrix with the margin applied at each row's target: what UNPG and friends wrap."""
        shard = shard or self.shard
        return replace_target(cos, labels, self.target_margin(pick_target(cos, labels, shard)), shard)

    def class_logits(
        self, embeddings: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, shard: ClassShard
    ) -> torch.Tensor:
        return self.s * self.margined_cosines(self.cosines(embeddings, weight), labels, shard)

    def schedule_metrics(self) -> dict[str, float]:
        """The margin in effect (m2 + m3 + m1 − 1; it ramps under margin_warmup)."""
        m1, m2, m3 = self.margins()
        return {"margin": m2 + m3 + (m1 - 1.0)}

    def extra_repr(self) -> str:
        return (f"s={self.s}, m1={self.m1}, m2={self.m2}, m3={self.m3}, sample_rate={self.sample_rate}, "
                f"classes={self.shard.count}/{self.num_classes}")


class ArcFace(CombinedMargin):
    """Additive angular margin: target logit s·cos(θ + m) (Deng et al., CVPR 2019)."""

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        s: float = 64.0,
        m: float = 0.5,
        straight_through: bool = False,
        margin_warmup: float = 0.0,
        sample_rate: float = 1.0,
        shard: ClassShard | None = None,
    ) -> None:
        if not 0.0 <= m < math.pi:
            raise ConfigError(f"head.m (ArcFace's angular margin) must be in [0, pi), got {m}")
        super().__init__(
            embedding_size, num_classes, s, 1.0, m, 0.0, straight_through, margin_warmup, sample_rate, shard
        )


class CosFace(CombinedMargin):
    """Additive cosine margin: target logit s·(cos θ − m) (Wang et al., CVPR 2018)."""

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        s: float = 64.0,
        m: float = 0.4,
        margin_warmup: float = 0.0,
        sample_rate: float = 1.0,
        shard: ClassShard | None = None,
    ) -> None:
        super().__init__(embedding_size, num_classes, s, 1.0, 0.0, m, False, margin_warmup, sample_rate, shard)


HEADS.register("softmax")(Softmax)
HEADS.register("combined")(CombinedMargin)
HEADS.register("arcface")(ArcFace)
HEADS.register("cosface")(CosFace)
