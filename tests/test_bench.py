"""`faceforge bench train` takes what `faceforge train` takes: a config, dotted overrides and shortcut flags reach
the parts it times, and a bad key is a one-line error before any work."""

import argparse
import json

import pytest
import torch
import yaml

from faceforge.cli import main
from faceforge.cli_bench import _head_params
from faceforge.errors import ConfigError
from faceforge.tokenizer.codebook import Codebook, save_codes

QUICK = ["bench", "train", "--device", "cpu", "--warmup", "1", "--steps", "1", "--batch", "8"]


def _row(capsys, *args: str) -> dict:
    assert main([*QUICK, *args]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _config_file(tmp_path, cfg) -> str:
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return str(path)


def test_config_overrides_and_sample_rate_reach_the_parts(tiny_config, tmp_path, capsys):
    cfg = tiny_config(head={"name": "arcface", "s": 16.0, "m": 0.2, "unpg": {"k": 1.5}},
                      regularizers=[{"name": "topofr", "alpha": 0.1, "xi": 0.2}])
    row = _row(capsys, "--config", _config_file(tmp_path, cfg), "head.m=0.3", "optim.name=adamw",
               "--sample-rate", "0.5", "--num-classes", "40")
    assert row["head"] == "arcface" and row["head_params"]["m"] == 0.3 and row["head_params"]["unpg"] == {"k": 1.5}
    assert row["sample_rate"] == 0.5  # read from the built head (UNPG's base), not echoed from the flag
    assert row["num_classes"] == 40 and row["num_classes_from"] == "head.num_classes"
    assert [r["name"] for r in row["regularizers"]] == ["topofr"] and row["optimizer"] == "adamw"
    assert row["backbone"] == "tiny" and row["batch"] == 8 and row["steps"] == 1 and row["img_s"] > 0


def test_gif_codes_decide_the_head_size(tiny_config, tmp_path, capsys):
    codes = torch.tensor([[a, b] for a in range(4) for b in range(3)])  # 12 distinct codes over v = 4
    save_codes(tmp_path / "codes.safetensors", Codebook(codes, torch.randn(12, 16), v=4))
    cfg = tiny_config(head={"name": "gif", "codes": str(tmp_path / "codes.safetensors"), "head_dim": 8})
    row = _row(capsys, "--config", _config_file(tmp_path, cfg))
    assert row["head"] == "gif" and row["num_classes"] == 12 and row["num_classes_from"] == "head.codes"
    assert row["sample_rate"] is None


def test_flags_alone_build_on_the_defaults(capsys):
    row = _row(capsys, "--backbone", "tiny", "--embedding-size", "16", "--num-classes", "8", "head.m=0.4")
    assert row["head"] == "arcface" and row["head_params"]["m"] == 0.4 and row["precision"] == "auto"


def test_bad_key_is_one_line_before_any_work(tiny_config, tmp_path, capsys, monkeypatch):
    import faceforge.engine.bench as bench

    def no_work(*args, **kwargs):
        raise AssertionError("stepped despite a bad key")

    monkeypatch.setattr(bench, "train_step", no_work)
    path = _config_file(tmp_path, tiny_config())
    for bad, message in [("train.bach_size=4", "unknown config key 'train.bach_size'"),
                         ("head.unpg=3", "head.unpg must be a mapping")]:
        assert main([*QUICK, "--config", path, bad]) == 2, bad
        out = capsys.readouterr()
        assert out.out == "" and len(out.err.strip().splitlines()) == 1 and message in out.err, out.err


def test_bench_head_step_times_the_trainers_sampled_update(capsys, monkeypatch):
    """One JSON row, and every step (warm-up included) went through the trainer's sampled-row update."""
    from faceforge.engine import step

    calls = []
    real = step.update_sampled_rows
    monkeypatch.setattr(step, "update_sampled_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    args = ["bench", "head-step", "--head", "arcface", "--num-classes", "50", "--sample-rate", "0.2", "--batch", "4",
            "--embedding-size", "8", "--steps", "2", "--warmup", "1", "--optimizer", "adamw"]
    assert main(args) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["bench"] == "head-step" and row["num_classes"] == 50 and row["sample_rate"] == 0.2
    assert row["ms_per_step"] > 0 and row["peak_memory_gb"] > 0 and row["peak_memory_kind"] == "process max RSS"
    assert len(calls) == 3


def _head_row(capsys, *args: str) -> list[dict]:
    assert main(["bench", *args]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]


def test_bench_head_step_memory_puts_the_tracked_peak_next_to_the_plan(capsys):
    """--memory: one more step under the live-tensor tracker; the plan of the same step is within 10% of it,
    for a sampled UNPG head and for GIF with code vectors trained."""
    quick = ["--num-classes", "3000", "--batch", "16", "--embedding-size", "24", "--steps", "1", "--warmup", "1",
             "--memory"]
    for flags in (["--head", "arcface", "--unpg", "1.5", "--sample-rate", "0.1"],
                  ["--head", "gif", "--gif-joint", "--v", "8", "--optimizer", "adamw"]):
        row = _head_row(capsys, "head-step", *quick, *flags)[0]
        assert row["tracked_peak_gib"] > 0 and row["planned_gib"] > 0, row
        assert 0.9 <= row["planned_over_tracked"] <= 1.1, row
    assert row["head_params"] == {"joint": True, "v": 8} and row["sample_rate"] is None


def test_bench_head_names_every_term_per_num_classes_and_world_size(capsys):
    rows = _head_row(capsys, "head", "--num-classes", "5000", "20000", "--world-size", "1", "2", "--batch", "16",
                     "--embedding-size", "24", "--sample-rate", "0.1", "--optimizer", "adamw")
    assert [(r["num_classes"], r["world_size"]) for r in rows] == [(5000, 1), (5000, 2), (20000, 1), (20000, 2)]
    for r in rows:
        assert r["classes_per_rank"] == -(-r["num_classes"] // r["world_size"])
        assert r["global_batch"] == 16 * r["world_size"] and r["logit_bytes_per_element"] > 0
        assert r["class_rows_fp32_copies"] >= 3  # centres and AdamW's two moments, at least
        assert {"logits_gib", "sampled_rows_gib", "embeddings_gib", "held_gib"} <= set(r)
    gif = _head_row(capsys, "head", "--head", "gif", "--num-classes", "5000", "--batch", "16",
                    "--embedding-size", "24")[0]
    assert gif["code_length"] == 4 and gif["code_vectors_fp32_copies"] == 1.0
    assert "codes_gib" in gif and "logits_gib" not in gif


def test_gif_codes_only_holds_no_code_vectors(capsys):
    """--gif-codes-only: GIF without its [N, D] code vectors (no pull term), what must fit at any N."""
    row = _head_row(capsys, "head", "--head", "gif", "--gif-codes-only", "--num-classes", "5000", "--batch", "16",
                    "--embedding-size", "24")[0]
    assert row["code_vectors_fp32_copies"] == 0.0 and "codes_gib" in row
    with pytest.raises(ConfigError, match="--gif-codes-only"):
        _head_params(argparse.Namespace(head="gif", unpg=None, v=None, gif_joint=True, gif_codes_only=True))
