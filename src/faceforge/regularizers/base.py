"""Regularizer contract: forward(batch, embeddings, head_output) -> RegOutput, combined by the trainer."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class RegOutput:
    """An extra loss term and, optionally, per-sample weights [B] for the head's per-sample loss."""

    loss: torch.Tensor
    sample_weights: torch.Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)
