"""Backbones: images [B, 3, 112, 112] in [-1, 1] -> embeddings [B, D] (not normalised); built by name."""

from __future__ import annotations

from typing import Any

from torch import nn

from faceforge.backbones import iresnet, mobilefacenet, tiny  # noqa: F401  (importing registers the names)
from faceforge.backbones.flops import count_flops
from faceforge.registry import BACKBONES

__all__ = ["build_backbone", "count_flops", "list_backbones"]


def build_backbone(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered backbone (r18 ... r200, mbf, mbf_large, tiny); unknown names or keywords raise ConfigError."""
    return BACKBONES.build(name, **kwargs)


def list_backbones() -> list[str]:
    """The registered backbone names, sorted (what `backbone.name` accepts)."""
    return BACKBONES.names()
