"""GIF joint mode trains its code vectors on a block of just the rows a step uses: the gradient of the former dense
formula, the update of the former dense step (whole-matrix step, then the unused rows and their state restored), no
[N, D] gradient, and under torchrun a sparse sum over ranks that keeps the replicas equal. All in float64."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from faceforge.distributed import shutdown
from faceforge.engine import step as step_module
from faceforge.engine.parallel import Parallel
from faceforge.engine.step import StepParts
from faceforge.heads.base import is_class_rows
from faceforge.tokenizer import Codebook, build_codes, save_codes
from faceforge.tokenizer.spreading import gaussian_potential
from test_sparse_update import B, N, _assert_same, run_steps
from test_sparse_update import _parts as _step_parts

OPTIMS = {
    "sgd": {"name": "sgd", "momentum": 0.9, "weight_decay": 5e-4},
    "sgd-nesterov": {"name": "sgd", "momentum": 0.9, "nesterov": True, "weight_decay": 0.0},
    "adamw": {"name": "adamw", "weight_decay": 5e-2},
}
SUBSET = 5  # small against N = 40: every step leaves rows out


def _codes_file(directory) -> str:
    vectors = F.normalize(torch.randn(N, 8, generator=torch.Generator().manual_seed(3)), dim=1)
    path = os.path.join(str(directory), "codes.safetensors")
    save_codes(path, Codebook(build_codes(vectors, 4), vectors, 4, {"seed": "0"}))
    return path


def _head_cfg(codes: str, uniformity: float) -> dict:
    return {"name": "gif", "codes": codes, "head_dim": 6, "s": 8.0, "m": 0.2, "gamma": 0.7, "joint": True,
            "uniformity": uniformity, "subset": SUBSET}


def _parts(codes: str, uniformity: float, optim: str, par: Parallel | None = None) -> StepParts:
    parts = _step_parts(_head_cfg(codes, uniformity), OPTIMS[optim], par)
    parts.head.double()  # the code vectors are read as fp32; the optimizer holds the same (converted) parameters
    return parts


def _dense_sum_then_restore(p: StepParts, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> torch.Tensor:
    """The former step: the code vectors' dense gradient (zero off the block, as backward through code_vectors[ids]
    gave it) summed over ranks, the optimizer over the whole matrix, then the rows no rank used put back, state too."""
    w = p.head.code_vectors
    index, block = p.head.sampled_blocks()["code_vectors"]
    w.grad = torch.zeros_like(w).index_copy_(0, index, block.grad)
    used = torch.zeros(N, dtype=torch.float64).index_fill_(0, index, 1.0)
    if p.par.active:
        dist.all_reduce(w.grad, group=p.par.group)
        dist.all_reduce(used, group=p.par.group)
    rest = used == 0
    state = p.optimizer.state.get(w, {})
    old = {k: v[rest].clone() for k, v in state.items() if is_class_rows(v, w)}
    weights = w.detach()[rest].clone()
    skipped, _ = step_module._guarded_step(p, loss, grad_norm)
    w.data[rest] = weights
    for k, v in p.optimizer.state[w].items():
        if is_class_rows(v, w):
            v[rest] = old[k] if k in old else 0.0
    return skipped


def test_block_gradient_is_the_dense_formulas(tmp_path):
    """The block's gradient is the former dense one (pull summed over the batch, potential of the batch's and the
    subset's vectors), from the same random subset: the RNG stream after the step is the same too."""
    head = _parts(_codes_file(tmp_path), 1.0, "sgd").head
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(B, 8, generator=g, dtype=torch.float64), torch.tensor([3, 3, 17, 0, 39, 17])
    torch.manual_seed(11)
    out = head(x, y)
    out.loss.backward()
    after = torch.rand(3)
    index, block = head.sampled_blocks()["code_vectors"]
    assert head.code_vectors.grad is None and bool((torch.diff(index) > 0).all())
    sparse = torch.zeros_like(head.code_vectors).index_copy_(0, index, block.grad)

    torch.manual_seed(11)
    ids = torch.unique(torch.cat([y, torch.randint(N, (SUBSET,))]))
    assert torch.equal(torch.rand(3), after) and torch.equal(ids, index)
    vectors = head.code_vectors.detach().clone().requires_grad_()
    h = vectors[y]
    h = F.normalize(h.detach() + len(y) * (h - h.detach()), dim=1)
    pull = 0.5 * ((F.normalize(x, dim=1) * h).sum(dim=1) - 1.0).square()
    potential = gaussian_potential(F.normalize(vectors[ids], dim=1), head.t)
    (0.7 * pull + potential).mean().backward()
    torch.testing.assert_close(sparse, vectors.grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out.metrics["uniformity"], potential.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(out.metrics["pull"], pull.detach().mean(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("steps", [1, 4])
@pytest.mark.parametrize("uniformity", [0.0, 1.0])
@pytest.mark.parametrize("optim", list(OPTIMS))
def test_gif_rows_update_equals_dense_then_restore(optim, uniformity, steps, tmp_path):
    codes = _codes_file(tmp_path)
    sparse, dense = _parts(codes, uniformity, optim), _parts(codes, uniformity, optim)
    start = sparse.head.code_vectors.detach().clone()
    run_steps(sparse, steps)
    run_steps(dense, steps, _dense_sum_then_restore)
    _assert_same(sparse, dense)
    w = sparse.head.code_vectors
    assert w.grad is None  # no dense [N, D] gradient was made
    if steps == 1:
        rest = torch.ones(N, dtype=torch.bool)
        rest[sparse.head.sampled_class_rows()["code_vectors"]] = False
        assert rest.any() and torch.equal(w.detach()[rest], start[rest])
        assert not torch.equal(w.detach()[~rest], start[~rest])


def test_evaluation_uses_all_code_vectors_and_makes_no_block(tmp_path):
    head = _parts(_codes_file(tmp_path), 1.0, "sgd").head.eval()
    x, y = torch.randn(4, 8, dtype=torch.float64), torch.tensor([1, 2, 2, 30])
    state = torch.get_rng_state()
    head(x, y).loss.backward()
    assert head.sampled_blocks() == {} and torch.equal(torch.get_rng_state(), state)
    moved = head.code_vectors.grad.abs().sum(dim=1) > 0
    assert moved.nonzero().squeeze(1).tolist() == [1, 2, 30]


def _worker(rank: int, world: int, init_file: str, codes: str, uniformity: float, optim: str,
            result_dir: str) -> None:
    """Each rank runs the sparse path and the dense reference from the same start and compares them."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    par = Parallel(rank, world, 0, dist.group.WORLD)
    sparse, dense = _parts(codes, uniformity, optim, par), _parts(codes, uniformity, optim, par)
    run_steps(sparse, 3, rank=rank, world=world)
    run_steps(dense, 3, _dense_sum_then_restore, rank=rank, world=world)
    _assert_same(sparse, dense)
    assert sparse.head.code_vectors.grad is None
    state = {f"backbone.{k}": v for k, v in sparse.backbone.state_dict().items()}
    state.update({f"head.{k}": v for k, v in sparse.head.state_dict().items()})
    torch.save(state, os.path.join(result_dir, f"{rank}.pt"))
    shutdown()


@pytest.mark.parametrize("uniformity, optim", [(0.0, "sgd"), (0.0, "adamw"), (1.0, "sgd-nesterov"), (1.0, "adamw")])
def test_gif_ranks_sum_their_rows_and_stay_equal(uniformity, optim, tmp_path):
    """K = 2: every rank equals the dense reference (the code vectors' gradient all-reduced whole) and the ranks
    are identical. Without the uniformity term (its subset is drawn per rank) the run also equals one process on
    the concatenated batch, to float64 rounding of sums taken in another order."""
    codes, world = _codes_file(tmp_path), 2
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), codes, uniformity, optim, str(tmp_path)), nprocs=world,
             join=True)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(world)]
    for key, value in ranks[0].items():
        assert torch.equal(value, ranks[1][key]), key
    if uniformity == 0.0:
        single = _parts(codes, uniformity, optim)
        run_steps(single, 3, world=world, whole=True)
        state = {f"backbone.{k}": v for k, v in single.backbone.state_dict().items()}
        state.update({f"head.{k}": v for k, v in single.head.state_dict().items()})
        for key, value in state.items():
            torch.testing.assert_close(ranks[0][key], value, rtol=1e-9, atol=1e-12, msg=key)
