"""A margin head split over 2 processes (gloo, CPU) gives the whole head's loss and gradients."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from faceforge.distributed import shutdown
from faceforge.heads import ArcFace, ClassShard, Softmax

B, D, N = 8, 6, 11
SPLIT = [0, 5, 11]


def _make(cls, shard=None):
    return cls(D, N, shard=shard).double() if cls is Softmax else cls(D, N, s=16.0, m=0.4, shard=shard).double()


def _whole(cls):
    torch.manual_seed(0)
    head = _make(cls)
    emb = torch.randn(B, D, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, N, (B,))
    out = head(emb, labels)
    out.loss.backward()
    return head.weight.detach(), emb.detach(), labels, out, emb.grad, head.weight.grad


def _worker(rank, world, init_file, cls_name, result_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    cls = {"ArcFace": ArcFace, "Softmax": Softmax}[cls_name]
    weight, emb, labels, *_ = _whole(cls)
    start, end = SPLIT[rank], SPLIT[rank + 1]
    head = _make(cls, ClassShard(start, end - start, dist.group.WORLD))
    head.weight.data.copy_(weight[start:end])
    e = emb.clone().requires_grad_(True)
    out = head(e, labels)
    out.loss.backward()
    torch.save(
        {"loss": out.loss.detach(), "per_sample": out.per_sample_loss.detach(), "emb_grad": e.grad,
         "w_grad": head.weight.grad, "acc": out.metrics["acc"]},
        os.path.join(result_dir, f"{rank}.pt"),
    )
    shutdown()


@pytest.mark.parametrize("cls", [ArcFace, Softmax])
def test_two_shards_equal_whole(cls, tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), cls.__name__, str(tmp_path)), nprocs=2, join=True)
    _, _, _, whole, emb_grad, w_grad = _whole(cls)
    parts = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    for p in parts:
        torch.testing.assert_close(p["loss"], whole.loss.detach())
        torch.testing.assert_close(p["per_sample"], whole.per_sample_loss.detach())
        assert p["acc"] == whole.metrics["acc"]
    # Each rank's embedding gradient covers its own classes' terms; their sum is the whole gradient.
    torch.testing.assert_close(parts[0]["emb_grad"] + parts[1]["emb_grad"], emb_grad)
    torch.testing.assert_close(torch.cat([p["w_grad"] for p in parts]), w_grad)
