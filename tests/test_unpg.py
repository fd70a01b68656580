"""UNPG: the log-sum-exp form equals the concatenated-logits reference, the Tukey filter, and the global batch."""

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from faceforge.distributed import shutdown
from faceforge.distributed import all_gather_with_grad
from faceforge.errors import ConfigError
from faceforge.heads import UNPG, ArcFace, ClassShard, CosFace, Softmax, build_head
from faceforge.heads.unpg import tukey_fences

B, D, N = 12, 6, 7


def _base(cls, shard=None):
    if cls is Softmax:
        return Softmax(D, N, shard=shard).double()
    return cls(D, N, s=8.0, m=0.3, shard=shard).double()


def _concat_reference(head: UNPG, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The official form, transcribed plainly: explicit pair loop, sorted-list quartiles, concatenated CE."""
    x = F.normalize(emb, dim=1)
    negatives = [x[a] @ x[b] for a in range(len(labels)) for b in range(a + 1, len(labels)) if labels[a] != labels[b]]
    if negatives:
        ordered = sorted(float(v.detach()) for v in negatives)
        q1, q3 = ordered[len(ordered) // 4], ordered[3 * len(ordered) // 4]
        lo, hi = q1 - head.k * (q3 - q1), q3 + head.k * (q3 - q1)
        negatives = [v for v in negatives if lo <= float(v.detach()) <= hi]
    logits = head.base.logits(emb, labels)
    if negatives:
        row = head.s * torch.stack(negatives)
        logits = torch.cat([logits, row.expand(len(labels), -1)], dim=1)
    return F.cross_entropy(logits, labels)


@pytest.mark.parametrize("cls", [ArcFace, CosFace, Softmax])
@pytest.mark.parametrize("k", [1.5, 0.0, math.inf])
def test_lse_form_equals_concatenation(cls, k):
    torch.manual_seed(1)
    head = UNPG(_base(cls), k=k)
    emb = torch.randn(B, D, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, N, (B,))
    out = head(emb, labels)
    grads = torch.autograd.grad(out.loss, [emb, head.base.weight])
    ref = _concat_reference(head, emb, labels)
    ref_grads = torch.autograd.grad(ref, [emb, head.base.weight])
    torch.testing.assert_close(out.loss, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


def test_gradcheck_float64():
    torch.manual_seed(2)
    head = UNPG(_base(ArcFace), k=1.5)
    labels = torch.randint(0, N, (B,))
    emb = torch.randn(B, D, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda e: head(e, labels).loss, (emb,))


def test_tukey_fences_use_floor_indices():
    values = torch.tensor([0.9, 0.1, 0.3, 0.2, 0.5, 0.4, -3.0, 0.7, 0.6, 0.8], dtype=torch.float64)
    # sorted: -3.0, 0.1, ..., 0.9; L = 10 -> Q1 = sorted[2] = 0.2, Q3 = sorted[7] = 0.7, IQR = 0.5
    lo, hi = tukey_fences(values, 1.5)
    assert float(lo) == pytest.approx(0.2 - 0.75)
    assert float(hi) == pytest.approx(0.7 + 0.75)
    assert ((values >= lo) & (values <= hi)).sum() == 9  # the -3.0 outlier goes


def test_one_class_batch_falls_back_to_base_loss():
    torch.manual_seed(3)
    base = _base(ArcFace)
    emb, labels = torch.randn(B, D, dtype=torch.float64), torch.full((B,), 2)
    out = UNPG(base, k=1.5)(emb, labels)
    torch.testing.assert_close(out.loss, base(emb, labels).loss)
    assert out.metrics["unpg_negatives"] == 0.0


def test_negatives_raise_the_loss_and_the_softmax_view_includes_them():
    torch.manual_seed(4)
    base = _base(CosFace)
    emb, labels = torch.randn(B, D, dtype=torch.float64), torch.randint(0, N, (B,))
    out = UNPG(base, k=1.5)(emb, labels)
    plain = base(emb, labels)
    assert out.loss > plain.loss
    assert (out.softmax.target_prob() < plain.softmax.target_prob()).all()


def test_config_builds_and_rejects_bad_tables():
    head = build_head("arcface", D, N, s=64.0, m=0.5, unpg={"k": 1.5})
    assert isinstance(head, UNPG) and head.s == 64.0 and head.k == 1.5
    with pytest.raises(ConfigError, match="head.unpg.kk"):
        build_head("arcface", D, N, unpg={"kk": 1.5})
    with pytest.raises(ConfigError, match="head.unpg must be a mapping"):
        build_head("arcface", D, N, unpg=1.5)
    with pytest.raises(ConfigError, match="softmax-family"):
        build_head("sphereface2", D, N, unpg={"k": 1.5})


def test_margin_ramp_reaches_the_wrapped_head():
    head = build_head("arcface", D, N, m=0.5, margin_warmup=0.5, unpg={})
    head.set_progress(0.25, epoch=1.0)
    assert head.base.margins()[1] == pytest.approx(0.25)


def _whole(cls, world):
    torch.manual_seed(5)
    base = _base(cls)
    emb = torch.randn(B * world // 2, D, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, N, (len(emb),))
    labels[1] = labels[0]  # at least one positive pair in the batch
    out = UNPG(base, k=1.5)(emb, labels)
    out.loss.backward()
    return base.weight.detach(), emb.detach(), labels, out.loss.detach(), emb.grad, base.weight.grad


def _worker(rank, world, init_file, cls_name, result_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    cls = {"ArcFace": ArcFace, "CosFace": CosFace}[cls_name]
    weight, emb, labels, *_ = _whole(cls, world)
    bounds = [N * r // world for r in range(world + 1)]
    start, count = bounds[rank], bounds[rank + 1] - bounds[rank]
    head = UNPG(_base(cls, ClassShard(start, count, dist.group.WORLD)), k=1.5)
    head.base.weight.data.copy_(weight[start:start + count])
    rows = len(emb) // world
    local = emb[rank * rows:(rank + 1) * rows].clone().requires_grad_(True)
    out = head(all_gather_with_grad(local), labels)
    out.loss.backward()
    torch.save({"loss": out.loss.detach(), "emb_grad": local.grad, "w_grad": head.base.weight.grad},
               os.path.join(result_dir, f"{rank}.pt"))
    shutdown()


@pytest.mark.parametrize("cls,world", [(ArcFace, 2), (CosFace, 3)])
def test_global_batch_over_processes_equals_one_process(cls, world, tmp_path):
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), cls.__name__, str(tmp_path)), nprocs=world, join=True)
    _, _, _, loss, emb_grad, w_grad = _whole(cls, world)
    parts = [torch.load(tmp_path / f"{r}.pt") for r in range(world)]
    for p in parts:
        torch.testing.assert_close(p["loss"], loss)
    torch.testing.assert_close(torch.cat([p["emb_grad"] for p in parts]), emb_grad)
    torch.testing.assert_close(torch.cat([p["w_grad"] for p in parts]), w_grad)


def test_trains_end_to_end(tiny_config):
    from faceforge.engine.trainer import Trainer

    cfg = tiny_config(head={"name": "cosface", "s": 16.0, "m": 0.2, "unpg": {"k": 1.5}})
    summary = Trainer(cfg).fit()
    assert summary["steps"] == 6
    with open(os.path.join(summary["run_dir"], "metrics.jsonl")) as f:
        assert "unpg_kept" in f.read()
