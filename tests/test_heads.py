"""Margin heads against a float64 transcription of their formulas, gradient checks, and the contract."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from faceforge.errors import ConfigError
from faceforge.heads import ArcFace, CombinedMargin, CosFace, Softmax, build_head
from faceforge.heads.base import softmax_cross_entropy

B, D, N = 6, 5, 7


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(B, D, generator=g, dtype=torch.float64)
    labels = torch.randint(0, N, (B,), generator=g)
    return emb, labels


def _reference_loss(emb, weight, labels, s, m1, m2, m3):
    """Per-sample loss written from the paper formula, element by element in float64 numpy."""
    x = emb.detach().numpy()
    w = weight.detach().numpy()
    out = []
    for i in range(len(x)):
        cos = [float(x[i] @ w[j] / (np.linalg.norm(x[i]) * np.linalg.norm(w[j]))) for j in range(len(w))]
        y = int(labels[i])
        theta = math.acos(cos[y])
        target = s * (math.cos(m1 * theta + m2) - m3)
        others = [s * cos[j] for j in range(len(w)) if j != y]
        denom = math.exp(target) + sum(math.exp(o) for o in others)
        out.append(-math.log(math.exp(target) / denom))
    return np.array(out)


@pytest.mark.parametrize(
    "make, margins",
    [
        (lambda: ArcFace(D, N, s=8.0, m=0.5), (1.0, 0.5, 0.0)),
        (lambda: CosFace(D, N, s=8.0, m=0.35), (1.0, 0.0, 0.35)),
        (lambda: CombinedMargin(D, N, s=8.0, m1=1.2, m2=0.2, m3=0.1), (1.2, 0.2, 0.1)),
    ],
)
def test_margin_heads_match_formula_and_gradcheck(make, margins):
    head = make().double()
    emb, labels = _data()
    out = head(emb, labels)
    ref = _reference_loss(emb, head.weight, labels, head.s, *margins)
    np.testing.assert_allclose(out.per_sample_loss.detach().numpy(), ref, rtol=1e-10, atol=1e-10)
    assert out.loss.item() == pytest.approx(ref.mean(), rel=1e-10)
    emb.requires_grad_(True)
    weight = head.weight.detach().clone().requires_grad_(True)
    loss = lambda e, w: torch.func.functional_call(head, {"weight": w}, (e, labels)).loss  # noqa: E731
    assert torch.autograd.gradcheck(loss, (emb, weight))


def test_softmax_matches_plain_cross_entropy():
    head = Softmax(D, N).double()
    emb, labels = _data(1)
    out = head(emb, labels)
    logits = emb.numpy() @ head.weight.detach().numpy().T
    ref = -logits[np.arange(B), labels.numpy()] + np.log(np.exp(logits).sum(1))
    np.testing.assert_allclose(out.per_sample_loss.detach().numpy(), ref, rtol=1e-12)
    emb.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda e: head(e, labels).loss, (emb,))


def test_arcface_never_nan_at_cos_one():
    head = ArcFace(D, N, s=64.0, m=0.5)
    emb = head.weight.detach()[:3].clone().requires_grad_(True)  # cos = 1 exactly with the target centre
    out = head(emb, torch.tensor([0, 1, 2]))
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(emb.grad).all()


def test_straight_through_changes_only_the_gradient():
    emb, labels = _data(2)
    exact = ArcFace(D, N, s=8.0, m=0.5).double()
    st = ArcFace(D, N, s=8.0, m=0.5, straight_through=True).double()
    st.load_state_dict(exact.state_dict())
    e1, e2 = emb.clone().requires_grad_(True), emb.clone().requires_grad_(True)
    l1, l2 = exact(e1, labels).loss, st(e2, labels).loss
    assert l1.item() == pytest.approx(l2.item(), rel=1e-12)
    l1.backward()
    l2.backward()
    assert not torch.allclose(e1.grad, e2.grad)
    # Straight-through: the gradient is that of logits s*cos + a constant shift at the target.
    cos = torch.nn.functional.normalize(emb, dim=1) @ torch.nn.functional.normalize(st.weight.detach(), dim=1).T
    shift = torch.zeros_like(cos)
    theta = torch.acos(cos[torch.arange(B), labels])
    shift[torch.arange(B), labels] = torch.cos(theta + 0.5) - cos[torch.arange(B), labels]
    e3 = emb.clone().requires_grad_(True)
    cos3 = torch.nn.functional.normalize(e3, dim=1) @ torch.nn.functional.normalize(st.weight.detach(), dim=1).T
    torch.nn.functional.cross_entropy(8.0 * (cos3 + shift.detach()), labels).backward()
    torch.testing.assert_close(e2.grad, e3.grad)


def test_margin_warmup_ramps_from_zero():
    emb, labels = _data(3)
    head = ArcFace(D, N, s=8.0, m=0.5, margin_warmup=0.2).double()
    plain = CombinedMargin(D, N, s=8.0, m1=1.0, m2=0.0, m3=0.0).double()
    plain.load_state_dict(head.state_dict())
    full = ArcFace(D, N, s=8.0, m=0.5).double()
    full.load_state_dict(head.state_dict())
    head.set_progress(0.0)
    assert head(emb, labels).loss.item() == pytest.approx(plain(emb, labels).loss.item(), rel=1e-12)
    head.set_progress(0.1)
    assert head.margins()[1] == pytest.approx(0.25)
    head.set_progress(0.5)
    assert head(emb, labels).loss.item() == pytest.approx(full(emb, labels).loss.item(), rel=1e-12)


def test_fp32_logits_under_autocast():
    head = ArcFace(D, N)
    emb, labels = _data(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(emb.to(torch.bfloat16), labels)
    assert out.per_sample_loss.dtype == torch.float32 and out.softmax.entropy().dtype == torch.float32
    assert out.logits_for_metrics is None  # nothing [B, C] outlives the step
    # Full fp32 inside: the bf16 embeddings get the fp32 loss of the same values (a bf16 matmul is ~1e-2 off).
    torch.testing.assert_close(out.per_sample_loss, head(emb.to(torch.bfloat16).float(), labels).per_sample_loss)


def test_contract_and_registry():
    head = build_head("arcface", D, N, m=0.3)
    assert isinstance(head, ArcFace) and head.weight.shape == (N, D)
    out = head(torch.randn(B, D), torch.randint(0, N, (B,)))
    assert out.per_sample_loss.shape == (B,) and "acc" in out.metrics
    with pytest.raises(ConfigError, match="unknown head 'arcfce'"):
        build_head("arcfce", D, N)
    with pytest.raises(ConfigError, match="margin"):
        build_head("arcface", D, N, margin=0.3)
    with pytest.raises(ValueError, match="embeddings"):
        head(torch.randn(B, D + 1), torch.zeros(B, dtype=torch.long))


@pytest.mark.parametrize("name,bad,key", [
    ("arcface", {"m": 4.0}, "head.m"),
    ("arcface", {"s": 0.0}, "head.s"),
    ("cosface", {"margin_warmup": 1.5}, "head.margin_warmup"),
    ("softmax", {"sample_rate": 0.0}, "head.sample_rate"),
    ("combined", {"sample_rate": 1.5}, "head.sample_rate"),
])
def test_bad_values_raise_config_error_naming_the_key(name, bad, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_head(name, D, N, **bad)


def test_softmax_view_matches_torch_softmax():
    torch.manual_seed(0)
    head = ArcFace(8, 5, s=10.0, m=0.2).double()
    x, y = torch.randn(6, 8, dtype=torch.float64), torch.randint(0, 5, (6,))
    out = head(x, y)
    logits = head.logits(x, y).detach()
    p = torch.softmax(logits, dim=1)
    assert torch.allclose(out.softmax.target_prob(), p.gather(1, y[:, None]).squeeze(1))
    assert torch.allclose(out.softmax.entropy(), -(p * p.log()).sum(dim=1))
    assert all(t.shape == (6,) and not t.requires_grad for t in vars(out.softmax).values())  # rows, not logits
    extra = torch.randn(6, 2, dtype=torch.float64)
    full_logits = torch.cat([logits, extra], dim=1)
    full = torch.softmax(full_logits, dim=1)
    merged = softmax_cross_entropy(*head.rows(x, y), extra)
    assert torch.allclose(merged.softmax.entropy(), -(full * full.log()).sum(dim=1))
    assert torch.allclose(merged.softmax.target_prob(), full.gather(1, y[:, None]).squeeze(1))
    torch.testing.assert_close(merged.per_sample_loss, F.cross_entropy(full_logits, y, reduction="none"))


def test_sampled_softmax_keeps_positives_and_trains_on_the_sample_only():
    torch.manual_seed(0)
    head = ArcFace(8, 200, s=10.0, m=0.2, sample_rate=0.1).double()
    x, y = torch.randn(6, 8, dtype=torch.float64), torch.tensor([3, 3, 50, 120, 7, 199])
    out = head(x, y)
    rows = head.sampled_class_rows()["weight"]
    assert set(y.tolist()) <= set(rows.tolist()) and len(rows) == 6 - 1 + math.ceil(0.1 * (200 - 5))
    sub = head.weight[rows].detach()
    mapped = torch.searchsorted(rows, y)
    cos = F.normalize(x, dim=1) @ F.normalize(sub, dim=1).t()
    target = torch.cos(torch.acos(cos.gather(1, mapped[:, None])) + 0.2)
    logits = 10.0 * cos.scatter(1, mapped[:, None], target)
    torch.testing.assert_close(out.loss, F.cross_entropy(logits, mapped))
    out.loss.backward()
    # Only the sampled rows get a gradient, on their own block: the [200, 8] centres get none at all.
    block = head.sampled_blocks()["weight"].block
    assert head.weight.grad is None and block.grad.shape == (len(rows), 8) and block.grad.abs().sum() > 0
    head.eval()
    head(x, y)
    assert head.sampled_class_rows() == {}


def test_registered_heads_and_wrappers_are_listed():
    from faceforge.heads import SoftmaxHead, list_head_wrappers, list_heads

    assert {"arcface", "cosface", "combined", "softmax", "sphereface2", "gif"} <= set(list_heads())
    assert list_heads() == sorted(list_heads()) and "unpg" not in list_heads()
    assert list_head_wrappers() == ["unpg"]
    # The softmax family declares the interface UNPG and SDE rely on; the others declare no softmax view.
    for name in ("arcface", "cosface", "combined", "softmax"):
        head = build_head(name, D, N)
        assert isinstance(head, SoftmaxHead) and head.gives_softmax
    assert not build_head("sphereface2", D, N).gives_softmax
    assert build_head("softmax", D, N).s == 1.0 and build_head("arcface", D, N, s=32.0).s == 32.0


def test_wrapper_tables_name_the_key():
    with pytest.raises(ConfigError, match=r"head\.unpg\.k must be a number"):
        build_head("arcface", D, N, unpg={"k": "wide"})
    with pytest.raises(ConfigError, match=r"head\.unpg\.q: unknown key; known: k"):
        build_head("arcface", D, N, unpg={"q": 1.0})


def test_one_rule_for_per_class_rows():
    from faceforge.heads.base import is_class_rows

    w = torch.zeros(4, 3)
    assert is_class_rows(torch.zeros(4, 3), w) and is_class_rows(torch.zeros(10, 3), w, rows=10)
    assert not is_class_rows(torch.zeros(10, 3), w)  # a whole tensor is not this shard's rows
    assert not is_class_rows(torch.zeros(4, 2), w) and not is_class_rows(torch.zeros(4), w)
    assert not is_class_rows(torch.tensor(3.0), w) and not is_class_rows(3.0, w)  # AdamW's step
