"""`faceforge export`: a backbone as ONNX (input `data` [batch, 3, 112, 112] in [-1, 1], output `embedding`
[batch, D], batch dynamic) at the opset asked for, with a parity check against PyTorch in onnxruntime."""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from faceforge.data.images import FACE_SIZE, to_unit_range
from faceforge.errors import ConfigError, FaceforgeError
from faceforge.fileio import atomic_write
from faceforge.models import load_model, require_onnx, threshold_path

PARITY_BATCHES = (1, 3)  # neither is the batch of the example input, so the batch axis is really exercised
RTOL = 1e-4  # allowed max |onnx - torch| as a fraction of the largest output magnitude (at least 1)
DYNAMO_OPSETS = 18  # torch.onnx's dynamo exporter writes opset 18 and up; lower ones go through the TorchScript one
LOWEST_OPSET = 9


def _export(model: nn.Module, path: str, opset: int) -> None:
    """Write `model` to `path` with torch.onnx at `opset`: dynamo exporter from DYNAMO_OPSETS, TorchScript below."""
    example = torch.zeros(2, 3, FACE_SIZE, FACE_SIZE)
    names = {"input_names": ["data"], "output_names": ["embedding"], "opset_version": opset}
    if opset >= DYNAMO_OPSETS:
        program = torch.onnx.export(model, (example,), None, dynamic_shapes=({0: torch.export.Dim("batch")},),
                                    dynamo=True, verbose=False, **names)
        program.save(path)
    else:
        torch.onnx.export(model, (example,), path, dynamic_axes={"data": {0: "batch"}, "embedding": {0: "batch"}},
                          dynamo=False, **names)


def written_opset(path: str | Path) -> int:
    """The default-domain opset an ONNX file declares."""
    (onnx,) = require_onnx("reading an ONNX file", "onnx")
    imports = onnx.load(str(path), load_external_data=False).opset_import
    return next(int(i.version) for i in imports if i.domain in ("", "ai.onnx"))


def _exporter_packages(opset: int) -> tuple[str, ...]:
    """The optional packages torch.onnx needs at `opset` (onnxscript only for the dynamo exporter)."""
    return ("onnx", "onnxscript") if opset >= DYNAMO_OPSETS else ("onnx",)


def export_onnx(model: nn.Module, out: str | Path, opset: int = 18) -> None:
    """Write `model` (in eval mode) to `out` as ONNX at exactly `opset`, with a dynamic batch axis; the file is
    replaced atomically, and nothing is written when the exporter cannot give that opset (ConfigError)."""
    require_onnx("faceforge export", *_exporter_packages(opset))
    if opset < LOWEST_OPSET:
        raise ConfigError(f"--opset {opset}: faceforge exports opsets {LOWEST_OPSET} and up")
    model = model.eval().cpu()

    def write(tmp: str) -> None:
        # torch.onnx logs every optional op library it does not find, onnxscript a traceback for each version it
        # cannot convert to; what matters reaches the user as the opset check below
        loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript")]
        levels = [logger.level for logger in loggers]
        for logger in loggers:
            logger.setLevel(logging.CRITICAL)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _export(model, tmp, opset)
        except Exception as exc:  # torch.onnx raises many exception types (unsupported op, converter failure)
            raise ConfigError(f"cannot export at opset {opset}: {str(exc).strip().splitlines()[0]}") from None
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)
        written = written_opset(tmp)
        if written != opset:
            raise ConfigError(f"--opset {opset}: the exporter wrote opset {written}; nothing written")

    atomic_write(out, write)


def check_parity(model: nn.Module, onnx_path: str | Path, seed: int = 0) -> dict:
    """Run PyTorch and onnxruntime on the same random inputs at PARITY_BATCHES; FaceforgeError past the bound."""
    (onnxruntime,) = require_onnx("the export parity check", "onnxruntime")
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(seed)
    model = model.eval().cpu()
    worst, scale = 0.0, 1.0
    for batch in PARITY_BATCHES:
        x = to_unit_range(torch.randint(0, 256, (batch, 3, FACE_SIZE, FACE_SIZE), generator=generator))
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
    """Export a model's weights to ONNX, check parity, and copy their stored verify threshold beside the .onnx;
    the reported opset is the one read back from the written file."""
    out = Path(out)
    if out.suffix != ".onnx":
        raise FaceforgeError(f"--onnx wants a path ending in .onnx, got {out}")
    require_onnx("faceforge export", *_exporter_packages(opset), "onnxruntime")
    loaded = load_model(weights, backbone)
    if loaded.format == "onnx":
        raise ConfigError(f"{loaded.file} is already ONNX; export takes torch weights")
    export_onnx(loaded.module, out, opset)
    result = {"onnx": str(out), "opset": written_opset(out), "architecture": loaded.architecture,
              **check_parity(loaded.module, out)}
    stored = threshold_path(loaded.file)
    if stored.is_file():
        atomic_write(threshold_path(out), lambda tmp: shutil.copyfile(stored, tmp))
        result["threshold"] = str(threshold_path(out))
    return result
