"""The architecture of a backbone state dict, read from its keys and shapes: which registered backbone it is and with
which embedding size, so that weights saved by arcface_torch (`torch.save(model.state_dict())`) need no config."""

from __future__ import annotations

import re
from typing import Any

import torch

from faceforge.backbones.iresnet import DEPTHS
from faceforge.backbones.mobilefacenet import LAYOUTS
from faceforge.errors import ConfigError

State = dict[str, torch.Tensor]


def _count(state: State, pattern: str) -> int:
    """How many distinct indices fill the `(\\d+)` of `pattern` among the keys."""
    regex = re.compile(pattern)
    return len({m.group(1) for key in state if (m := regex.fullmatch(key))})


def _dashed(counts: tuple[int, ...]) -> str:
    return "-".join(map(str, counts))


def _iresnet(state: State) -> dict[str, Any]:
    depths = tuple(_count(state, rf"layer{s}\.(\d+)\.conv1\.weight") for s in range(1, 5))
    name = next((n for n, d in DEPTHS.items() if d == depths), None)
    if name is None:
        known = ", ".join(f"{n}: {_dashed(d)}" for n, d in DEPTHS.items())
        raise ConfigError(f"IResNet weights with {_dashed(depths)} blocks per stage match no registered backbone "
                          f"({known})")
    return {"name": name, "embedding_size": state["fc.weight"].shape[0]}


def _mobilefacenet(state: State) -> dict[str, Any]:
    scale = state["layers.0.layers.0.weight"].shape[0] // 64
    first = _count(state, r"layers\.1\.layers\.(\d+)\.layers\.0\.layers\.0\.weight") or 1  # 1: a plain ConvBlock
    blocks = (first, *(_count(state, rf"layers\.{i}\.layers\.(\d+)\.layers\.0\.layers\.0\.weight") for i in (3, 5, 7)))
    name = next((n for n, layout in LAYOUTS.items() if layout == (blocks, scale)), None)
    if name is None:
        raise ConfigError(f"MobileFaceNet weights with {_dashed(blocks)} blocks at width scale {scale} match no "
                          f"registered backbone ({', '.join(LAYOUTS)})")
    return {"name": name, "embedding_size": state["features.layers.2.weight"].shape[0]}


def _tiny(state: State) -> dict[str, Any]:
    widths = [state[f"layers.{i}.conv1.weight"].shape[0] for i in range(_count(state, r"layers\.(\d+)\.conv1\.weight"))]
    return {"name": "tiny", "embedding_size": state["fc.weight"].shape[0], "stem": state["conv1.weight"].shape[0],
            "widths": widths}


_FAMILIES = (  # a key only that family has, and the reader of its architecture
    ("layer1.0.conv1.weight", _iresnet),
    ("conv_sep.layers.0.weight", _mobilefacenet),
    ("layers.0.conv1.weight", _tiny),
)


def infer_backbone(state: State) -> dict[str, Any] | None:
    """`build_backbone` keywords (name, embedding_size, and tiny's stem / widths) that rebuild the backbone whose
    state dict this is, or None when the keys are no registered backbone's. ConfigError when they are a known
    family's with a layout no registered name has."""
    for key, read in _FAMILIES:
        if key in state:
            return read(state)
    return None
