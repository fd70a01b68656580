"""K processes (gloo, CPU) equal one process on the global batch; checkpoints do not depend on K; a dead rank ends
the others with a clear error."""

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from faceforge.distributed import shutdown
from faceforge.config import config_from_dict
from faceforge.engine.parallel import Parallel
from faceforge.engine.step import build_parts, optimisation_step
from faceforge.registry import BACKBONES

N, B_LOCAL = 11, 4
HEADS = {
    "arcface": {"name": "arcface", "s": 16.0, "m": 0.3},
    "cosface": {"name": "cosface", "s": 16.0, "m": 0.3},
    "sphereface2": {"name": "sphereface2"},
    "arcface+unpg": {"name": "arcface", "s": 16.0, "m": 0.3, "unpg": {"k": 1.5}},
}


class _Linear(nn.Module):
    """A backbone without batch norm, so that a local batch's forward equals its rows of the global one."""

    def __init__(self, embedding_size: int = 8) -> None:
        super().__init__()
        self.embedding_size = embedding_size
        self.fc = nn.Linear(3 * 8 * 8, embedding_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def _parts(head: dict, par: Parallel | None = None, dtype: torch.dtype = torch.float32):
    """The step's parts; in float64 for the equality tests, so that K-process and one-process sums agree to
    ~1e-15 whatever order a CPU's kernels add in (fp32 differs by ~1e-6 between orders, by CPU and thread count)."""
    cfg = config_from_dict({"backbone": {"name": "test_linear"}, "head": head,
                            "optim": {"lr": 0.1, "grad_clip": 0.0}, "train": {"device": "cpu"}})
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are made in `dtype`, before DDP registers them
    try:
        with BACKBONES.temporary("test_linear", _Linear):  # registered for this build only, in every process
            return build_parts(cfg, N, torch.device("cpu"), par)
    finally:
        torch.set_default_dtype(default)


def _batch(world: int, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(world * B_LOCAL, 3, 8, 8, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, N, (world * B_LOCAL,), generator=g)
    y[1] = y[0]
    return x, y


def _grads(parts) -> dict[str, torch.Tensor]:
    out = {f"backbone.{k}": p.grad.clone() for k, p in parts.backbone.named_parameters()}
    out.update({f"head.{k}": p.grad.clone() for k, p in parts.head.named_parameters()})
    return out


def _worker(rank, world, init_file, head_name, result_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    parts = _parts(HEADS[head_name], Parallel(rank, world, 0, dist.group.WORLD), torch.float64)
    whole = torch.load(os.path.join(result_dir, "init.pt"))
    parts.backbone.load_state_dict({k[9:]: v for k, v in whole.items() if k.startswith("backbone.")})
    shard = parts.head.shard
    for name, p in parts.head.named_parameters():
        full = whole[f"head.{name}"]
        p.data.copy_(full[shard.start:shard.start + shard.count] if name in parts.head.class_parameters else full)
    x, y = _batch(world, torch.float64)
    rows = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    metrics = optimisation_step(parts, x[rows], y[rows])
    torch.save({"loss": metrics["loss"], "grads": _grads(parts), "start": shard.start, "count": shard.count},
               os.path.join(result_dir, f"{rank}.pt"))
    shutdown()


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("head_name", list(HEADS))
def test_one_step_equals_single_process(head_name, world, tmp_path):
    """In float64: the sums only differ in order (~1e-16 relative per add), so 1e-10 leaves room for any CPU's
    reduction order while a wrong factor (a missing or doubled rank's share) is off by O(1)."""
    parts = _parts(HEADS[head_name], dtype=torch.float64)
    init = {f"backbone.{k}": v.clone() for k, v in parts.backbone.state_dict().items()}
    init.update({f"head.{k}": v.clone() for k, v in parts.head.state_dict().items()})
    torch.save(init, tmp_path / "init.pt")
    x, y = _batch(world, torch.float64)
    single = optimisation_step(parts, x, y)
    expected = _grads(parts)
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), head_name, str(tmp_path)), nprocs=world, join=True)
    results = [torch.load(tmp_path / f"{r}.pt") for r in range(world)]
    close = {"rtol": 1e-10, "atol": 1e-12}
    for r in results:
        assert r["loss"] == pytest.approx(single["loss"], rel=1e-10)
        for key, grad in r["grads"].items():
            assert grad.dtype == torch.float64, key
            if key.startswith("backbone.") or key not in {f"head.{n}" for n in parts.head.class_parameters}:
                torch.testing.assert_close(grad, expected[key], **close)
    for name in parts.head.class_parameters:
        whole = torch.cat([r["grads"][f"head.{name}"] for r in results])
        torch.testing.assert_close(whole, expected[f"head.{name}"], **close)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_worker(rank, world, port, raw_cfg, until, resume, result_dir):
    from faceforge.config import config_from_dict as make
    from faceforge.engine.trainer import Trainer

    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    try:
        trainer = Trainer.resume(resume) if resume else Trainer(make(raw_cfg))
        if resume:
            from faceforge.engine import checkpoint as ckpt

            state = ckpt.model_state(trainer.backbone, trainer.head, trainer.par)
            opt = ckpt.optimizer_state(trainer.optimizer, trainer.backbone, trainer.head, trainer.par)
            if rank == 0:
                torch.save({"state": state, "opt": opt}, os.path.join(result_dir, f"loaded-{world}.pt"))
        summary = trainer.fit(until_step=until)
        if rank == 0:
            with open(os.path.join(result_dir, f"summary-{world}.json"), "w") as f:
                json.dump({"step": trainer.state.step, "run_dir": summary["run_dir"]}, f)
        shutdown()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _spawn_training(world, raw_cfg, until, resume, tmp_path):
    if world == 1:
        _train_single(raw_cfg, until, resume, tmp_path)
        return
    mp.spawn(_train_worker, args=(world, _free_port(), raw_cfg, until, resume, str(tmp_path)), nprocs=world,
             join=True)


def _train_single(raw_cfg, until, resume, tmp_path):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(key, None)
    from faceforge.engine import checkpoint as ckpt
    from faceforge.engine.trainer import Trainer

    trainer = Trainer.resume(resume)
    state = ckpt.model_state(trainer.backbone, trainer.head, trainer.par)
    opt = ckpt.optimizer_state(trainer.optimizer, trainer.backbone, trainer.head, trainer.par)
    torch.save({"state": state, "opt": opt}, tmp_path / "loaded-1.pt")
    trainer.fit(until_step=until)
    (tmp_path / "summary-1.json").write_text(json.dumps({"step": trainer.state.step}))


def test_checkpoint_saved_at_two_processes_resumes_at_three_and_one(tiny_config, tmp_path):
    import shutil

    from faceforge.fileio import latest_checkpoint, load_weights

    raw = tiny_config(train={"batch_size": 4, "run_name": "k2", "dist_timeout_s": 60}).to_dict()
    _spawn_training(2, raw, 3, None, tmp_path)
    run = tmp_path / "runs" / "k2"
    weights, _ = latest_checkpoint(run)
    saved = load_weights(weights)
    assert saved["head.weight"].shape == (8, 16)  # whole, not a shard
    for world in (3, 1):
        copy = tmp_path / f"resume-{world}"
        shutil.copytree(run, copy)
        _spawn_training(world, raw, 5, str(copy), tmp_path)
        loaded = torch.load(tmp_path / f"loaded-{world}.pt")
        for key, value in saved.items():
            torch.testing.assert_close(loaded["state"][key], value)
        assert loaded["opt"]["head.weight"]["momentum_buffer"].shape == (8, 16)
        assert json.loads((tmp_path / f"summary-{world}.json").read_text())["step"] == 5
    k2 = torch.load(tmp_path / "loaded-3.pt")["opt"]
    k1 = torch.load(tmp_path / "loaded-1.pt")["opt"]
    for name in k2:
        for key in k2[name]:
            torch.testing.assert_close(k2[name][key], k1[name][key])


def _dying_worker(rank, world, port, raw_cfg, result_dir):
    from faceforge.config import config_from_dict as make
    from faceforge.engine.trainer import Trainer

    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    trainer = Trainer(make(raw_cfg))
    if rank == 1:
        os._exit(3)
    try:
        trainer.fit()
    except Exception as exc:  # the message is what the test checks
        with open(os.path.join(result_dir, "error.txt"), "w") as f:
            f.write(f"{type(exc).__name__}: {exc}")


def test_a_dead_rank_ends_the_others_with_a_clear_error(tiny_config, tmp_path):
    raw = tiny_config(data={"val_bins": []},
                      train={"batch_size": 4, "max_steps": 4, "run_name": "dies", "dist_timeout_s": 5}).to_dict()
    spawn = mp.get_context("spawn")
    port = _free_port()
    procs = [spawn.Process(target=_dying_worker, args=(r, 2, port, raw, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert not any(p.is_alive() for p in procs)
    message = (tmp_path / "error.txt").read_text()
    assert message.startswith("TrainingAborted: rank 0/2: lost the other processes"), message


def test_sampled_step_leaves_unused_centres_and_their_momentum_untouched():
    parts = _parts({"name": "arcface", "s": 16.0, "m": 0.3, "sample_rate": 0.2})
    x, y = _batch(1)
    optimisation_step(parts, x, y)  # creates the momentum buffers
    before = parts.head.weight.detach().clone()
    momentum = parts.optimizer.state[parts.head.weight]["momentum_buffer"].clone()
    optimisation_step(parts, x, y)
    used = parts.head.sampled_class_rows()["weight"]
    rest = torch.ones(N, dtype=torch.bool)
    rest[used] = False
    assert rest.any() and not rest[y].any()
    assert torch.equal(parts.head.weight.detach()[rest], before[rest])
    assert torch.equal(parts.optimizer.state[parts.head.weight]["momentum_buffer"][rest], momentum[rest])
    assert not torch.equal(parts.head.weight.detach()[used], before[used])


def test_torchrun_restart_resumes_the_same_run(tiny_config, monkeypatch):
    from faceforge.engine.trainer import Trainer

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")
    cfg = tiny_config(train={"run_name": "", "max_steps": 4, "checkpoint_every": 2})
    first = Trainer.start(cfg)
    first.fit(until_step=2)
    assert first.log.dir.name == "tiny-arcface-abc"
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    again = Trainer.start(tiny_config(train={"run_name": "", "max_steps": 4, "checkpoint_every": 2}))
    assert again.log.dir == first.log.dir and again.state.step == 2
    assert again.fit()["steps"] == 4


class _Bucket:
    def __init__(self, buffer: torch.Tensor) -> None:
        self._buffer = buffer

    def buffer(self) -> torch.Tensor:
        return self._buffer


def _hook_worker(rank, world, init_file, result_dir):
    from faceforge.engine.parallel import _compressed_sum_hook

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    grads = torch.tensor([1.0 + rank, 1.0 / 3.0, -2.5e-3 * (rank + 1)])
    out = _compressed_sum_hook((dist.group.WORLD, torch.bfloat16), _Bucket(grads.clone())).wait()
    torch.save(out, os.path.join(result_dir, f"hook-{rank}.pt"))
    shutdown()


def test_compressed_gradient_hook_sums_in_bf16(tmp_path):
    """Sum semantics (torch's compress hooks average), each rank's values rounded to bf16 before the sum."""
    mp.spawn(_hook_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    rounded = [torch.tensor([1.0 + r, 1.0 / 3.0, -2.5e-3 * (r + 1)]).bfloat16() for r in range(2)]
    expected = (rounded[0] + rounded[1]).float()
    for r in range(2):
        out = torch.load(tmp_path / f"hook-{r}.pt")
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, expected, rtol=0, atol=0)


def _scalar_worker(rank, world, init_file, result_dir):
    from faceforge.distributed import all_reduce_scalars

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    out = all_reduce_scalars([rank + 0.5, -rank], dist.ReduceOp.MAX, dist.group.WORLD, torch.device("cpu"))
    torch.save(out, os.path.join(result_dir, f"scalar-{rank}.pt"))
    shutdown()


def test_scalar_collective_gives_every_rank_the_reduced_values(tmp_path):
    """What the time budget (slowest rank's elapsed time) and the stop signal rely on."""
    mp.spawn(_scalar_worker, args=(3, str(tmp_path / "init"), str(tmp_path)), nprocs=3, join=True)
    for r in range(3):
        assert torch.load(tmp_path / f"scalar-{r}.pt").tolist() == [2.5, 0.0]


def test_one_split_of_classes_over_ranks():
    from faceforge import distributed
    from faceforge.engine.head_memory import plan_head_memory
    from faceforge.engine.parallel import class_shard

    for n, k in [(11, 2), (10, 3), (7, 7), (5, 1)]:
        ranges = [distributed.shard_range(n, k, r) for r in range(k)]
        counts = [c for _, c in ranges]
        assert [s for s, _ in ranges] == distributed.shard_bounds(n, k)[:-1] and sum(counts) == n
        assert max(counts) - min(counts) <= 1 and distributed.largest_shard(n, k) == max(counts)
        shards = [class_shard(n, Parallel(rank=r, world_size=k)) for r in range(k)]
        assert [(s.start, s.count) for s in shards] == ranges
        assert plan_head_memory(n, k, 4, 8, "sgd", 1.0, "arcface", per_logit=16.0)["classes_per_rank"] == max(counts)
