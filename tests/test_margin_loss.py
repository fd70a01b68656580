"""The fused margin + cross-entropy (heads/margin_loss.py) against today's plain-autograd logits, in float64: row
statistics and gradients for every softmax-family head, a PartialFC block and class shards, over several column
chunks; finite at cos = ±1; one [B, C] buffer."""

import pytest
import torch
import torch.nn.functional as F

from faceforge.engine.head_memory import _LiveBytes
from faceforge.heads import ArcFace, build_head, ClassShard, CombinedMargin, CosFace, Softmax
from faceforge.heads import margin_loss
from faceforge.heads.margin_loss import shard_rows

B, D, N = 9, 5, 7
HEADS = {
    "softmax": lambda: Softmax(D, N),
    "cosface": lambda: CosFace(D, N, s=8.0, m=0.35),
    "arcface": lambda: ArcFace(D, N, s=8.0, m=0.5),
    "combined": lambda: CombinedMargin(D, N, s=8.0, m1=1.3, m2=0.2, m3=0.1),
    "straight_through": lambda: ArcFace(D, N, s=8.0, m=0.5, straight_through=True),
}


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 3 columns: 7 classes make two full chunks and a ragged one."""
    monkeypatch.setattr(margin_loss, "COLUMN_CHUNK", 3)


def _data(seed, n=N, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(B, D, generator=g, dtype=dtype)
    labels = torch.randint(0, n, (B,), generator=g)
    mix = torch.randn(2, B, generator=g, dtype=dtype)  # independent weights on lse and target: any g_lse, g_target
    return emb, labels, mix


def _plain_rows(head, emb, weight, labels, shard):
    """Today's path: the [B, C] logits with plain autograd ops, then the four row statistics."""
    logits = head.class_logits(emb, weight, labels, shard)
    local, owned = shard.local_labels(labels)
    p = torch.softmax(logits, dim=1)
    target = logits.gather(1, local[:, None]).squeeze(1) * owned
    return torch.logsumexp(logits, dim=1), target, logits.amax(dim=1).detach(), (p * logits).sum(dim=1).detach()


def _rows_and_grads(rows_fn, emb, weight, mix):
    e, w = emb.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    rows = rows_fn(e, w)
    (mix[0] * rows[0] + mix[1] * rows[1]).sum().backward()
    return [r.detach() for r in rows], e.grad, w.grad


@pytest.mark.parametrize("name", list(HEADS))
def test_rows_and_gradients_equal_plain_autograd(name, small_chunks):
    head = HEADS[name]().double()
    emb, labels, mix = _data(0)
    weight, shard = head.weight.detach(), head.shard
    spec = head.margin_spec()
    got = _rows_and_grads(lambda e, w: shard_rows(e, w, labels, shard, spec), emb, weight, mix)
    ref = _rows_and_grads(lambda e, w: _plain_rows(head, e, w, labels, shard), emb, weight, mix)
    for a, b in zip(got[0], ref[0]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[2], ref[2], rtol=1e-10, atol=1e-12)
    assert got[1].abs().sum() > 0 and got[2].abs().sum() > 0


def test_sampled_block_loss_and_gradient_equal_plain_autograd(small_chunks):
    torch.manual_seed(0)
    head = ArcFace(D, 60, s=8.0, m=0.3, sample_rate=0.2).double()
    emb, labels, _ = _data(2, n=60)
    e = emb.clone().requires_grad_(True)
    out = head(e, labels)
    out.loss.backward()
    rows, block = head.sampled_blocks()["weight"]
    assert len(rows) > margin_loss.COLUMN_CHUNK and len(rows) < 60
    ref_e, ref_w = emb.clone().requires_grad_(True), head.weight.detach()[rows].clone().requires_grad_(True)
    cos = F.normalize(ref_e, dim=1) @ F.normalize(ref_w, dim=1).t()
    mapped = torch.searchsorted(rows, labels)
    target = torch.cos(torch.acos(cos.gather(1, mapped[:, None])) + 0.3)
    F.cross_entropy(8.0 * cos.scatter(1, mapped[:, None], target), mapped).backward()
    torch.testing.assert_close(out.loss.detach(), F.cross_entropy(8.0 * cos.scatter(1, mapped[:, None], target),
                                                                  mapped).detach())
    torch.testing.assert_close(e.grad, ref_e.grad)
    torch.testing.assert_close(block.grad, ref_w.grad)


@pytest.mark.parametrize("name", ["softmax", "arcface", "combined"])
def test_class_shards_combine_to_the_whole(name, small_chunks):
    """Two shards' rows (their own centres, labels located by each shard) give the whole head's loss and
    gradients; a row whose class lives in the other shard has target 0 and only its log-sum-exp term."""
    head = HEADS[name]().double()
    emb, labels, mix = _data(3)
    weight, spec = head.weight.detach(), head.margin_spec()
    shards = [ClassShard(0, 4), ClassShard(4, N - 4)]
    e = emb.clone().requires_grad_(True)
    parts = [weight[s.start:s.start + s.count].clone().requires_grad_(True) for s in shards]
    rows = [shard_rows(e, w, labels, s, spec) for w, s in zip(parts, shards)]
    for r, s in zip(rows, shards):
        assert torch.all(r.target[~s.local_labels(labels)[1]] == 0)
    per_sample = torch.logsumexp(torch.stack([r.lse for r in rows]), dim=0) - sum(r.target for r in rows)
    (mix[0] * per_sample).sum().backward()
    ref_e, ref_w = emb.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    logits = head.class_logits(ref_e, ref_w, labels, head.shard)
    ref = F.cross_entropy(logits, labels, reduction="none")
    (mix[0] * ref).sum().backward()
    torch.testing.assert_close(per_sample.detach(), ref.detach())
    torch.testing.assert_close(e.grad, ref_e.grad)
    torch.testing.assert_close(torch.cat([w.grad for w in parts]), ref_w.grad)


@pytest.mark.parametrize("name", ["cosface", "arcface", "combined", "straight_through"])
def test_finite_where_an_embedding_is_a_centre_or_its_negative(name, small_chunks):
    head = HEADS[name]()
    w = head.weight.detach()
    emb = torch.cat([w[:2], -w[2:4]]).clone().requires_grad_(True)
    labels = torch.tensor([0, 1, 2, 3])  # cos = 1 with the target for two rows, -1 for the others
    out = head(emb, labels)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(emb.grad).all() and torch.isfinite(head.weight.grad).all()
    assert torch.isfinite(out.softmax.entropy()).all()


def test_low_precision_embeddings_keep_fp32_rows_and_their_own_gradient_dtype():
    head = HEADS["arcface"]()
    emb, labels, _ = _data(4, dtype=torch.float32)
    e = emb.to(torch.bfloat16).requires_grad_(True)
    rows = shard_rows(e, head.weight, labels, head.shard, head.margin_spec())
    assert all(r.dtype == torch.float32 for r in rows)
    (rows.lse - rows.target).sum().backward()
    assert e.grad.dtype == torch.bfloat16 and head.weight.grad.dtype == torch.float32


def test_a_retained_graph_gives_the_same_gradient_twice(small_chunks):
    """Backward overwrites its buffer with the gradient; a second backward recomputes the logits."""
    head = HEADS["combined"]().double()
    emb, labels, _ = _data(5)
    e = emb.clone().requires_grad_(True)
    loss = head(e, labels).loss
    first = torch.autograd.grad(loss, [e, head.weight], retain_graph=True)
    second = torch.autograd.grad(loss, [e, head.weight])
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["softmax", "cosface", "arcface", "combined"])
def test_a_step_holds_one_logit_buffer(name):
    """Peak bytes per logit that forward + backward add to what exists before (parameters, embeddings): one fp32
    [B, C] buffer (4) plus chunk-sized temporaries and [B, D] terms, 4.0-4.3 measured; two buffers would be 8, the
    plain autograd path ~25."""
    batch, classes, dim = 64, 8 * margin_loss.COLUMN_CHUNK, 16
    torch.manual_seed(0)
    head = build_head(name, dim, classes)
    emb = torch.randn(batch, dim, requires_grad=True)
    labels = torch.randint(0, classes, (batch,))
    with _LiveBytes() as tracker:
        tracker.adopt([*head.parameters(), emb])  # what exists before the step is not the step's
        head(emb, labels).loss.backward()
    weight_grad = classes * dim * 4
    per_logit = (tracker.peak - sum(tracker.held.values()) - weight_grad) / (batch * classes)
    assert 4.0 < per_logit < 7.0, per_logit
