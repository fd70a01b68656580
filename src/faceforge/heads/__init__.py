"""Classification heads: each owns its class centres and returns a HeadOutput (see base.py)."""

from faceforge.heads.base import ClassShard, Head, HeadOutput
from faceforge.heads.margin import ArcFace, CombinedMargin, CosFace, Softmax
from faceforge.heads.sphereface2 import SphereFace2
from faceforge.registry import HEADS


def build_head(name: str, embedding_size: int, num_classes: int, **params) -> Head:
    """Build a registered head by name; unknown names or parameters raise ConfigError."""
    return HEADS.build(name, embedding_size=embedding_size, num_classes=num_classes, **params)


__all__ = [
    "ArcFace", "ClassShard", "CombinedMargin", "CosFace", "Head", "HeadOutput", "Softmax", "SphereFace2", "build_head",
]
