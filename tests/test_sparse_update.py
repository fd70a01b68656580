"""A sampled step updates only its sampled class rows, with the semantics of the former procedure: a whole-matrix
optimizer step on the dense gradient, then the unsampled rows' weights and optimizer state restored. That
procedure is kept here as the reference; both run the real train_step in float64, alone and class-sharded."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from faceforge.config import config_from_dict
from faceforge.distributed import shutdown
from faceforge.engine import step as step_module
from faceforge.engine.optim import set_lr
from faceforge.engine.parallel import Parallel
from faceforge.engine.step import StepParts, build_parts, train_step
from faceforge.heads.base import is_class_rows
from faceforge.registry import BACKBONES
from test_distributed import _Linear  # a backbone without batch norm: a local batch's rows equal the global one's

N, B = 40, 6
OPTIMS = {
    "sgd": {"name": "sgd", "momentum": 0.9, "weight_decay": 5e-4},
    "sgd-nesterov": {"name": "sgd", "momentum": 0.9, "nesterov": True, "weight_decay": 1e-2},
    "sgd-plain": {"name": "sgd", "momentum": 0.0, "weight_decay": 0.0},
    "adamw": {"name": "adamw", "weight_decay": 5e-2},
}
HEADS = {
    "arcface": {"name": "arcface", "s": 16.0, "m": 0.3, "sample_rate": 0.2},
    "sphereface2": {"name": "sphereface2", "sample_rate": 0.3},
    "arcface+unpg": {"name": "arcface", "s": 16.0, "m": 0.3, "sample_rate": 0.25, "unpg": {"k": 1.5}},
}
LRS = [0.1, 0.05, 0.02, 0.2]  # a schedule's values, set in the param groups before each step


def _parts(head: dict, optim: dict, par: Parallel | None = None, fused: bool = False) -> StepParts:
    cfg = config_from_dict({"backbone": {"name": "test_linear"}, "head": head,
                            "optim": {**optim, "lr": LRS[0], "grad_clip": 1.0, "fused": fused},
                            "train": {"device": "cpu"}})
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with BACKBONES.temporary("test_linear", _Linear):
            return build_parts(cfg, N, torch.device("cpu"), par)
    finally:
        torch.set_default_dtype(default)


def _batch(step: int, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return (torch.randn(world * B, 3, 8, 8, generator=g, dtype=torch.float64),
            torch.randint(0, N, (world * B,), generator=g))


def _dense_then_restore(p: StepParts, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> torch.Tensor:
    """The former step: the dense gradient (zero off the sampled rows, as backward through weight[index] gave it),
    the optimizer over the whole matrix, then the unsampled rows' weights and state put back."""
    params = dict(p.head.named_parameters())
    saved = []
    for name, (index, block) in p.head.sampled_blocks().items():
        w = params[name]
        w.grad = torch.zeros_like(w).index_copy_(0, index, block.grad)
        rest = torch.ones(w.shape[0], dtype=torch.bool)
        rest[index] = False
        state = p.optimizer.state.get(w, {})
        old = {k: v[rest].clone() for k, v in state.items() if is_class_rows(v, w)}
        saved.append((w, rest, w.detach()[rest].clone(), old))
    skipped, _ = step_module._guarded_step(p, loss, grad_norm)
    for w, rest, weights, old in saved:
        w.data[rest] = weights
        for k, v in p.optimizer.state.get(w, {}).items():
            if is_class_rows(v, w):
                v[rest] = old[k] if k in old else 0.0
    return skipped


def run_steps(p: StepParts, steps: int, reference=None, rank: int = 0, world: int = 1, whole: bool = False) -> None:
    """`steps` train_steps on rank `rank`'s rows of global batches (all rows with `whole`), the lr changing, the
    global RNG seeded per step and rank (the class sample, GIF's uniformity subset); `reference` replaces the
    step's sampled-row update (the dense procedure it must equal) when given."""
    real = step_module._step_with_sampled_rows
    if reference is not None:
        step_module._step_with_sampled_rows = reference
    try:
        for i in range(steps):
            set_lr(p.optimizer, LRS[i % len(LRS)])
            x, y = _batch(i, world)
            rows = slice(None) if whole else slice(rank * B, (rank + 1) * B)
            torch.manual_seed(1000 * i + rank)
            assert not bool(train_step(p, x[rows], y[rows]).skipped)
    finally:
        step_module._step_with_sampled_rows = real


def _assert_same(a: StepParts, b: StepParts) -> None:
    """Weights and optimizer state (AdamW's step count included) equal to float64 rounding."""
    close = {"rtol": 1e-9, "atol": 1e-12}
    for (name, pa), pb in zip([*a.backbone.named_parameters(), *a.head.named_parameters()],
                              [*b.backbone.parameters(), *b.head.parameters()]):
        torch.testing.assert_close(pa, pb, **close, msg=name)
        sa, sb = a.optimizer.state.get(pa, {}), b.optimizer.state.get(pb, {})
        assert set(sa) == set(sb), name
        for k in sa:
            torch.testing.assert_close(sa[k].double(), sb[k].double(), **close, msg=f"{name}.{k}")


@pytest.mark.parametrize("optim", list(OPTIMS))
@pytest.mark.parametrize("head", list(HEADS))
def test_sampled_rows_update_equals_dense_then_restore(head, optim):
    sparse, dense = _parts(HEADS[head], OPTIMS[optim]), _parts(HEADS[head], OPTIMS[optim])
    run_steps(sparse, 4)
    run_steps(dense, 4, _dense_then_restore)
    _assert_same(sparse, dense)
    name = next(iter(sparse.head.sampled_blocks()))
    weight = dict(sparse.head.named_parameters())[name]
    assert weight.grad is None  # no dense [N, D] gradient was made


def test_the_schedules_lr_moves_the_rows():
    """lr 0 leaves the sampled rows where they are; a larger lr moves them further (plain SGD: by lr·g)."""
    moved = []
    for lr in (0.0, 0.1, 0.2):
        p = _parts(HEADS["arcface"], OPTIMS["sgd-plain"])
        before = p.head.weight.detach().clone()
        set_lr(p.optimizer, lr)
        torch.manual_seed(0)
        train_step(p, *_batch(0))
        moved.append((p.head.weight.detach() - before).norm().item())
    assert moved[0] == 0.0 and moved[2] == pytest.approx(2 * moved[1], rel=1e-9) and moved[1] > 0


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("optim", ["sgd", "adamw"])
def test_a_skipped_step_changes_no_row(optim, fused):
    p = _parts(HEADS["arcface"], OPTIMS[optim], fused=fused)
    torch.manual_seed(0)
    train_step(p, *_batch(0))  # the state exists
    weight = p.head.weight.detach().clone()
    state = {k: v.clone() for k, v in p.optimizer.state[p.head.weight].items()}
    x, y = _batch(1)
    torch.manual_seed(1)
    assert bool(train_step(p, x * float("nan"), y).skipped)
    assert torch.equal(p.head.weight.detach(), weight)
    for k, v in p.optimizer.state[p.head.weight].items():
        assert torch.equal(v, state[k]), k


def _worker(rank: int, world: int, init_file: str, head: str, optim: str, result_dir: str) -> None:
    """Each rank runs its shard's steps both ways from the same start and compares them (its own sampled rows)."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    par = Parallel(rank, world, 0, dist.group.WORLD)
    sparse, dense = _parts(HEADS[head], OPTIMS[optim], par), _parts(HEADS[head], OPTIMS[optim], par)
    run_steps(sparse, 3, rank=rank, world=world)
    run_steps(dense, 3, _dense_then_restore, rank=rank, world=world)
    _assert_same(sparse, dense)
    (used,) = sparse.head.sampled_class_rows().values()  # "weight", or "base.weight" under UNPG
    torch.save({"rows": sparse.head.shard.count, "moved": len(used)},
               os.path.join(result_dir, f"{rank}.pt"))
    shutdown()


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("head, optim", [("arcface", "sgd-nesterov"), ("arcface+unpg", "adamw"),
                                         ("sphereface2", "sgd")])
def test_class_sharded_ranks_update_their_own_sampled_rows(head, optim, world, tmp_path):
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), head, optim, str(tmp_path)), nprocs=world, join=True)
    results = [torch.load(tmp_path / f"{r}.pt") for r in range(world)]
    assert sum(r["rows"] for r in results) == N
    assert all(0 < r["moved"] < r["rows"] for r in results)
