"""Checkpoints: retention, checksums verified on resume with fallback to the newest intact one, --step, a full
disk, exact resume (RNG draws of sampling and TopoFR, SGD and AdamW state), and a stop on SIGTERM / SIGINT."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from faceforge.config import dump_config
from faceforge.engine import checkpoint as ckpt
from faceforge.engine import checkpoint_files as files
from faceforge.engine.stop import TrainingInterrupted
from faceforge.engine.trainer import Trainer
from faceforge.errors import ConfigError, DataError
from faceforge.fileio import LATEST


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in lines if "event" not in r]


def _ckpt_files(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def _index(run_dir: Path) -> dict:
    return json.loads((run_dir / "checkpoints" / LATEST).read_text())


def _cut_run(tiny_config, name: str = "cut", until: int = 10, **train) -> Path:
    """A run of 10 steps with a checkpoint every 2, stopped at `until`."""
    trainer = Trainer(tiny_config(train={"run_name": name, "max_steps": 10, "checkpoint_every": 2, **train}))
    trainer.fit(until_step=until)
    return trainer.log.dir


def test_keeps_the_newest_k_with_their_checksums(tiny_config):
    run = _cut_run(tiny_config, keep_checkpoints=3)
    steps = [6, 8, 10]
    assert _ckpt_files(run) == sorted([LATEST] + [files.weights_name(s) for s in steps] +
                                      [files.state_name(s) for s in steps])
    index = _index(run)
    assert (index["step"], index["weights"]) == (10, files.weights_name(10))
    assert [e["step"] for e in index["checkpoints"]] == steps
    for entry in index["checkpoints"]:
        for name, record in entry["files"].items():
            path = run / "checkpoints" / name
            assert record == {"bytes": path.stat().st_size, "sha256": files.sha256_file(path)}


def test_keep_zero_keeps_every_checkpoint(tiny_config):
    run = _cut_run(tiny_config, "all", keep_checkpoints=0)
    assert [e["step"] for e in _index(run)["checkpoints"]] == [2, 4, 6, 8, 10]
    assert len(_ckpt_files(run)) == 11


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated": (files.weights_name, _truncate, "is truncated"),
    "deleted": (files.state_name, Path.unlink, "is missing"),
    "corrupt": (files.weights_name, _flip_a_byte, "is corrupt"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_newest_falls_back_to_the_newest_intact_one(tiny_config, capsys, damage):
    name_of, harm, said = DAMAGE[damage]
    run = _cut_run(tiny_config, until=8)
    harm(run / "checkpoints" / name_of(8))
    capsys.readouterr()
    resumed = Trainer.resume(run)
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and name_of(8) in warning[0] and said in warning[0], warning
    assert warning[0].endswith("(step 8); resuming from step 6")
    assert resumed.state.step == 6 and _index(run)["step"] == 6
    assert files.weights_name(8) not in _ckpt_files(run)  # dropped: one line of checkpoints
    assert max(step for step, _ in _losses(run)) == 6
    assert resumed.fit()["steps"] == 10


def test_no_intact_checkpoint_is_one_error_listing_what_was_tried(tiny_config):
    run = _cut_run(tiny_config, until=6, keep_checkpoints=2)
    _truncate(run / "checkpoints" / files.weights_name(6))
    (run / "checkpoints" / files.state_name(4)).unlink()
    with pytest.raises(DataError) as err:
        Trainer.resume(run)
    message = str(err.value)
    assert "\n" not in message and "no intact checkpoint" in message
    assert f"{files.weights_name(6)} is truncated" in message and f"{files.state_name(4)} is missing" in message
    assert _index(run)["step"] == 6  # nothing dropped when nothing could be resumed


def test_run_folder_from_before_checksums_still_resumes(tiny_config):
    run = _cut_run(tiny_config, until=4)
    (run / "checkpoints" / LATEST).write_text(json.dumps(
        {"step": 4, "weights": files.weights_name(4), "state": files.state_name(4)}))
    old_state = run / "checkpoints" / files.state_name(4)
    saved = ckpt.load_trainer_state(old_state)
    torch.save({**saved, "rng": saved["rng"]["cpu"][0]}, old_state)  # then: the CPU state alone
    trainer = Trainer.resume(run)
    assert trainer.state.step == 4
    assert trainer.fit(until_step=6)["step"] == 6
    assert [e["step"] for e in _index(run)["checkpoints"]] == [4, 6]


@pytest.mark.parametrize("name_of, said", [(files.weights_name, "cannot read weights"),
                                           (files.state_name, "cannot read trainer state")])
def test_unreadable_file_of_an_unverified_checkpoint_is_one_data_error(tiny_config, name_of, said):
    """Without checksums (a checkpoint from before them) nothing stops a truncated file before it is read."""
    run = _cut_run(tiny_config, until=2)
    (run / "checkpoints" / LATEST).write_text(json.dumps(
        {"step": 2, "weights": files.weights_name(2), "state": files.state_name(2)}))
    _truncate(run / "checkpoints" / name_of(2))
    with pytest.raises(DataError) as err:
        Trainer.resume(run)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{said} {run / 'checkpoints' / name_of(2)}: "), message


def test_resume_from_a_chosen_step_equals_the_uninterrupted_run(tiny_config):
    full = _cut_run(tiny_config, "full", keep_checkpoints=0)
    run = _cut_run(tiny_config, keep_checkpoints=0)
    with pytest.raises(ConfigError, match=r"no checkpoint of step 5 .*kept: steps 2, 4, 6, 8, 10"):
        Trainer.resume(run, step=5)
    resumed = Trainer.resume(run, step=4)
    assert resumed.state.step == 4 and max(step for step, _ in _losses(run)) == 4
    assert [e["step"] for e in _index(run)["checkpoints"]] == [2, 4]
    resumed.fit()
    assert _losses(run) == _losses(full)


def _full_disk_writing(monkeypatch, name: str) -> None:
    """The write of the checkpoint file `name` fills the disk half-way through."""
    real = files.atomic_write

    def atomic_write(path, write):
        if Path(path).name != name:
            return real(path, write)

        def half(tmp):
            write(tmp)
            _truncate(Path(tmp))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        return real(path, half)

    monkeypatch.setattr(files, "atomic_write", atomic_write)


@pytest.mark.parametrize("name_of", [files.weights_name, files.state_name])
def test_full_disk_keeps_the_previous_checkpoints_intact(tiny_config, monkeypatch, name_of):
    trainer = Trainer(tiny_config(train={"run_name": "full-disk", "max_steps": 10, "checkpoint_every": 2}))
    trainer.fit(until_step=4)
    run = trainer.log.dir
    before = {name: (run / "checkpoints" / name).read_bytes() for name in _ckpt_files(run)}
    _full_disk_writing(monkeypatch, name_of(6))
    with pytest.raises(files.CheckpointNotWritten) as err:
        trainer.fit(until_step=8)
    message = str(err.value)
    assert "\n" not in message and "step 6" in message and "no space left on device" in message
    assert "the previous checkpoints and latest.json are intact (newest: step 4)" in message
    assert {name: (run / "checkpoints" / name).read_bytes() for name in _ckpt_files(run)} == before
    monkeypatch.undo()
    assert Trainer.resume(run).state.step == 4


def test_full_disk_while_recording_latest_json(tiny_config, monkeypatch):
    trainer = Trainer(tiny_config(train={"run_name": "full-index", "max_steps": 10, "checkpoint_every": 2}))
    trainer.fit(until_step=2)
    run = trainer.log.dir
    before = _ckpt_files(run), _index(run)
    real = files.atomic_write

    def atomic_write(path, write):
        if Path(path).name == LATEST:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, write)

    monkeypatch.setattr(files, "atomic_write", atomic_write)
    with pytest.raises(files.CheckpointNotWritten, match="intact"):
        trainer.fit(until_step=4)
    assert (_ckpt_files(run), _index(run)) == before  # the new step's files, written before, are removed


def test_negative_keep_is_a_config_error(tiny_config):
    with pytest.raises(ConfigError, match="train.keep_checkpoints must be >= 0"):
        Trainer(tiny_config(train={"max_steps": 1, "keep_checkpoints": -1})).fit()


@pytest.mark.parametrize("optim", ["sgd", "adamw"])
def test_resume_replays_sampling_and_topofr_draws_and_optimizer_state(tiny_config, optim):
    """PartialFC sampling, PTSA and SDE's random sign draw from the global generators the checkpoint carries: the
    resumed run must draw what the uninterrupted one drew, and end with the same weights and optimizer state."""
    sections = {"head": {"sample_rate": 0.5},
                "regularizers": [{"name": "topofr", "alpha": 0.1, "xi": 0.5, "sde": True, "sde_sign": "random"}],
                "optim": {"name": optim, "lr": 0.01 if optim == "adamw" else 0.05}}

    def run(name):
        return Trainer(tiny_config(train={"run_name": name, "max_steps": 6, "checkpoint_every": 3}, **sections))

    full = run("full")
    full.fit()
    cut = run("cut")
    cut.fit(until_step=3)
    torch.manual_seed(1234)  # whatever the process drew since, the checkpoint's RNG state is what counts
    resumed = Trainer.resume(cut.log.dir)
    resumed.fit()
    assert _losses(resumed.log.dir) == _losses(full.log.dir)
    for key, value in ckpt.model_state(full.backbone, full.head).items():
        assert torch.equal(ckpt.model_state(resumed.backbone, resumed.head)[key], value), key
    want = ckpt.optimizer_state(full.optimizer, full.backbone, full.head, full.par)
    got = ckpt.optimizer_state(resumed.optimizer, resumed.backbone, resumed.head, resumed.par)
    assert want.keys() == got.keys() and want
    for name in want:
        assert want[name].keys() == got[name].keys()
        for key in want[name]:
            assert torch.equal(got[name][key], want[name][key]), (name, key)


def test_optimizer_state_is_loaded_through_load_state_dict(tiny_config, monkeypatch):
    run = _cut_run(tiny_config, until=2, keep_checkpoints=1)
    calls = []
    real = torch.optim.SGD.load_state_dict
    monkeypatch.setattr(torch.optim.SGD, "load_state_dict", lambda self, sd: calls.append(sd) or real(self, sd))
    trainer = Trainer.resume(run)
    assert len(calls) == 1 and trainer.optimizer.state_dict()["state"]
    assert trainer.optimizer.param_groups[0]["lr"] == trainer.cfg.optim.lr  # groups stay the config's


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_adamw_resumes_on_cuda(tiny_config):
    cfg = dict(optim={"name": "adamw", "lr": 0.01}, train={"run_name": "cuda", "max_steps": 4, "device": "cuda",
                                                          "precision": "fp32", "checkpoint_every": 2})
    full = Trainer(tiny_config(**cfg))
    full.fit()
    cut = Trainer(tiny_config(**{**cfg, "train": {**cfg["train"], "run_name": "cuda-cut"}}))
    cut.fit(until_step=2)
    resumed = Trainer.resume(cut.log.dir)
    assert resumed.optimizer.defaults["fused"]
    for state in resumed.optimizer.state.values():
        assert state["step"].device.type == "cuda" and state["exp_avg"].device.type == "cuda"
    rng = torch.cuda.get_rng_state(resumed.device)
    resumed.fit()
    assert torch.equal(rng, ckpt.load_trainer_state(cut.log.dir / "checkpoints" / files.state_name(2))
                       ["rng"]["cuda"][0])
    # cudnn.benchmark may pick other convolution kernels in each run: equal up to fp32 summation-order error
    for key, value in ckpt.model_state(full.backbone, full.head).items():
        torch.testing.assert_close(ckpt.model_state(resumed.backbone, resumed.head)[key], value, rtol=1e-4, atol=1e-4)


def test_sigint_ends_the_step_writes_a_checkpoint_and_restores_the_handlers(tiny_config, monkeypatch):
    """The handlers in force before the run come back after it: Python's default, or SIG_IGN where the test
    process was started with SIGINT ignored (nohup, a background job)."""
    trainer = Trainer(tiny_config(train={"run_name": "sigint", "max_steps": 10}))
    before = signal.getsignal(signal.SIGINT)
    real = Trainer.train_step

    def train_step(self, images, labels):
        if self.state.step == 2:  # during step 3
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, images, labels)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    with pytest.raises(TrainingInterrupted, match=r"stopped by SIGINT after step 3, checkpoint written; resume with: "
                                                  r"faceforge train --resume .*sigint$"):
        trainer.fit()
    assert _index(trainer.log.dir)["step"] == 3 and signal.getsignal(signal.SIGINT) is before


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "faceforge", "train", *args]


def test_sigterm_then_resume_gives_the_uninterrupted_loss_curve(tiny_config, tmp_path):
    """A subprocess and its loader workers get SIGTERM after a few steps (sent to the process group, as a cluster
    does): it exits 143 with one line naming the step and how to resume; the resumed run's metrics equal those of
    a run never interrupted (same kind of process, same threads: exact)."""
    config = tmp_path / "cfg.yaml"
    config.write_text(dump_config(tiny_config(data={"num_workers": 2}, train={"max_steps": 40})))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = subprocess.run(_cli(str(config), "train.run_name=full"), env=env, capture_output=True, text=True)
    assert full.returncode == 0, full.stderr
    run = tmp_path / "runs" / "cut"
    proc = subprocess.Popen(_cli(str(config), "train.run_name=cut"), env=env, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(_lines(run / "metrics.jsonl")) < 3:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGTERM)
    err = proc.communicate(timeout=120)[1].strip().splitlines()
    assert proc.returncode == 128 + signal.SIGTERM, err
    step = _index(run)["step"]
    assert 3 <= step < 40
    assert err[-1] == (f"faceforge: stopped by SIGTERM after step {step}, checkpoint written; "
                       f"resume with: faceforge train --resume {run}")
    resumed = subprocess.run(_cli("--resume", str(run)), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert _losses(run) == _losses(tmp_path / "runs" / "full")


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _signalled_worker(rank: int, world: int, port: int, raw: dict, out: str) -> None:
    """Rank 1 alone gets SIGTERM during step 2; every rank must stop after the same step."""
    from faceforge.config import config_from_dict

    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    trainer = Trainer(config_from_dict(raw))
    real = trainer.train_step

    def train_step(images, labels):
        if rank == 1 and trainer.state.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(images, labels)

    trainer.train_step = train_step
    try:
        trainer.fit()
    except TrainingInterrupted as exc:
        Path(out, f"rank{rank}.txt").write_text(f"{trainer.state.step} {exc}")
    finally:
        torch.distributed.destroy_process_group()


def test_under_torchrun_every_rank_stops_after_the_same_step(tiny_config, tmp_path):
    import socket

    import torch.multiprocessing as mp

    raw = tiny_config(train={"batch_size": 4, "max_steps": 10, "run_name": "k2", "dist_timeout_s": 60}).to_dict()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_signalled_worker, args=(2, port, raw, str(tmp_path)), nprocs=2, join=True)
    reports = [(tmp_path / f"rank{r}.txt").read_text().split(" ", 1) for r in range(2)]
    # log_every is 1, so the ranks agree before every step: the signal during step 2 stops both after it
    assert [step for step, _ in reports] == ["2", "2"] and "stopped by SIGTERM after step 2" in reports[0][1]
    assert _index(tmp_path / "runs" / "k2")["step"] == 2


def test_ranks_agree_on_a_stop_only_on_the_steps_whose_loss_is_read(monkeypatch):
    """Under torchrun the stop flag costs one scalar collective every `every` (= train.log_every) steps, on the
    process group's device, and none in between."""
    from faceforge.engine import stop as stop_module
    from faceforge.engine.parallel import Parallel

    calls = []

    def reduce(values, op, group, device):
        calls.append((list(values), device))
        return torch.tensor(values, dtype=torch.float64)

    monkeypatch.setattr(stop_module, "all_reduce_scalars", reduce)
    stop = stop_module.StopOnSignal(Parallel(0, 2, 0, object(), torch.device("cpu")), every=3)
    assert [stop.poll(step) for step in (1, 2, 3)] == [False, False, False]
    stop.received = signal.SIGTERM
    assert [stop.poll(step) for step in (4, 5, 6)] == [False, False, True]
    assert calls == [([0], torch.device("cpu")), ([signal.SIGTERM], torch.device("cpu"))]
