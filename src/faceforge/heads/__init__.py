"""Classification heads: each owns its class centres (or codes) and returns a HeadOutput (see base.py).

A head is a registered Head subclass (`HEADS.register(name)`); a wrapper such as UNPG is a key of the head table,
registered in wrappers.py. build_head builds both from one config table.
"""

from faceforge.heads.base import CentreHead, Head, HeadOutput, SoftmaxHead
from faceforge.heads.centres import ClassShard
from faceforge.heads.gif import GIF
from faceforge.heads.margin import ArcFace, CombinedMargin, CosFace, Softmax
from faceforge.heads.sphereface2 import SphereFace2
from faceforge.heads.unpg import UNPG
from faceforge.heads.wrappers import WRAPPERS, check_wrapper_table, split_wrappers, wrap
from faceforge.registry import HEADS


def build_head(name: str, embedding_size: int, num_classes: int, **params) -> Head:
    """Build the registered head `name` and wrap it as the table's wrapper keys say (`unpg: {k: 1.5}`); bad
    names, keys or values raise ConfigError naming the key."""
    own, wrappers = split_wrappers(params)
    head = HEADS.build(name, embedding_size=embedding_size, num_classes=num_classes, **own)
    return wrap(head, wrappers)


def list_heads() -> list[str]:
    """Names of the registered heads, sorted (what `head.name` accepts)."""
    return HEADS.names()


def list_head_wrappers() -> list[str]:
    """Keys of the registered head wrappers, sorted (what a head table may add, e.g. `unpg`)."""
    return sorted(WRAPPERS)


__all__ = [
    "ArcFace", "CentreHead", "ClassShard", "CombinedMargin", "CosFace", "GIF", "Head", "HeadOutput", "Softmax",
    "SoftmaxHead", "SphereFace2", "UNPG", "build_head", "check_wrapper_table", "list_head_wrappers", "list_heads",
    "split_wrappers",
]
