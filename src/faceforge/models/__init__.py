"""Models as users have them, behind one door for every command that runs one (eval, export, embed, verify, info,
convert, tokenize, train.init_from): faceforge run folders and checkpoints, arcface_torch / InsightFace torch
state dicts (.pt / .pth / .bin) and .safetensors files, whose architecture is read from the weights, and ONNX
recognition models. Each loads as a module taking [B, 3, 112, 112] RGB in [-1, 1] and giving [B, D] embeddings."""

from faceforge.models.loading import (
    backbone_state,
    check_backbone,
    convert_model,
    load_backbone,
    load_model,
    model_info,
    run_config,
    threshold_path,
)
from faceforge.models.model import LoadedModel
from faceforge.models.onnx import require_onnx

__all__ = [
    "LoadedModel", "backbone_state", "check_backbone", "convert_model", "load_backbone", "load_model",
    "model_info", "require_onnx", "run_config", "threshold_path",
]
