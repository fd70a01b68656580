"""The package API: each package's public names import, the registries list what they hold, `faceforge list`."""

import importlib
import json
import subprocess
import sys

import pytest

import faceforge

PUBLIC = {
    "faceforge": ["Config", "load_config", "config_from_dict"],
    "faceforge.data": ["RecordDataset", "ImageFolderDataset", "load_bin", "write_bin", "RecordReader", "RecordWriter",
                       "FACE_SIZE", "to_unit_range", "TrainLoader", "pack_folder"],
    "faceforge.eval": ["evaluate_pairs", "VerificationSet", "tar_at_far", "evaluate_ijb", "evaluate_model", "Embedder"],
    "faceforge.engine": ["Trainer", "build_parts", "open_training_set", "tokenize_dataset"],
    "faceforge.backbones": ["build_backbone", "list_backbones"],
    "faceforge.regularizers": ["Regularizer", "list_regularizers"],
    "faceforge.models": ["load_model"],
}


@pytest.mark.parametrize("package", sorted(PUBLIC))
def test_public_names_import(package):
    module = importlib.import_module(package)
    for name in PUBLIC[package]:
        assert getattr(module, name) is not None, f"{package}.{name}"
    for name in getattr(module, "__all__", []):
        getattr(module, name)  # every name a package declares resolves
    with pytest.raises(AttributeError, match="no_such_name"):
        module.no_such_name


def test_from_imports_and_dir():
    from faceforge.data import RecordDataset
    from faceforge.eval import evaluate_pairs

    assert RecordDataset.__module__ == "faceforge.data.record_dataset"
    assert evaluate_pairs.__module__ == "faceforge.eval.verification"
    assert "RecordDataset" in dir(faceforge.data)
    assert faceforge.load_config is faceforge.config.load_config


def test_lists_hold_the_builtins():
    from faceforge.backbones import list_backbones
    from faceforge.regularizers import list_regularizers

    assert {"r50", "r100", "mbf", "tiny"} <= set(list_backbones())
    assert list_regularizers() == sorted(list_regularizers()) and "topofr" in list_regularizers()


def test_registries_fill_whatever_was_imported_first():
    code = ("import faceforge.heads; from faceforge.registry import BACKBONES, REGULARIZERS; "
            "print(BACKBONES.names(), REGULARIZERS.names())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "'r50'" in out and "'topofr'" in out


def test_temporary_registration_is_undone():
    from faceforge.registry import BACKBONES

    with BACKBONES.temporary("scratch", lambda: None):
        assert "scratch" in BACKBONES.names()
    assert "scratch" not in BACKBONES


def test_list_command_prints_every_kind():
    done = subprocess.run([sys.executable, "-m", "faceforge", "list", "--json"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("backbones: ") and "r50" in lines[0].split()
    assert lines[1].startswith("heads: ") and "arcface" in lines[1].split()
    assert lines[2].startswith("head_wrappers: ") and "unpg" in lines[2].split()
    assert lines[3].startswith("regularizers: ") and "topofr" in lines[3].split()
    assert set(json.loads(lines[-1])) == {"backbones", "heads", "head_wrappers", "regularizers"}
