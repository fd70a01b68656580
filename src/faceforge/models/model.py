"""What a loaded model is: the embedding module and what `faceforge info` says about it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from faceforge.data.images import FACE_NORM



def describe_norm(mean: Sequence[float], std: Sequence[float]) -> str:
    """The input scaling in words, in InsightFace's spelling when it is theirs."""
    if tuple(mean) == FACE_NORM and tuple(std) == FACE_NORM:
        return "(pixel - 127.5) / 127.5"
    return f"(pixel/255 - {list(mean)}) / {list(std)}"


@dataclass
class LoadedModel:
    """A model ready to embed, and where it came from."""

    module: nn.Module  # [B, 3, 112, 112] RGB in [-1, 1] -> [B, D]; in eval mode
    file: Path  # the file it was read from
    format: str  # safetensors, torch or onnx
    architecture: str  # a registered backbone name, or "onnx"
    embedding_size: int
    parameters: int | None  # None for ONNX until counted (that needs the onnx package, embedding does not)
    architecture_from: str  # where the architecture came from
    input: dict  # shape, dtype, channels, normalisation

    def info(self) -> dict:
        """Everything above but the module, as JSON-ready values."""
        return {"file": str(self.file), "format": self.format, "architecture": self.architecture,
                "embedding_size": self.embedding_size, "parameters": self.parameters,
                "architecture_from": self.architecture_from, "input": self.input}
