"""Config loading: YAML + dotted overrides, type checks, and errors that name the key."""

import pytest

from faceforge.config import config_from_dict, dump_config, load_config
from faceforge.engine.optim import lr_factor
from faceforge.errors import ConfigError


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("head: {name: cosface, m: 0.35}\ntrain: {batch_size: 64}\n")
    cfg = load_config(path, ["head.m=0.4", "optim.lr=1", "data.val_bins=[a.bin, b.bin]", "train.run_name=x"])
    assert cfg.head == {"name": "cosface", "m": 0.4}
    assert cfg.train.batch_size == 64
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.data.val_bins == ["a.bin", "b.bin"]
    assert load_config(None).backbone == {"name": "r50"}
    again = config_from_dict(__import__("yaml").safe_load(dump_config(cfg)))
    assert again == cfg


@pytest.mark.parametrize(
    "raw, overrides, message",
    [
        ({"train": {"bach_size": 3}}, [], r"unknown config key 'train.bach_size' \(did you mean 'batch_size'\?\)"),
        ({"trian": {}}, [], "unknown config key 'trian'"),
        ({"train": {"batch_size": "big"}}, [], "'train.batch_size' must be int"),
        ({"train": {"batch_size": 1.5}}, [], "'train.batch_size' must be int"),
        ({"optim": {"nesterov": 1}}, [], "'optim.nesterov' must be bool"),
        ({}, ["optim.name=adam"], "'optim.name' must be one of"),
        ({}, ["head"], "not of the form key=value"),
        ({"head": {"m": 0.5}}, [], "'head' must be a mapping with a string 'name'"),
        ({"train": 3}, [], "'train' must be a mapping"),
        ({"train": {"batch_size": 4}}, ["train.batch_size.x=1"], "'train.batch_size' is not a mapping"),
    ],
)
def test_bad_config_names_the_key(raw, overrides, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw, overrides)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml line"):
        load_config(bad)


def test_schedules():
    cfg = config_from_dict({"schedule": {"name": "cosine", "warmup": 0.1}}).schedule
    assert lr_factor(cfg, 0.0, 0.1) == 0.0
    assert lr_factor(cfg, 0.05, 0.1) == pytest.approx(0.5)
    assert lr_factor(cfg, 0.1, 0.1) == pytest.approx(1.0)
    assert lr_factor(cfg, 0.55, 0.1) == pytest.approx(0.5)
    assert lr_factor(cfg, 1.0, 0.1) == pytest.approx(0.0, abs=1e-12)
    poly = config_from_dict({"schedule": {"name": "poly", "power": 2.0, "min_lr": 0.01}}).schedule
    assert lr_factor(poly, 0.5, 0.1) == pytest.approx(0.1 + 0.9 * 0.25)
    assert lr_factor(poly, 1.0, 0.1) == pytest.approx(0.1)


@pytest.mark.parametrize(("override", "expected"), [
    ("train.channels_last=true", True), ("train.channels_last=false", False), ("train.channels_last=auto", "auto"),
    ("train.precision=bf16", "bf16"),
])
def test_literal_fields_take_their_choices_and_yaml_bools(override, expected):
    cfg = config_from_dict({}, [override])
    assert getattr(cfg.train, override.split(".")[1].split("=")[0]) == expected


@pytest.mark.parametrize("override", [
    "train.precision=fp8", "schedule.name=step", "data.on_corrupt=true", "optim.name=adam",
])
def test_literal_fields_refuse_other_values(override):
    with pytest.raises(ConfigError, match=rf"'{override.split('=')[0]}' must be one of"):
        config_from_dict({}, [override])


@pytest.mark.parametrize("override", ["train.channels_last=1", "train.channels_last=yes_please"])
def test_channels_last_is_a_bool_or_auto(override):
    with pytest.raises(ConfigError, match=r"'train.channels_last' has the wrong type"):
        config_from_dict({}, [override])
