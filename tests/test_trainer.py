"""Trainer: resume reproduces the uninterrupted run, non-finite losses abort cleanly, bad input is named."""

import json
from pathlib import Path

import pytest
import torch

from faceforge.engine.trainer import Trainer, TrainingAborted
from faceforge.errors import ConfigError, DataError
from faceforge.heads import HeadOutput


def _losses(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["lr"]) for r in lines if "event" not in r]


def test_resume_reproduces_uninterrupted_run(tiny_config, tmp_path):
    full = Trainer(tiny_config(train={"run_name": "full", "checkpoint_every": 3, "max_steps": 8})).fit()
    assert full["steps"] == 8 and full["eval"]["val"]["num_pairs"] == 20

    interrupted = Trainer(tiny_config(train={"run_name": "cut", "checkpoint_every": 3, "max_steps": 8}))
    interrupted.fit(until_step=3)
    run_dir = interrupted.log.dir
    # Lines logged after the last checkpoint (as after a crash) are dropped on resume.
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 4, "loss": 123.0, "lr": 0.0}) + "\n")
    resumed = Trainer.resume(run_dir).fit()
    assert resumed["steps"] == 8
    assert _losses(run_dir) == _losses(tmp_path / "runs" / "full")  # bit-identical on the CPU
    assert resumed["eval"]["val"]["accuracy"] == full["eval"]["val"]["accuracy"]
    for name in ("report.md", "curves.png", "roc.png", "config.yaml", "summary.json"):
        assert (run_dir / name).stat().st_size > 0


def test_training_learns_and_init_from(tiny_config):
    trainer = Trainer(tiny_config(train={"max_steps": 30, "run_name": "learn"}, optim={"lr": 0.1}))
    summary = trainer.fit()
    losses = [loss for _, loss, _ in _losses(Path(summary["run_dir"]))]
    assert sum(losses[-5:]) < sum(losses[:5])
    tuned = Trainer(tiny_config(train={"max_steps": 1, "run_name": "tuned", "init_from": summary["run_dir"]}))
    for (name, a), b in zip(trainer.backbone.state_dict().items(), tuned.backbone.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    torch.testing.assert_close(trainer.head.weight, tuned.head.weight)


def test_non_finite_loss_is_skipped_then_aborts(tiny_config, monkeypatch):
    trainer = Trainer(tiny_config(train={"max_bad_steps": 3, "run_name": "nan"}))
    before = {k: v.detach().clone() for k, v in trainer.backbone.named_parameters()}

    def nan_head(embeddings, labels):
        loss = embeddings.sum() * float("nan")
        return HeadOutput(loss=loss, per_sample_loss=loss.expand(len(labels)))

    monkeypatch.setattr(trainer.head, "forward", nan_head)
    with pytest.raises(TrainingAborted, match="not finite for 3 steps in a row"):
        trainer.fit()
    assert trainer.state.skipped_steps == 3
    for k, v in trainer.backbone.named_parameters():
        torch.testing.assert_close(v.detach(), before[k])  # skipped steps never touched the weights


@pytest.mark.parametrize("sections, error, message", [
    ({"head": {"name": "arcface", "num_classes": 3}}, ConfigError, "head.num_classes=3 is smaller than the 8 classes"),
    ({"backbone": {"name": "tiny", "width": 3}}, ConfigError, "backbone 'tiny'.*width"),
    ({"data": {"root": "/nonexistent"}}, ConfigError, "data.root='/nonexistent' is not a folder"),
])
def test_bad_config_is_named(tiny_config, sections, error, message):
    with pytest.raises(error, match=message):
        Trainer(tiny_config(**sections))


def test_resuming_a_folder_without_checkpoints_is_named(tmp_path):
    with pytest.raises(ConfigError, match="no checkpoint in"):
        Trainer.resume(tmp_path)


def test_an_empty_data_folder_is_a_data_error(tiny_config, tmp_path):
    missing = tmp_path / "empty"
    missing.mkdir()
    with pytest.raises(DataError):
        Trainer(tiny_config(data={"root": str(missing)}))


def test_progress_follows_steps_or_the_time_budget(tiny_config):
    trainer = Trainer(tiny_config(train={"max_steps": 8, "run_name": "p"}))
    trainer.state.step = 2
    assert trainer.progress() == 0.25
    trainer.cfg.train.time_budget_s = 10.0
    trainer.state.elapsed = 5.0
    assert trainer.progress() == 0.5  # both set: whichever is further along
    trainer.state.step = 6
    assert trainer.progress() == 0.75
    trainer.cfg.train.max_steps = 0
    assert trainer.progress() == 0.5  # a budget alone: time only


def test_a_time_budget_ends_the_run_at_the_first_step_past_it(tiny_config, monkeypatch):
    """Each step takes one (fake) second: a 3.5 s budget is spent after 4 steps, long before the epochs end."""
    from faceforge.engine import trainer as trainer_module

    trainer = Trainer(tiny_config(train={"max_steps": 0, "epochs": 50, "time_budget_s": 3.5, "run_name": "budget"}))
    seen = []
    real_advance = trainer._advance

    def one_second_steps(images, skipped, seconds):
        real_advance(images, skipped, 1.0)
        seen.append(trainer.state.elapsed)

    monkeypatch.setattr(trainer, "_advance", one_second_steps)
    summary = trainer.fit()
    assert seen == [1.0, 2.0, 3.0, 4.0] and summary["steps"] == 4
    lrs = [lr for _, _, lr in _losses(Path(summary["run_dir"]))]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] == pytest.approx(0.05 * (1 - 0 / 3.5))


def _corrupt_copy(tiny_data, tmp_path, key=3):
    """A copy of tiny_data whose record `key` has garbage in place of its JPEG body."""
    import shutil

    root = tmp_path / "corrupt"
    shutil.copytree(tiny_data, root)
    offset = {int(k): int(v) for k, v in (line.split() for line in (root / "train.idx").read_text().splitlines())}[key]
    with (root / "train.rec").open("r+b") as f:
        f.seek(offset + 8 + 24)  # past the record frame and the IRHeader
        f.write(b"\x00" * 64)
    return root


def test_corrupt_record_raises_or_is_skipped(tiny_config, tiny_data, tmp_path):
    root = _corrupt_copy(tiny_data, tmp_path)
    with pytest.raises(DataError, match=r"train.rec.*key 3"):
        Trainer(tiny_config(data={"root": str(root), "on_corrupt": "raise"}, train={"max_steps": 12})).fit()
    summary = Trainer(
        tiny_config(data={"root": str(root), "on_corrupt": "skip"}, train={"max_steps": 12, "run_name": "skip"})
    ).fit()
    assert summary["skipped_records"] >= 1
    events = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "data" for e in events)


def test_worker_errors_keep_their_one_line_message(tiny_config, tiny_data, tmp_path):
    root = _corrupt_copy(tiny_data, tmp_path)
    cfg = tiny_config(data={"root": str(root), "num_workers": 2}, train={"max_steps": 12})
    with pytest.raises(DataError) as info:
        Trainer(cfg).fit()
    assert "key 3" in str(info.value) and "\n" not in str(info.value)


def test_label_beyond_num_classes_is_named(tiny_config, tiny_data, tmp_path):
    import shutil

    root = tmp_path / "lying_property"
    shutil.copytree(tiny_data, root)
    (root / "property").write_text("4,112,112")  # the data holds 8 identities
    with pytest.raises(DataError, match=r"epoch 0 batch 0: label \d >= head.num_classes=4"):
        Trainer(tiny_config(data={"root": str(root)})).fit()
