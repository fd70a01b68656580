"""ONNX recognition models (InsightFace's buffalo_l / antelopev2 `w600k_r50.onnx`, faceforge exports, or any image
encoder) behind the backbone contract, run in onnxruntime; and `require_onnx`, the one check that the optional
ONNX packages (`pip install 'faceforge[onnx]'`) are there, imported only when a command needs them."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from faceforge.errors import ConfigError, DataError
from faceforge.models.model import LoadedModel, describe_norm

ONNX_EXTRA = "pip install 'faceforge[onnx]'"
_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
_PROBE_BATCH = 2  # a symbolic batch axis is tried at 2 on loading, so that one that is really fixed fails there


def require_onnx(what: str, *modules: str) -> tuple[ModuleType, ...]:
    """Import the named ONNX packages (onnx, onnxruntime, onnxscript); ConfigError with the install line when one
    is missing, so that faceforge without the extra runs everything else."""
    loaded = []
    for name in modules:
        try:
            loaded.append(importlib.import_module(name))
        except ImportError:
            raise ConfigError(f"{what} needs {name}, which is not installed: {ONNX_EXTRA}") from None
    return tuple(loaded)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class OnnxBackbone(nn.Module):
    """An ONNX model as a backbone: [B, 3, 112, 112] RGB in [-1, 1] -> float32 [B, D] on the input's device.

    The input is rescaled to the model's (pixel/255 − mean) / std and resized to its H×W when the graph fixes one;
    a fixed batch axis is fed that many images at a time (the last chunk zero-padded).
    """

    def __init__(self, session: Any, path: Path, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.session, self.path = session, path
        spec = session.get_inputs()[0]
        self.input_name, shape = spec.name, list(spec.shape)
        self.fixed_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        self.size = tuple(shape[2:]) if all(isinstance(d, int) and d > 0 for d in shape[2:]) else (112, 112)
        self.dtype = _DTYPES[spec.type]
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]

    def _run(self, feed: np.ndarray) -> np.ndarray:
        try:
            out = self.session.run(None, {self.input_name: feed})[0]
        except Exception as exc:  # onnxruntime raises its own exception types for shape and type problems
            raise DataError(f"{self.path}: onnxruntime failed on an input of shape {list(feed.shape)}: "
                            f"{_first_line(exc)}") from None
        if out.ndim != 2 or len(out) != len(feed):
            raise DataError(f"{self.path}: the first output must be [B, D] embeddings; a batch of {len(feed)} "
                            f"gave shape {list(out.shape)}")
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixels = (x.detach().float().cpu() + 1) / 2
        if tuple(pixels.shape[2:]) != self.size:
            pixels = F.interpolate(pixels, size=self.size, mode="bilinear", align_corners=False)
        feed = ((pixels - self.mean) / self.std).numpy().astype(self.dtype)
        step = self.fixed_batch or len(feed)
        outs = []
        for start in range(0, len(feed), step):
            chunk = feed[start : start + step]
            padded = np.concatenate([chunk, np.zeros((step - len(chunk), *chunk.shape[1:]), chunk.dtype)])
            outs.append(self._run(padded)[: len(chunk)])
        return torch.from_numpy(np.concatenate(outs).astype(np.float32)).to(x.device)


def _session(path: Path) -> Any:
    (ort,) = require_onnx(f"the ONNX model {path}", "onnxruntime")
    try:
        return ort.InferenceSession(str(path), providers=ort.get_available_providers())
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable or invalid models
        raise DataError(f"cannot load ONNX model {path}: {_first_line(exc)}") from None


def _check_input(session: Any, path: Path) -> list:
    """The single input's shape; DataError unless it is one float NCHW image tensor with 3 channels."""
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise DataError(f"{path}: a recognition model takes one input, this one takes {len(inputs)} "
                        f"({', '.join(i.name for i in inputs)})")
    shape, kind = list(inputs[0].shape), inputs[0].type
    if len(shape) != 4 or shape[1] != 3:
        layout = " (NHWC? faceforge feeds NCHW)" if len(shape) == 4 and shape[3] == 3 else ""
        raise DataError(f"{path}: expected an image input [B, 3, H, W], got {shape}{layout}")
    if kind not in _DTYPES:
        raise DataError(f"{path}: expected a float or float16 input, got {kind}")
    return shape


def onnx_parameters(path: Path) -> int:
    """Number of weights in the graph's initializers (read without external data)."""
    (onnx,) = require_onnx(f"reading {path}", "onnx")
    graph = onnx.load(str(path), load_external_data=False).graph
    return int(sum(np.prod(t.dims, dtype=np.int64) for t in graph.initializer))


def load_onnx(path: Path, mean: Sequence[float], std: Sequence[float]) -> LoadedModel:
    """An ONNX recognition model, checked by running a zero batch through it, so that shape problems show here."""
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ConfigError(f"--pixel-mean / --pixel-std need 3 values each, std > 0; got {list(mean)}, {list(std)}")
    session = _session(path)
    shape = _check_input(session, path)
    module = OnnxBackbone(session, path, mean, std).eval()
    batch = module.fixed_batch or _PROBE_BATCH
    width = module._run(np.zeros((batch, 3, *module.size), module.dtype)).shape[1]
    output = session.get_outputs()[0]
    return LoadedModel(
        module, path, "onnx", "onnx", int(width), None,
        f"ONNX graph: input {module.input_name!r} {shape}, output {output.name!r} {list(output.shape)}",
        {"shape": [module.fixed_batch or "B", 3, *module.size], "dtype": np.dtype(module.dtype).name,
         "channels": "RGB", "normalisation": describe_norm(mean, std)},
    )
