"""InsightFace-style ONNX recognition models (any tensor names; fixed, symbolic or unnamed batch) in embed / verify /
info, their problems as one line, and the optional ONNX packages imported only when needed."""

import json
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from faceforge import cli
from faceforge.backbones import build_backbone
from faceforge.errors import ConfigError, DataError
from faceforge.eval.embed import Embedder
from faceforge.models import load_model

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

TINY = {"name": "tiny", "embedding_size": 16, "stem": 8, "widths": [8, 16, 16]}


def _export(model: torch.nn.Module, path, batch: str) -> None:
    """`model` as ONNX named like InsightFace's packs (input `input.1`, output `683`), with a batch axis fixed at 1,
    symbolic ('batch') or unnamed (no value, no name: onnxruntime reports None)."""
    axes = {} if batch == "fixed 1" else {"input.1": {0: "batch"}, "out": {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.zeros(1, 3, 112, 112),), str(path), input_names=["input.1"],
                          output_names=["out"], dynamic_axes=axes, dynamo=False)
    graph = onnx.load(str(path))
    for node in graph.graph.node:  # the TorchScript exporter refuses numeric names: rename its output afterwards
        node.output[:] = ["683" if name == "out" else name for name in node.output]
    graph.graph.output[0].name = "683"
    if batch == "None":
        for value in (*graph.graph.input, *graph.graph.output):
            value.type.tensor_type.shape.dim[0].Clear()
    onnx.checker.check_model(graph)
    onnx.save(graph, str(path))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(torch model, its .pt file, {batch kind: .onnx file})."""
    folder = tmp_path_factory.mktemp("onnx_models")
    torch.manual_seed(0)
    model = build_backbone(**TINY).eval()
    torch.save(model.state_dict(), folder / "model.pt")
    files = {}
    for batch in ("fixed 1", "symbolic", "None"):
        files[batch] = folder / f"{batch.replace(' ', '_')}.onnx"
        _export(model, files[batch], batch)
    return model, folder / "model.pt", files


@pytest.mark.parametrize("batch", ["fixed 1", "symbolic", "None"])
def test_onnx_embeds_like_torch_whatever_its_batch_axis(models, batch, tmp_path):
    _, weights, files = models
    loaded = load_model(files[batch])
    assert loaded.embedding_size == 16 and loaded.input["shape"][0] == (1 if batch == "fixed 1" else "B")
    assert "'input.1'" in loaded.architecture_from and "'683'" in loaded.architecture_from
    images = np.random.default_rng(0).integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    via_onnx = Embedder(files[batch], batch_size=3)(images)
    via_torch = Embedder(weights, device="cpu", batch_size=3)(images)
    np.testing.assert_allclose(via_onnx, via_torch, rtol=1e-4, atol=1e-4)  # float32 graph vs eager: ~1e-6 apart


def test_embed_and_info_on_a_fixed_batch_1_model(models, tmp_path, capsys):
    _, _, files = models
    rng = np.random.default_rng(1)
    (tmp_path / "faces").mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)).save(tmp_path / "faces" / f"{i}.png")
    out = tmp_path / "feats.npy"
    assert cli.main(["embed", str(tmp_path / "faces"), "--model", str(files["fixed 1"]), "--out", str(out),
                     "--no-progress"]) == 0
    assert np.load(out).shape == (3, 16)
    capsys.readouterr()
    assert cli.main(["info", str(files["fixed 1"]), "--pixel-mean", "0.4", "0.5", "0.6"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[2] == "input [1, 3, 112, 112] float32 RGB, (pixel/255 - [0.4, 0.5, 0.6]) / [0.5, 0.5, 0.5]"
    info = json.loads(printed[-1])
    assert info["architecture"] == "onnx" and info["parameters"] > 0


def test_onnx_problems_are_one_line(models, tmp_path, capsys):
    _, weights, files = models
    (tmp_path / "garbage.onnx").write_bytes(b"not a protobuf")
    with pytest.raises(DataError, match="cannot load ONNX model .*garbage.onnx"):
        load_model(tmp_path / "garbage.onnx")
    nhwc = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(112 * 112 * 3, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(nhwc, (torch.zeros(1, 112, 112, 3),), str(tmp_path / "nhwc.onnx"), dynamo=False)
    with pytest.raises(DataError, match=r"expected an image input \[B, 3, H, W\], got \[1, 112, 112, 3\] \(NHWC"):
        load_model(tmp_path / "nhwc.onnx")
    with pytest.raises(ConfigError, match="--backbone does not apply to the ONNX model"):
        load_model(files["symbolic"], backbone="r50")
    assert cli.main(["convert", str(files["symbolic"]), str(tmp_path / "x.safetensors")]) == 2
    assert cli.main(["export", str(files["symbolic"]), "--onnx", str(tmp_path / "y.onnx")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "is an ONNX graph; convert reads torch weights" in err[0] and "is already ONNX" in err[1]


@pytest.mark.parametrize("package", ["onnxruntime", "onnx"])
def test_without_the_onnx_extra_each_onnx_use_says_how_to_install_it(models, package, monkeypatch, tmp_path):
    model, weights, files = models
    monkeypatch.setitem(sys.modules, package, None)  # `import package` now raises ImportError
    hint = rf"needs {package}, which is not installed: pip install 'faceforge\[onnx\]'"
    if package == "onnxruntime":
        with pytest.raises(ConfigError, match=hint):
            Embedder(files["symbolic"])
    else:
        with pytest.raises(ConfigError, match=hint):
            cli.cmd_info(cli.build_parser().parse_args(["info", str(files["symbolic"])]))
    with pytest.raises(ConfigError, match=hint):
        cli.cmd_export(cli.build_parser().parse_args(["export", str(weights), "--onnx", str(tmp_path / "m.onnx")]))
    assert not (tmp_path / "m.onnx").exists()
    assert Embedder(weights, device="cpu").file == weights  # torch weights need none of it
