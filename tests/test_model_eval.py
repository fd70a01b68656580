"""`faceforge eval` on an arcface_torch-style state dict: each .bin embedded once."""

import torch

from faceforge.backbones import build_backbone
from faceforge.eval import model_eval
from faceforge.eval.model_eval import evaluate_model

TINY = {"name": "tiny", "embedding_size": 16, "stem": 8, "widths": [8, 16, 16]}


def test_each_bin_is_embedded_once(tiny_data, tmp_path, monkeypatch):
    torch.manual_seed(0)
    torch.save(build_backbone(**TINY).state_dict(), tmp_path / "model.pt")
    calls = []

    def counted(model, images, *args, **kwargs):
        calls.append(len(images))
        return real(model, images, *args, **kwargs)

    real = model_eval.embed_views
    monkeypatch.setattr(model_eval, "embed_views", counted)
    evaluation = evaluate_model(tmp_path / "model.pt", [str(tiny_data / "val.bin")] * 2, device="cpu", progress=False)
    assert calls == [40, 40]  # 20 pairs per set, once each (the threshold reuses the first set's embeddings)
    assert evaluation.threshold["set"] == "val" and evaluation.model["architecture"] == "tiny"

