"""Regularizer contract: an optional input perturbation before the backbone, then a loss / sample weights after."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class RegOutput:
    """An extra loss term and, optionally, per-sample weights [B] for the head's per-sample loss."""

    loss: torch.Tensor
    sample_weights: torch.Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)


class Regularizer(nn.Module):
    """Base of all regularizers; the step calls bind(head) once, perturb() before and forward() after the backbone.

    `forward(batch, embeddings, head_output)` gets batch = {"images": clean inputs, "inputs": what the backbone saw
    (after every regularizer's perturb), "labels": labels}; embeddings are those of batch["inputs"].
    """

    def bind(self, head: nn.Module) -> None:
        """Check the head once at build time; raise ConfigError when this regularizer cannot work with it."""

    def perturb(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The batch the backbone should see; must not modify `images` in place. Default: unchanged."""
        return images

    def forward(self, batch: dict[str, Any], embeddings: torch.Tensor, head_output: Any) -> RegOutput:
        raise NotImplementedError
