"""`faceforge eval` on an arcface_torch-style state dict: each .bin embedded once, TAR@FAR readings that too few
impostor pairs back marked not measurable in the table, report.md and results.json."""

import json

import numpy as np
import torch

from faceforge import cli
from faceforge.backbones import build_backbone
from faceforge.eval import model_eval
from faceforge.eval.model_eval import evaluate_model, format_table, mark_unmeasurable
from faceforge.eval.options import EvalOptions

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
    evaluation = evaluate_model(tmp_path / "model.pt", [str(tiny_data / "val.bin")] * 2,
                                options=EvalOptions(device="cpu", progress=False))
    assert calls == [40, 40]  # 20 pairs per set, once each (the threshold reuses the first set's embeddings)
    assert evaluation.threshold["set"] == "val" and evaluation.model["architecture"] == "tiny"


def test_tar_without_enough_impostors_is_not_measurable(tiny_data, tmp_path, capsys):
    torch.manual_seed(0)
    torch.save(build_backbone(**TINY).state_dict(), tmp_path / "model.pt")
    assert cli.main(["eval", str(tmp_path / "model.pt"), "--bin", str(tiny_data / "val.bin"), "--device", "cpu",
                     "--no-progress", "--json"]) == 0
    printed = capsys.readouterr().out.splitlines()
    row = json.loads(printed[-1])[0]
    assert row["impostor_pairs"] == 10 and row["tar_at_far"] == {"0.001": None, "0.01": None}
    assert "n/m       n/m" in printed[1] and printed[2].startswith("n/m: not measurable")
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["rows"][0]["tar_at_far"]["0.01"] is None and results["threshold"]["measurable"] is False
    assert "| n/m | n/m |" in (tmp_path / "eval" / "report.md").read_text()


def test_only_readings_with_twenty_impostors_behind_their_threshold_are_kept():
    labels = np.r_[np.ones(50, bool), np.zeros(20_000, bool)]  # FAR 1e-3 allows 20 false accepts, 1e-4 two
    row = mark_unmeasurable({"set": "s", "tar_at_far": {1e-4: 0.5, 1e-3: 0.7}, "tar_at_far_nearest": {1e-4: 0.4,
                             1e-3: 0.6}}, labels)
    assert row["tar_at_far"] == {1e-4: None, 1e-3: 0.7} and row["tar_at_far_nearest"] == {1e-4: None, 1e-3: 0.6}
    assert row["impostor_pairs"] == 20_000 and row["not_measurable_fars"] == [1e-4]
    row.update(pairs=20_050, mode="N1D1F2")
    assert format_table([row]).splitlines()[1:3] == ["  interpolated     n/m 0.7000", "  nearest (IF)     n/m 0.6000"]
