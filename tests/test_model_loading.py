"""Models as users have them: every torch weights format round-trips from a model built here, the architecture is
read from the weights for every registered backbone, pickles that need code are refused, and `info` / `convert`."""

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from faceforge import cli
from faceforge.backbones import build_backbone
from faceforge.backbones.infer import infer_backbone
from faceforge.errors import ConfigError, DataError
from faceforge.fileio import load_weights
from faceforge.models import load_model
from faceforge.registry import BACKBONES

TINY = {"name": "tiny", "embedding_size": 16, "stem": 8, "widths": [8, 16, 16]}
# every backbone faceforge registers (tests may register their own, e.g. test_distributed's test_linear)
SHIPPED = [name for name in BACKBONES.names() if BACKBONES.get(name).__module__.startswith("faceforge.backbones.")]


def _state(model: torch.nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def mbf():
    """An arcface_torch-style MobileFaceNet at a non-default embedding size, with non-trivial BN statistics."""
    torch.manual_seed(0)
    model = build_backbone("mbf", embedding_size=64)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def test_every_shipped_backbone_is_covered():
    assert set(SHIPPED) == {"r18", "r34", "r50", "r100", "r200", "mbf", "mbf_large", "tiny"}


@pytest.mark.parametrize("name", SHIPPED)
def test_architecture_is_read_from_the_weights_of_every_backbone(name):
    kwargs = {"embedding_size": 96, **({"stem": 16, "widths": [24, 40]} if name == "tiny" else {})}
    with torch.device("meta"):
        state = build_backbone(name, **kwargs).state_dict()
    found = infer_backbone(state)
    assert found["name"] == name and found["embedding_size"] == 96
    if name == "tiny":
        assert found["stem"] == 16 and found["widths"] == [24, 40]


def test_an_unregistered_layout_is_named():
    with torch.device("meta"):
        state = build_backbone("r18").state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("layer4.1.")}  # an IResNet with 2-2-2-1 blocks
    with pytest.raises(ConfigError, match="2-2-2-1 blocks per stage match no registered backbone"):
        infer_backbone(state)


def _write(fmt: str, state: dict, folder):
    """`state` saved the way `fmt` names; returns the path a user would pass."""
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, folder / "w.safetensors")
        return folder / "w.safetensors"
    if fmt == "pt":
        torch.save(state, folder / "backbone.pt")
        return folder / "backbone.pt"
    if fmt == "pth nested under state_dict, DDP prefix":
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, folder / "m.pth")
        return folder / "m.pth"
    if fmt == "bin nested under model, torch.compile prefix":
        torch.save({"model": {f"_orig_mod.{k}": v for k, v in state.items()}}, folder / "pytorch_model.bin")
        return folder / "pytorch_model.bin"
    if fmt == "bin in torch's legacy format":
        torch.save(state, folder / "old.bin", _use_new_zipfile_serialization=False)
        return folder / "old.bin"
    if fmt == "pt nested under backbone":
        torch.save({"backbone": state, "head": {"weight": torch.zeros(3, 2)}}, folder / "ckpt.pt")
        return folder / "ckpt.pt"
    if fmt == "folder holding model.pt":
        (folder / "zoo").mkdir()
        torch.save(state, folder / "zoo" / "model.pt")
        return folder / "zoo"
    if fmt == "faceforge run folder":
        (folder / "checkpoints").mkdir()
        (folder / "config.yaml").write_text(json.dumps({"backbone": {"name": "mbf", "embedding_size": 64}}))
        checkpoints = folder / "checkpoints"
        save_file({f"backbone.{k}": v.contiguous() for k, v in state.items()}, checkpoints / "s.safetensors")
        (checkpoints / "latest.json").write_text(json.dumps({"weights": "s.safetensors", "state": "s.pt"}))
        return folder
    raise AssertionError(fmt)


FORMATS = ["safetensors", "pt", "pth nested under state_dict, DDP prefix",
           "bin nested under model, torch.compile prefix", "bin in torch's legacy format", "pt nested under backbone",
           "folder holding model.pt", "faceforge run folder"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_round_trips(fmt, mbf, tmp_path):
    loaded = load_model(_write(fmt, _state(mbf), tmp_path))
    assert loaded.architecture == "mbf" and loaded.embedding_size == 64
    got = loaded.module.state_dict()
    assert got.keys() == mbf.state_dict().keys()
    assert all(torch.equal(got[k], v) for k, v in mbf.state_dict().items())


def test_loaded_model_embeds_like_the_original(mbf, tmp_path):
    loaded = load_model(_write("pt", _state(mbf), tmp_path), backbone="mbf")
    x = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x).double(), mbf(x).double(), rtol=0, atol=1e-6)
    assert loaded.architecture_from == "--backbone mbf, as the weights say"


def test_convert_then_info(mbf, tmp_path, capsys):
    source = _write("pth nested under state_dict, DDP prefix", _state(mbf), tmp_path)
    assert cli.main(["convert", str(source), str(tmp_path / "out.safetensors")]) == 0
    assert all(k.startswith("backbone.") for k in load_weights(tmp_path / "out.safetensors"))
    capsys.readouterr()
    assert cli.main(["info", str(tmp_path / "out.safetensors")]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    info = json.loads(printed[-1])
    assert printed[0] == "mbf: embedding size 64, 1,829,248 parameters"  # 2,059,520 at 512 less 448 × (512 + 2)
    assert info["parameters"] == sum(p.numel() for p in mbf.parameters())
    assert info["input"]["normalisation"] == "(pixel - 127.5) / 127.5"
    assert info["architecture_from"] == "read from the weights" and info["format"] == "safetensors"
    assert cli.main(["convert", str(source), str(tmp_path / "out.pt")]) == 2
    assert "convert writes .safetensors" in capsys.readouterr().err


class _WritesAFile:
    """Unpickling this would run os.system; a loader that runs no code must never get there."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("suffix", [".pt", ".bin"])
def test_a_pickle_that_needs_code_is_refused_and_runs_nothing(suffix, tmp_path, capsys):
    marker = tmp_path / "ran"
    evil = tmp_path / f"evil{suffix}"
    torch.save({"fc.weight": torch.zeros(2, 2), "payload": _WritesAFile(marker)}, evil)
    with pytest.raises(DataError, match=f"refused {evil}: its pickle needs code"):
        load_weights(evil)
    assert cli.main(["info", str(evil)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refused" in err and not marker.exists()


def test_a_plain_pickle_is_not_unpickled(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "model.pt"
    path.write_bytes(pickle.dumps(_WritesAFile(marker)))
    with pytest.raises(DataError, match="neither safetensors nor a torch.save file"):
        load_weights(path)
    assert not marker.exists()


def test_folders_name_their_problem(mbf, tiny_data, tmp_path):
    torch.save(_state(mbf), tmp_path / "model.pt")
    (tmp_path / "heldout.bin").write_bytes((tiny_data / "val.bin").read_bytes())
    assert load_model(tmp_path).file == tmp_path / "model.pt"  # a verification .bin beside it is not a model
    torch.save(_state(mbf), tmp_path / "other.pth")
    with pytest.raises(ConfigError, match=r"holds 2 model files \(model.pt, other.pth\): name the file"):
        load_model(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no model file"):
        load_model(tmp_path / "empty")
    with pytest.raises(DataError, match="not a torch weights file .a verification set"):
        load_model(tmp_path / "heldout.bin")


def test_backbone_only_overrides(mbf, tmp_path):
    path = _write("pt", _state(mbf), tmp_path)
    with pytest.raises(ConfigError, match="--backbone r50: expected r50, the weights are mbf"):
        load_model(path, backbone="r50")
    unknown = tmp_path / "renamed.pt"
    torch.save({f"net.{k}": v for k, v in _state(mbf).items()}, unknown)
    with pytest.raises(ConfigError, match="cannot tell the architecture from its keys .*say it with --backbone"):
        load_model(unknown)
    with pytest.raises(ConfigError, match="missing keys"):
        load_model(unknown, backbone="mbf")
    with pytest.raises(ConfigError, match="--pixel-mean / --pixel-std apply to ONNX models"):
        load_model(path, pixel_mean=(0.4, 0.4, 0.4))


def test_init_from_an_arcface_torch_state_dict(tiny_config, tmp_path):
    from faceforge.engine.trainer import Trainer

    torch.manual_seed(1)
    source = build_backbone(**TINY)
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, tmp_path / "backbone.pth")
    trainer = Trainer(tiny_config(train={"max_steps": 1, "init_from": str(tmp_path / "backbone.pth")}))
    assert all(torch.equal(trainer.backbone.state_dict()[k], v) for k, v in source.state_dict().items())
    with pytest.raises(ConfigError, match="init_from .*expected tiny with embedding size 32, the weights have 16"):
        Trainer(tiny_config(backbone={"embedding_size": 32}, train={"init_from": str(tmp_path / "backbone.pth")}))
