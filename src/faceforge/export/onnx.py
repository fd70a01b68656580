"""`faceforge export`: a trained backbone as ONNX (input `data` [batch, 3, 112, 112] in [-1, 1], output `embedding`
[batch, D], batch dynamic), through torch.onnx's export, with a parity check against PyTorch in onnxruntime; and
`onnx_encoder`, which runs such a file, or any ONNX image encoder, on uint8 face crops."""

from __future__ import annotations

import logging
import shutil
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from faceforge.errors import ConfigError, DataError, FaceforgeError
from faceforge.eval.model_eval import load_backbone, threshold_path
from faceforge.fileio import atomic_write, resolve_weights

PARITY_BATCHES = (1, 3)  # neither is the batch of the example input, so the batch axis is really exercised
RTOL = 1e-4  # allowed max |onnx - torch| as a fraction of the largest output magnitude (at least 1)
FACE_NORM = (0.5, 0.5, 0.5)  # pixel/255 → [-1, 1], the faceforge / InsightFace input scaling

Encoder = Callable[[np.ndarray], np.ndarray | torch.Tensor]  # uint8 [B, 112, 112, 3] RGB -> [B, D]


def export_onnx(model: nn.Module, out: str | Path, opset: int = 18) -> None:
    """Write `model` (in eval mode) to `out` as ONNX with a dynamic batch axis; the file is replaced atomically."""
    model = model.eval().cpu()
    example = torch.zeros(2, 3, 112, 112)
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the exporter logs every optional op library it does not find
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model, (example,), None, input_names=["data"], output_names=["embedding"], opset_version=opset,
                dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, verbose=False,
            )
    finally:
        quiet.setLevel(level)
    atomic_write(out, lambda tmp: program.save(tmp))


def check_parity(model: nn.Module, onnx_path: str | Path, seed: int = 0) -> dict:
    """Run PyTorch and onnxruntime on the same random inputs at PARITY_BATCHES; FaceforgeError past the bound."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(seed)
    model = model.eval().cpu()
    worst, scale = 0.0, 1.0
    for batch in PARITY_BATCHES:
        x = torch.rand(batch, 3, 112, 112, generator=generator) * 2 - 1
        with torch.no_grad():
            expected = model(x).numpy()
        got = session.run(None, {"data": x.numpy()})[0]
        if got.shape != expected.shape:
            raise FaceforgeError(f"{onnx_path}: ONNX output {got.shape} at batch {batch}, "
                                 f"PyTorch gives {expected.shape}")
        worst = max(worst, float(np.abs(got - expected).max()))
        scale = max(scale, float(np.abs(expected).max()))
    result = {"embedding_size": int(expected.shape[1]), "max_abs_diff": worst, "bound": RTOL * scale,
              "batches": list(PARITY_BATCHES)}
    if worst > result["bound"]:
        raise FaceforgeError(f"{onnx_path}: ONNX and PyTorch outputs differ by {worst:.3g} "
                             f"(> bound {result['bound']:.3g})")
    return result


def export_weights(weights: str | Path, out: str | Path, backbone: str | None = None, opset: int = 18) -> dict:
    """Export trained weights to ONNX, check parity, and copy their stored verify threshold beside the .onnx."""
    out = Path(out)
    if out.suffix != ".onnx":
        raise FaceforgeError(f"--onnx wants a path ending in .onnx, got {out}")
    model = load_backbone(weights, backbone)
    export_onnx(model, out, opset)
    result = {"onnx": str(out), "opset": opset, **check_parity(model, out)}
    stored = threshold_path(resolve_weights(weights))
    if stored.is_file():
        atomic_write(threshold_path(out), lambda tmp: shutil.copyfile(stored, tmp))
        result["threshold"] = str(threshold_path(out))
    return result


def onnx_encoder(path: str | Path, mean: Sequence[float], std: Sequence[float]) -> Encoder:
    """An ONNX image encoder taking float [B, 3, H, W] RGB, (pixel/255 − mean) / std, and giving [B, D].

    The 112×112 crops are resized bilinearly to the model's H×W when its input shape fixes one (224 for CLIP).
    """
    try:
        import onnxruntime as ort
    except ImportError:
        raise ConfigError("an ONNX prototype source needs onnxruntime (pip install onnxruntime)") from None
    try:
        session = ort.InferenceSession(str(path), providers=ort.get_available_providers())
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable or invalid models
        raise DataError(f"cannot load ONNX model {path}: {exc}") from None
    spec = session.get_inputs()[0]
    shape = list(spec.shape)
    if len(shape) != 4 or shape[1] != 3:
        raise DataError(f"{path}: expected an image input [B, 3, H, W], got {shape}")
    size = tuple(shape[2:]) if all(isinstance(d, int) for d in shape[2:]) else (112, 112)
    fixed_batch = shape[0] if isinstance(shape[0], int) else None
    dtype = np.float16 if spec.type == "tensor(float16)" else np.float32
    mean_t = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    std_t = torch.tensor(std, dtype=torch.float32)[:, None, None]

    def encode(images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
        if x.shape[2:] != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        x = ((x - mean_t) / std_t).numpy().astype(dtype)
        step = fixed_batch or len(x)
        outs = [session.run(None, {spec.name: x[i : i + step]})[0] for i in range(0, len(x), step)]
        out = np.concatenate(outs)
        if out.ndim != 2:
            raise DataError(f"{path}: the first output must be [B, D] embeddings, got shape {list(out.shape)}")
        return out.astype(np.float32)

    return encode
