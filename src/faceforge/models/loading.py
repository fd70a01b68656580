"""Load any model a user names: find the file (resolve_weights), read torch weights (load_weights) or open an ONNX
model, tell the architecture, and build the backbone; every problem is one ConfigError / DataError line."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from faceforge.backbones import build_backbone
from faceforge.backbones.infer import infer_backbone
from faceforge.config import load_config
from faceforge.data.images import FACE_NORM
from faceforge.errors import ConfigError
from faceforge.fileio import atomic_write, file_format, load_into, load_weights, resolve_weights, split_state
from faceforge.models.model import LoadedModel, describe_norm
from faceforge.models.onnx import load_onnx, onnx_parameters

TORCH_INPUT = {"shape": ["B", 3, 112, 112], "dtype": "float32", "channels": "RGB",
               "normalisation": describe_norm(FACE_NORM, FACE_NORM)}  # every faceforge backbone's


def run_config(weights: Path) -> Path | None:
    """config.yaml of the run a weights file belongs to (run/ or run/checkpoints/x.safetensors)."""
    for folder in (weights.parent, weights.parent.parent):
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
    return None


def threshold_path(weights_file: Path) -> Path:
    """Where `faceforge verify` finds the operating threshold of a weights (or .onnx) file: right beside it."""
    return weights_file.with_suffix(".threshold.json")


def backbone_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The backbone's tensors: those under `backbone.` in a faceforge checkpoint, else the whole state dict."""
    return split_state(state, "backbone") or state


def _mismatch(expected: dict[str, Any], found: dict[str, Any]) -> str | None:
    """How the found architecture differs from the expected one (name, and embedding size when given), if it does."""
    if expected["name"] != found["name"]:
        return f"expected {expected['name']}, the weights are {found['name']}"
    size = expected.get("embedding_size")
    if size is not None and size != found["embedding_size"]:
        return f"expected {found['name']} with embedding size {size}, the weights have {found['embedding_size']}"
    return None


def check_backbone(expected: dict[str, Any], params: dict[str, torch.Tensor], what: str) -> None:
    """ConfigError naming both when the backbone config `expected` is not the architecture of `params`."""
    found = infer_backbone(params)
    problem = found and _mismatch(expected, found)
    if problem:
        raise ConfigError(f"{what}: {problem}")


def _architecture(file: Path, state: dict, params: dict, backbone: str | None) -> tuple[dict[str, Any], str]:
    """build_backbone keywords for the weights and where they came from: --backbone (checked against the
    weights), the run's config.yaml for a faceforge checkpoint, else what the weights' keys and shapes say."""
    found = infer_backbone(params)
    if backbone:
        check_backbone({"name": backbone}, params, f"{file}: --backbone {backbone}")
        return found or {"name": backbone}, f"--backbone {backbone}" + (", as the weights say" if found else "")
    config = run_config(file) if params is not state else None
    if config is not None:
        return load_config(config).backbone, f"the run's {config}"
    if found is None:
        keys = ", ".join(list(params)[:3])
        raise ConfigError(f"{file}: cannot tell the architecture from its keys ({keys}, ...); say it with --backbone")
    return found, "read from the weights"


def _load_torch(file: Path, backbone: str | None) -> LoadedModel:
    state = load_weights(file)
    params = backbone_state(state)
    kwargs, source = _architecture(file, state, params, backbone)
    model = build_backbone(**kwargs)
    load_into(model, params, str(file))
    return LoadedModel(model.eval(), file, file_format(file) or "", kwargs["name"], model.embedding_size,
                       sum(p.numel() for p in model.parameters()), source, TORCH_INPUT)


def load_model(
    source: str | Path,
    backbone: str | None = None,
    pixel_mean: Sequence[float] | None = None,
    pixel_std: Sequence[float] | None = None,
) -> LoadedModel:
    """The model at `source` (run folder, checkpoint, .safetensors / .pt / .pth / .bin state dict, .onnx, or a
    folder holding one of these). `backbone` checks or supplies the architecture of torch weights;
    `pixel_mean` / `pixel_std` override an ONNX model's input scaling, (pixel/255 − mean) / std."""
    file = resolve_weights(source)
    if file_format(file) == "onnx":
        if backbone:
            raise ConfigError(f"--backbone does not apply to the ONNX model {file} (its graph is the architecture)")
        return load_onnx(file, pixel_mean or FACE_NORM, pixel_std or FACE_NORM)
    if pixel_mean is not None or pixel_std is not None:
        raise ConfigError(f"--pixel-mean / --pixel-std apply to ONNX models; {file} is torch weights, whose "
                          f"input is always {TORCH_INPUT['normalisation']}")
    return _load_torch(file, backbone)


def model_info(model: LoadedModel) -> dict:
    """`faceforge info`: the model's description, with the parameters of an ONNX graph counted."""
    info = model.info()
    if info["parameters"] is None:
        info["parameters"] = onnx_parameters(model.file)
    return info


def load_backbone(source: str | Path, backbone: str | None = None) -> nn.Module:
    """The embedding module of load_model(source, backbone)."""
    return load_model(source, backbone).module


def convert_model(source: str | Path, out: str | Path, backbone: str | None = None) -> dict:
    """`faceforge convert`: the backbone weights of any torch model as a .safetensors file laid out like a faceforge
    checkpoint (keys under `backbone.`), written to a temp file and renamed. ONNX graphs are not turned back."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ConfigError(f"convert writes .safetensors; got {out}")
    model = load_model(source, backbone)
    if model.format == "onnx":
        raise ConfigError(f"{model.file} is an ONNX graph; convert reads torch weights (run ONNX models directly)")
    tensors = {f"backbone.{k}": v.contiguous() for k, v in model.module.state_dict().items()}
    meta = {"architecture": model.architecture, "embedding_size": str(model.embedding_size),
            "converted_from": model.file.name}
    atomic_write(out, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return {"out": str(out), **model.info()}
