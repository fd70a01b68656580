"""Classification heads: each owns its class centres and returns a HeadOutput (see base.py)."""

from faceforge.heads.base import ClassShard, Head, HeadOutput
from faceforge.heads.gif import GIF
from faceforge.heads.margin import ArcFace, CombinedMargin, CosFace, Softmax
from faceforge.heads.sphereface2 import SphereFace2
from faceforge.heads.unpg import UNPG
from faceforge.errors import ConfigError
from faceforge.registry import HEADS


def check_unpg_params(unpg: object) -> dict:
    """The `head.unpg` table as UNPG keyword arguments; a bad table raises ConfigError naming the key."""
    if not isinstance(unpg, dict):
        raise ConfigError(f"head.unpg must be a mapping such as {{k: 1.5}}, got {unpg!r}")
    for key, value in unpg.items():
        if key != "k":
            raise ConfigError(f"head.unpg.{key}: unknown key; known: k")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"head.unpg.k must be a number, got {value!r}")
    return dict(unpg)


def build_head(name: str, embedding_size: int, num_classes: int, unpg: dict | None = None, **params) -> Head:
    """Build a registered head by name, wrapped in UNPG when `unpg` is given; bad names or parameters raise
    ConfigError."""
    head = HEADS.build(name, embedding_size=embedding_size, num_classes=num_classes, **params)
    return head if unpg is None else UNPG(head, **check_unpg_params(unpg))


__all__ = [
    "ArcFace", "ClassShard", "CombinedMargin", "CosFace", "GIF", "Head", "HeadOutput", "Softmax", "SphereFace2", "UNPG", "build_head",
]
