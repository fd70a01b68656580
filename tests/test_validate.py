"""Component tables are checked before any work: one rule (faceforge.engine.validate.check_components) for the
shipped recipes, the trainer and the CLI, giving one line that names the key."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from faceforge.config import load_config
from faceforge.engine.validate import check_components
from faceforge.errors import ConfigError
from faceforge.tokenizer.codebook import Codebook, save_codes

REPO = Path(__file__).resolve().parents[1]
ARCFACE = REPO / "configs/synthface_arcface.yaml"


@pytest.mark.parametrize("path", sorted((REPO / "src/faceforge/configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path, tmp_path):
    cfg = load_config(path)
    if cfg.head["name"] == "gif":  # the recipe names a codes file made by `faceforge tokenize`: stand one in
        dim = cfg.backbone.get("embedding_size", 512)
        codes = torch.stack([torch.arange(20) // 4, torch.arange(20) % 4], dim=1)
        save_codes(tmp_path / "codes.safetensors", Codebook(codes, torch.randn(20, dim), v=5))
        cfg = load_config(path, [f"head.codes={tmp_path / 'codes.safetensors'}"])
    check_components(cfg)


@pytest.mark.parametrize(("overrides", "message"), [
    (["head.m=4.0"], "head.m (ArcFace's angular margin) must be in [0, pi), got 4.0"),
    (["head.s=-1"], "head.s (the logit scale) must be positive, got -1"),
    (["head.mm=0.5"], "head 'arcface': got an unexpected keyword argument 'mm'"),
    (["backbone.name=r7"], "unknown backbone 'r7'"),
    (["head.unpg.k=x"], "head.unpg.k must be a number"),
    (["head={name: sphereface2}", "regularizers=[{name: topofr, sde: true}]"], "regularizer topofr: sde=true needs"),
], ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_bad_tables_give_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as caught:
        check_components(load_config(ARCFACE, overrides))
    text = str(caught.value)
    assert text.startswith(message) and "\n" not in text


def test_gif_codes_file_is_read_before_work(tmp_path):
    missing = tmp_path / "none.safetensors"
    with pytest.raises(ConfigError, match="none.safetensors not found"):
        check_components(load_config(REPO / "configs/synthface_gif.yaml", [f"head.codes={missing}"]))


def test_nothing_is_allocated():
    cfg = load_config(REPO / "configs/ms1mv3_r50_arcface.yaml", ["head.num_classes=10000000"])
    check_components(cfg)  # 10M x 512 fp32 centres would be 20 GB: on the meta device they are nothing


def test_train_with_a_bad_value_prints_one_line_and_generates_nothing(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "faceforge", "train", str(ARCFACE), "head.m=4.0",
         f"synthface.cache_dir={tmp_path / 'cache'}", f"train.out_dir={tmp_path / 'runs'}"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == "faceforge: error: head.m (ArcFace's angular margin) must be in [0, pi), got 4.0"
    assert list(tmp_path.iterdir()) == []  # no SynthFace cache, no run folder


def test_bench_checks_the_tables_before_building():
    from faceforge.engine.bench import bench_train

    cfg = load_config(ARCFACE, ["head.m=4.0", "train.device=cpu"])
    with pytest.raises(ConfigError, match=r"^head\.m \(ArcFace's angular margin\)"):
        bench_train(cfg, warmup=0, steps=1)
