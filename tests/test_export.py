"""ONNX export: dynamic batch axis, parity with PyTorch in onnxruntime, and the exported model behind embed/verify."""

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from faceforge import cli
from faceforge.backbones import build_backbone
from faceforge.errors import ConfigError, FaceforgeError
from faceforge.eval.embed import Embedder
from faceforge.export import onnx as onnx_export

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

BACKBONE = {"name": "tiny", "embedding_size": 16, "stem": 8, "widths": [8, 16, 16]}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny backbone's weights (beside its config.yaml and a stored threshold), exported through the CLI:
    (folder, model, .onnx path, printed lines)."""
    folder = tmp_path_factory.mktemp("export")
    (folder / "config.yaml").write_text(json.dumps({"backbone": BACKBONE}))
    torch.manual_seed(0)
    model = build_backbone(**BACKBONE)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so that eval-mode export matters
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    save_file({f"backbone.{k}": v.contiguous() for k, v in model.state_dict().items()}, folder / "w.safetensors")
    (folder / "w.threshold.json").write_text(json.dumps({"threshold": 0.3, "set": "toy", "target_far": 1e-3}))
    out = folder / "model.onnx"
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert cli.main(["export", str(folder / "w.safetensors"), "--onnx", str(out)]) == 0
    return folder, model.eval(), out, printed.getvalue().strip().splitlines()


def test_export_command_checks_parity_and_keeps_batch_dynamic(exported):
    folder, model, out, printed = exported
    result = json.loads(printed[-1])
    assert "(opset 18)" in printed[0] and "max abs difference" in printed[0] and result["opset"] == 18
    assert result["max_abs_diff"] <= result["bound"] <= 1e-3 and result["embedding_size"] == 16
    graph = onnx.load(str(out)).graph
    assert [i.name for i in graph.input] == ["data"] and [o.name for o in graph.output] == ["embedding"]
    assert not graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_value")  # symbolic batch
    assert json.loads((folder / "model.threshold.json").read_text())["threshold"] == 0.3
    images = np.random.default_rng(0).integers(0, 256, (5, 112, 112, 3), dtype=np.uint8)
    via_onnx = Embedder(out, batch_size=5)(images)
    via_torch = Embedder(folder / "w.safetensors", device="cpu", batch_size=5)(images)
    np.testing.assert_allclose(via_onnx, via_torch, rtol=1e-4, atol=1e-4)


def test_parity_check_catches_a_different_model(exported):
    _, _, out, _ = exported
    with pytest.raises(FaceforgeError, match="ONNX and PyTorch outputs differ"):
        onnx_export.check_parity(build_backbone(**BACKBONE), out)


def test_verify_with_onnx_uses_the_stored_threshold(exported, tmp_path, capsys):
    folder, _, out, _ = exported
    rng = np.random.default_rng(1)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)).save(tmp_path / name)
    assert cli.main(["verify", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--model", str(out)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["threshold"] == 0.3 and result["threshold_from"]["set"] == "toy"
    assert result["same"] == (result["cosine"] > 0.3)
    assert cli.main(["verify", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--model",
                     str(folder / "missing.onnx")]) == 2
    assert "model not found" in capsys.readouterr().err


def test_export_writes_the_opset_asked_for_or_refuses(exported, tmp_path, capsys):
    folder = exported[0]
    out = tmp_path / "m11.onnx"
    assert cli.main(["export", str(folder / "w.safetensors"), "--onnx", str(out), "--opset", "11"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["opset"] == 11
    assert onnx_export.written_opset(out) == 11
    assert [i.version for i in onnx.load(str(out)).opset_import if i.domain in ("", "ai.onnx")] == [11]
    with pytest.raises(ConfigError, match="--opset 5: faceforge exports opsets 9 and up"):
        onnx_export.export_onnx(exported[1], tmp_path / "m5.onnx", opset=5)
    assert not (tmp_path / "m5.onnx").exists()
