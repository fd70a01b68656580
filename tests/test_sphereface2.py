"""SphereFace2 against a float64 transcription of its formula and against its former plain-autograd forward (the
fused loss function), bias init, shards, sampling and a short training run."""

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from faceforge.distributed import shutdown
from faceforge.engine.optim import param_groups
from faceforge.errors import ConfigError
from faceforge.heads import ClassShard, SphereFace2, build_head
from faceforge.heads import sphereface2_loss
from faceforge.heads.sphereface2 import initial_bias
from faceforge.heads.sphereface2_loss import adjust, positive_cosine, softplus

B, D, N = 6, 5, 7


def _data(seed=0, b=B, n=N):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, D, generator=g, dtype=torch.float64), torch.randint(0, n, (b,), generator=g)


def _cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _adjusted(c, positive, variant, m, t):
    """The adjusted cosine of one (sample, class) pair, written out from the paper's definitions."""
    g = lambda z: 2.0 * ((z + 1.0) / 2.0) ** t - 1.0  # noqa: E731
    if variant == "C":
        return g(c) - m if positive else g(c) + m
    if not positive:
        return g(c)
    theta = math.acos(c)
    return g(math.cos(min(theta + m if variant == "A" else m * theta, math.pi)))


def _softplus(x):
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def _reference(x, w, b, labels, variant, lam, r, m, t, lw, frozen=None):
    """Per-sample loss, element by element; `frozen` = (x0, w0) evaluates the adjustment offset there (detached form)."""
    out = []
    for i in range(len(x)):
        total = 0.0
        for j in range(len(w)):
            c, positive = _cos(x[i], w[j]), j == labels[i]
            c0 = c if frozen is None else _cos(frozen[0][i], frozen[1][j])
            s = r * (c + _adjusted(c0, positive, variant, m, t) - c0) + b
            total += lam * _softplus(-s) if positive else (1.0 - lam) * _softplus(s)
        out.append(lw / r * total)
    return np.array(out)


def _numeric_grads(x, w, b, labels, params, detached, h=1e-6):
    """Central differences of the transcription's mean loss in x, w and b."""
    frozen = (x.copy(), w.copy()) if detached else None
    f = lambda x, w, b: _reference(x, w, b, labels, frozen=frozen, **params).mean()  # noqa: E731
    grads = []
    for arr in (x, w):
        grad = np.zeros_like(arr)
        for idx in np.ndindex(arr.shape):
            old = arr[idx]
            arr[idx] = old + h
            up = f(x, w, b)
            arr[idx] = old - h
            grad[idx] = (up - f(x, w, b)) / (2 * h)
            arr[idx] = old
        grads.append(grad)
    return grads + [(f(x, w, b + h) - f(x, w, b - h)) / (2 * h)]


CASES = [("C", None), ("C", True), ("A", None), ("M", None), ("A", False), ("M", False)]


@pytest.mark.parametrize("variant, detach", CASES)
def test_loss_and_gradients_match_transcription(variant, detach):
    torch.manual_seed(0)  # fixed centres: a random draw can put a finite-difference probe across the min(., pi) kink
    head = SphereFace2(D, N, variant=variant, r=10.0, detach_adjust=detach).double()
    emb, labels = _data()
    emb.requires_grad_(True)
    out = head(emb, labels)
    out.loss.backward()
    params = dict(variant=variant, lam=0.7, r=10.0, m=head.m, t=3.0, lw=10.0)
    x, w, b = emb.detach().numpy().copy(), head.weight.detach().numpy().copy(), head.bias.item()
    ref = _reference(x, w, b, labels.tolist(), **params)
    np.testing.assert_allclose(out.per_sample_loss.detach().numpy(), ref, rtol=1e-12)
    assert out.loss.item() == pytest.approx(ref.mean(), rel=1e-12)
    gx, gw, gb = _numeric_grads(x, w, b, labels.tolist(), params, detached=head.detach_adjust)
    np.testing.assert_allclose(emb.grad.numpy(), gx, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(head.weight.grad.numpy(), gw, rtol=1e-6, atol=1e-8)
    assert head.bias.grad.item() == pytest.approx(gb, rel=1e-6)


def _plain_autograd(head, embeddings, labels):
    """The head's forward as it was before the fused loss function: plain autograd over [B, C] tensors (cosines,
    one-hot mask, adjusted cosines, logits, coefficients, softplus terms). Per-sample loss and accuracy."""
    weight, labels, shard, sample = head.step_centres(labels)
    x = F.normalize(embeddings, dim=1)
    cos = (x @ F.normalize(weight, dim=1).t()).clamp(-1.0, 1.0)
    local, owned = shard.local_labels(labels)
    onehot = torch.zeros_like(cos, dtype=torch.bool).scatter_(1, local[:, None], owned[:, None])
    if head.variant == "C":
        adjusted = adjust(cos, head.t) + head.m * (1.0 - 2.0 * onehot.to(cos.dtype))
    else:
        target = adjust(positive_cosine(cos.gather(1, local[:, None]), head.variant, head.m), head.t)
        adjusted = torch.where(onehot, target, adjust(cos, head.t))
    if head.detach_adjust:
        adjusted = cos + (adjusted - cos).detach()
    logits = head.r * adjusted + head.shared_bias()
    positive = onehot.to(cos.dtype)
    coef = head.lam * positive + (1.0 - head.lam) * (1.0 - positive)
    if sample is not None:
        factor = sample.others / sample.kept_others
        coef = coef * (1.0 + (factor - 1.0) * (~sample.positive).to(coef.dtype))
    terms = coef * softplus(logits * (1.0 - 2.0 * positive))
    acc = ((cos.gather(1, local[:, None]).squeeze(1) * owned) >= cos.amax(dim=1)).float().mean()
    return (head.lw / head.r) * terms.sum(dim=1), acc


def _loss_and_grads(head, emb, labels, forward):
    """Per-sample loss, accuracy and the gradients of the mean loss in the embeddings, the centres this step used
    (the sampled block under sampling) and the bias; the sampling RNG seeded alike for every `forward`."""
    torch.manual_seed(7)
    head.zero_grad()
    e = emb.clone().requires_grad_(True)
    per_sample, acc = forward(head, e, labels)
    per_sample.mean().backward()
    centres = head.sampled_blocks().get("weight", (None, head.weight))[1]
    return per_sample.detach(), acc, e.grad, centres.grad, head.bias.grad.clone()


def _fused(head, emb, labels):
    out = head(emb, labels)
    return out.per_sample_loss, out.metrics["acc"]


@pytest.mark.parametrize("chunk", [None, 3], ids=["one-chunk", "3-columns"])
@pytest.mark.parametrize("variant, detach, rate, shard", [
    ("C", False, 1.0, None), ("C", True, 1.0, None), ("A", True, 1.0, None), ("A", False, 1.0, None),
    ("M", True, 1.0, None), ("M", False, 1.0, None), ("C", False, 0.3, None), ("M", True, 0.3, None),
    ("A", False, 1.0, (5, 11)), ("C", False, 0.4, (5, 11)),
])
def test_fused_loss_equals_plain_autograd(variant, detach, rate, shard, chunk, monkeypatch):
    """Float64, so that the two summation orders agree to ~1e-16 relative; 1e-10 leaves room for any CPU's."""
    b, n = 8, 23
    if chunk is not None:
        monkeypatch.setattr(sphereface2_loss, "CHUNK_COLUMNS", chunk)  # ragged last chunk: 23 = 7·3 + 2
    torch.manual_seed(0)
    shard = None if shard is None else ClassShard(shard[0], shard[1])
    head = SphereFace2(D, n, variant=variant, r=16.0, detach_adjust=detach, sample_rate=rate, shard=shard).double()
    emb, labels = _data(8, b=b, n=n)
    labels[:2] = torch.tensor([5, 9])  # rows whose class lives in the shard (5..15), whatever the draw
    fused, plain = (_loss_and_grads(head, emb, labels, f) for f in (_fused, _plain_autograd))
    for got, want in zip(fused, plain):
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("variant, detach", CASES)
def test_fused_loss_at_cos_plus_and_minus_one_equals_plain_autograd(variant, detach):
    torch.manual_seed(0)
    head = SphereFace2(D, N, variant=variant, r=64.0, detach_adjust=detach).double()
    w = head.weight.detach()
    emb = torch.stack([w[0], -w[1], w[2], -w[3]])
    labels = torch.tensor([0, 1, 4, 5])  # target cos = 1, target cos = -1, a negative at cos = +-1
    fused, plain = (_loss_and_grads(head, emb, labels, f) for f in (_fused, _plain_autograd))
    for got, want in zip(fused, plain):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-10, atol=1e-12)


def test_fused_loss_with_embeddings_shorter_than_normalize_eps_equals_plain_autograd():
    """F.normalize divides by max(|x|, 1e-12), so no gradient flows through the norm of a shorter row."""
    torch.manual_seed(0)
    head = SphereFace2(D, N, r=16.0).double()
    emb, labels = _data(9)
    emb[0] *= 1e-13 / emb[0].norm()
    emb[1] = 0.0
    fused, plain = (_loss_and_grads(head, emb, labels, f) for f in (_fused, _plain_autograd))
    for got, want in zip(fused, plain):
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-10, atol=1e-12)


def test_paper_scale_loss_matches_transcription():
    head = SphereFace2(D, N).double()
    emb, labels = _data(1)
    ref = _reference(emb.numpy(), head.weight.detach().numpy(), head.bias.item(), labels.tolist(),
                     "C", 0.7, 40.0, 0.4, 3.0, 10.0)
    np.testing.assert_allclose(head(emb, labels).per_sample_loss.detach().numpy(), ref, rtol=1e-12)


@pytest.mark.parametrize("variant", ["C", "A", "M"])
def test_gradcheck(variant):
    head = SphereFace2(D, N, variant=variant, r=8.0, detach_adjust=False).double()
    emb, labels = _data(2)
    emb.requires_grad_(True)
    weight = head.weight.detach().clone().requires_grad_(True)
    bias = head.bias.detach().clone().requires_grad_(True)
    loss = lambda e, w, b: torch.func.functional_call(head, {"weight": w, "bias": b}, (e, labels)).loss  # noqa: E731
    assert torch.autograd.gradcheck(loss, (emb, weight, bias))


def test_detach_changes_only_the_gradient():
    emb, labels = _data(3)
    full = SphereFace2(D, N).double()
    detached = SphereFace2(D, N, detach_adjust=True).double()
    detached.load_state_dict(full.state_dict())
    e1, e2 = emb.clone().requires_grad_(True), emb.clone().requires_grad_(True)
    l1, l2 = full(e1, labels).loss, detached(e2, labels).loss
    assert l1.item() == pytest.approx(l2.item(), rel=1e-12)
    l1.backward()
    l2.backward()
    assert not torch.allclose(e1.grad, e2.grad)


@pytest.mark.parametrize("variant", ["C", "A", "M"])
def test_initial_bias_zeroes_its_gradient(variant):
    # Embeddings orthogonal to every centre: all cosines are exactly 0. Built in float64 so b0 is not rounded.
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        head = SphereFace2(N + 2, N, variant=variant)
    finally:
        torch.set_default_dtype(default)
    head.weight.data = torch.eye(N + 2, dtype=torch.float64)[:N]
    emb = torch.eye(N + 2, dtype=torch.float64)[[N, N + 1, N]]
    out = head(emb, torch.tensor([0, 3, 6]))
    out.loss.backward()
    assert abs(head.bias.grad.item()) < 1e-12


def test_initial_bias_values_from_the_spec():
    assert initial_bias("C", 8631, 0.7, 40.0, 0.4, 3.0) == pytest.approx(5.78, abs=0.01)
    assert initial_bias("A", 8631, 0.7, 40.0, 0.5, 3.0) == pytest.approx(21.78, abs=0.01)
    assert initial_bias("M", 8631, 0.7, 40.0, 1.7, 3.0) == pytest.approx(21.78, abs=0.01)
    assert initial_bias("C", 85742, 0.8, 64.0, 0.5, 3.0) == pytest.approx(6.03, abs=0.01)


@pytest.mark.parametrize("variant, detach", CASES)
def test_finite_at_cos_plus_and_minus_one(variant, detach):
    head = SphereFace2(D, N, variant=variant, r=64.0, detach_adjust=detach)
    w = head.weight.detach()
    emb = torch.stack([w[0], -w[1], w[2], -w[3]]).clone().requires_grad_(True)
    out = head(emb, torch.tensor([0, 1, 4, 5]))  # target cos = 1, target cos = -1, a negative at cos = +-1
    out.loss.backward()
    assert torch.isfinite(out.loss)
    for grad in (emb.grad, head.weight.grad, head.bias.grad):
        assert torch.isfinite(grad).all()


def test_fp32_under_autocast():
    head = SphereFace2(D, N)
    emb, labels = _data(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(emb.to(torch.bfloat16), labels)
    assert out.per_sample_loss.dtype == torch.float32 and out.logits_for_metrics is None
    # the bf16 embeddings widened, then every step in fp32: a bf16 step would be off by ~1e-2
    torch.testing.assert_close(out.per_sample_loss, head(emb.to(torch.bfloat16).float(), labels).per_sample_loss)


def _whole_and_parts(variant, split):
    torch.manual_seed(0)
    whole = SphereFace2(D, N, variant=variant, r=10.0).double()
    emb, labels = _data(5)
    parts = []
    for start, end in zip(split, split[1:]):
        head = SphereFace2(D, N, variant=variant, r=10.0, shard=ClassShard(start, end - start)).double()
        head.weight.data.copy_(whole.weight.detach()[start:end])
        parts.append(head)
    return whole, parts, emb, labels


def _run(head, emb, labels):
    e = emb.clone().requires_grad_(True)
    out = head(e, labels)
    out.loss.backward()
    return out, e.grad


@pytest.mark.parametrize("variant", ["C", "M"])
@pytest.mark.parametrize("split", [[0, 4, N], [0, 2, 5, N]])
def test_class_shards_sum_to_the_whole(variant, split):
    whole, parts, emb, labels = _whole_and_parts(variant, split)
    out, emb_grad = _run(whole, emb, labels)
    shard_runs = [_run(p, emb, labels) for p in parts]
    torch.testing.assert_close(sum(o.per_sample_loss for o, _ in shard_runs), out.per_sample_loss)
    torch.testing.assert_close(sum(o.loss for o, _ in shard_runs), out.loss)
    torch.testing.assert_close(sum(g for _, g in shard_runs), emb_grad)
    torch.testing.assert_close(torch.cat([p.weight.grad for p in parts]), whole.weight.grad)
    torch.testing.assert_close(sum(p.bias.grad for p in parts), whole.bias.grad)


SPLIT = [0, 3, N]


def _worker(rank, world, init_file, result_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    whole, _, emb, labels = _whole_and_parts("C", SPLIT)
    start, end = SPLIT[rank], SPLIT[rank + 1]
    head = SphereFace2(D, N, r=10.0, shard=ClassShard(start, end - start, dist.group.WORLD)).double()
    head.weight.data.copy_(whole.weight.detach()[start:end])
    out, emb_grad = _run(head, emb, labels)
    torch.save(
        {"loss": out.loss.detach(), "per_sample": out.per_sample_loss.detach(), "emb_grad": emb_grad,
         "w_grad": head.weight.grad, "b_grad": head.bias.grad, "acc": out.metrics["acc"]},
        os.path.join(result_dir, f"{rank}.pt"),
    )
    shutdown()


def test_two_processes_equal_whole(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    whole, _, emb, labels = _whole_and_parts("C", SPLIT)
    out, emb_grad = _run(whole, emb, labels)
    parts = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    for p in parts:
        torch.testing.assert_close(p["loss"], out.loss.detach())
        torch.testing.assert_close(p["per_sample"], out.per_sample_loss.detach())
        torch.testing.assert_close(p["b_grad"], whole.bias.grad)  # every copy of the shared bias moves alike
        assert p["acc"] == out.metrics["acc"]
    torch.testing.assert_close(parts[0]["emb_grad"] + parts[1]["emb_grad"], emb_grad)
    torch.testing.assert_close(torch.cat([p["w_grad"] for p in parts]), whole.weight.grad)


def test_negative_sampling_is_unbiased():
    n, rate = 40, 0.25
    emb, labels = _data(6, b=4, n=n)
    full = SphereFace2(D, n, r=10.0).double()
    sampled = SphereFace2(D, n, r=10.0, sample_rate=rate).double()
    sampled.load_state_dict(full.state_dict())
    torch.manual_seed(0)
    kept = len(set(labels.tolist()))
    sampled(emb, labels)
    assert sampled.sampled_blocks()["weight"].block.shape == (kept + math.ceil(rate * (n - kept)), D)
    draws = torch.stack([sampled(emb, labels).per_sample_loss.detach() for _ in range(2000)])
    mean, stderr = draws.mean(0), draws.std(0) / math.sqrt(len(draws))
    assert (stderr > 0).all()
    assert ((mean - full(emb, labels).per_sample_loss.detach()).abs() < 4 * stderr).all()
    sampled.eval()  # no sampling outside training
    torch.testing.assert_close(sampled(emb, labels).loss, full(emb, labels).loss)


def test_contract_registry_and_weight_decay_groups():
    head = build_head("sphereface2", D, N, variant="A")
    assert isinstance(head, SphereFace2) and head.m == 0.5 and head.detach_adjust
    assert build_head("sphereface2", D, N, variant="M").m == 1.7
    assert build_head("sphereface2", D, N).m == 0.4 and not build_head("sphereface2", D, N).detach_adjust
    assert head.weight.shape == (N, D) and head.bias.shape == ()
    out = head(torch.randn(B, D), torch.randint(0, N, (B,)))
    assert out.per_sample_loss.shape == (B,) and {"acc", "bias"} <= set(out.metrics)
    groups = param_groups(torch.nn.Linear(2, 2), head, 5e-4)
    assert [p is head.bias for p in groups[1]["params"]] == [True] and groups[1]["weight_decay"] == 0.0
    with pytest.raises(ConfigError, match="scale"):
        build_head("sphereface2", D, N, scale=30.0)
    for bad in ({"variant": "B"}, {"lam": 1.0}, {"sample_rate": 0.0}, {"r": -1.0}, {"t": 0.0}, {"lw": -2.0}):
        key = next(iter(bad))
        with pytest.raises(ConfigError, match=f"head.{key} "):
            SphereFace2(D, N, **bad)
    with pytest.raises(ConfigError, match="2 classes"):
        SphereFace2(D, 1)


def test_training_decreases_the_loss(tiny_config):
    from faceforge.engine.trainer import Trainer  # here, so that the spawned workers above import less

    cfg = tiny_config(train={"max_steps": 20, "run_name": "sf2"})
    cfg.head = {"name": "sphereface2", "lam": 0.7, "r": 40.0, "m": 0.4, "t": 3.0}  # replace, not merge with arcface's
    summary = Trainer(cfg).fit()
    rows = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "event" not in r]
    assert len(losses) == 20 and all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
