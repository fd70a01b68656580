"""The backbone contract: what the step, evaluation, export and model loading rely on.

A backbone is an nn.Module that a factory registered in `faceforge.registry.BACKBONES` builds from keyword
arguments (at least `embedding_size`). It must:

- take images [B, 3, 112, 112], float, pixels scaled to [-1, 1] (data/ and eval/ prepare them so), and return
  embeddings [B, embedding_size], not normalised (heads and evaluation normalise);
- expose `embedding_size: int`: the step sizes the head from it, model loading and export report it;
- compute its final embedding layers in float32 even under autocast (`faceforge.runtime.fp32_only`), so the
  head sees fp32 embeddings whatever precision the trunk runs in;
- to read arcface_torch / InsightFace weights (the shipped backbones do), keep arcface_torch's module names, the
  final embedding block included (`features`): state-dict keys are matched by name, and `backbones.infer` reads
  an architecture back from them. A backbone of one's own that never loads such weights may name them freely.

Nothing tests a backbone's class: the step calls `check_backbone` once when it builds one.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from faceforge.errors import ConfigError


@runtime_checkable
class Backbone(Protocol):
    """Structural type of a backbone (see the module docstring for the rules that types cannot say)."""

    embedding_size: int

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


def check_backbone(model: nn.Module, name: str) -> nn.Module:
    """`model` itself when it declares what the step needs, else a ConfigError naming the backbone."""
    if not isinstance(model, Backbone):
        raise ConfigError(f"backbone {name!r}: a backbone must expose `embedding_size` (see backbones/base.py)")
    size = model.embedding_size
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ConfigError(f"backbone {name!r}: embedding_size must be a positive int, got {size!r}")
    return model
