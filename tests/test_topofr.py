"""TopoFR: alignment losses and SDE weights against float64 transcriptions, the EM fit, the perturbation ops,
head compatibility and a short training run."""

import colorsys
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import correlate1d
from scipy.sparse.csgraph import minimum_spanning_tree
from scipy.spatial.distance import cdist

from faceforge.engine.trainer import Trainer
from faceforge.errors import ConfigError
from faceforge.heads import ArcFace, CosFace, SphereFace2, build_head
from faceforge.regularizers import TopoFR
from faceforge.regularizers.rsp import (
    color_jitter, draw_erase_boxes, erase, gaussian_blur, random_structure_perturbation,
)
from faceforge.regularizers.sde import fit_gauss_uniform, sde_weights
from faceforge.regularizers.topofr import alignment_loss, input_distances


def _mst(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    tree = minimum_spanning_tree(d).tocoo()
    return tree.row, tree.col


def _reference_loss(x: np.ndarray, z: np.ndarray, mode: str, scale) -> float:
    """Eq. 2 / the official sorted-edge loss written out in float64 on scipy's MST edges."""
    rx, cx = _mst(x)
    rz, cz = _mst(z)
    if mode == "paper":
        a = np.concatenate([x[rx, cx], x[rz, cz]])
        b = np.concatenate([z[rx, cx], z[rz, cz]])
    else:
        a, b = np.sort(x[rx, cx]), np.sort(z[rz, cz])
    if scale == "fit":
        scale = np.linalg.lstsq(b[:, None], a, rcond=None)[0][0]
    if mode == "paper":
        n = len(rx)
        return 0.5 * (np.sum((a[:n] - scale * b[:n]) ** 2) + np.sum((scale * b[n:] - a[n:]) ** 2))
    return np.sum((a - scale * b) ** 2) / len(x)


def _clouds(seed: int, b: int = 24) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return cdist(*[rng.uniform(0, 1, (b, 40))] * 2), rng.normal(size=(b, 8))


@pytest.mark.parametrize("mode", ["paper", "official"])
@pytest.mark.parametrize("scale", [1.0, 0.3, "fit"])
def test_alignment_loss_matches_float64_transcription(mode, scale):
    x, z_points = _clouds(1)
    z = cdist(z_points, z_points)
    got = alignment_loss(torch.from_numpy(x), torch.from_numpy(z), mode, scale)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(_reference_loss(x, z, mode, scale), rel=1e-10)
    if scale == "fit":  # the fitted scale minimises the loss over all scales
        for s in (0.9, 1.1):
            assert got.item() < alignment_loss(torch.from_numpy(x), torch.from_numpy(z) * s, mode, 1.0).item()


@pytest.mark.parametrize("mode", ["paper", "official"])
@pytest.mark.parametrize("scale", [1.0, "fit"])
def test_alignment_loss_gradcheck(mode, scale):
    x, z_points = _clouds(2, b=12)
    x = torch.from_numpy(x)
    z = torch.from_numpy(z_points).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p: alignment_loss(x, torch.cdist(p, p), mode, scale), (z,))


def test_input_distances_normalised_and_layout_free():
    images = torch.rand(5, 3, 8, 6, dtype=torch.float64) * 2 - 1
    flat = images.reshape(5, -1).numpy()
    expected = cdist(flat, flat) / math.sqrt(4 * 3 * 8 * 6)
    np.testing.assert_allclose(input_distances(images).numpy(), expected, atol=1e-12)
    np.testing.assert_allclose(
        input_distances(images.contiguous(memory_format=torch.channels_last)).numpy(), expected, atol=1e-12)
    corners = torch.stack([torch.ones(3, 8, 6), -torch.ones(3, 8, 6)])
    assert input_distances(corners)[0, 1].item() == pytest.approx(1.0)


def _step_inputs(head, b=16, dim=16, classes=10, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(b, 3, 16, 16, generator=g, dtype=dtype) * 2 - 1
    labels = torch.randint(0, classes, (b,), generator=g)
    embeddings = torch.randn(b, dim, generator=g, dtype=dtype).requires_grad_(True)
    return {"images": images, "inputs": images, "labels": labels}, embeddings, head(embeddings, labels)


def test_gradient_reaches_embeddings_not_clean_input():
    head = ArcFace(16, 10)
    batch, embeddings, out = _step_inputs(head)
    batch["images"].requires_grad_(True)
    reg = TopoFR(alpha=0.1, sde=False)
    r = reg(batch, embeddings, out)
    assert r.sample_weights is None and r.loss.dtype == torch.float32
    r.loss.backward()
    assert batch["images"].grad is None
    assert torch.isfinite(embeddings.grad).all() and embeddings.grad.abs().sum() > 0
    assert r.metrics["topo"] == pytest.approx(r.loss.item() / 0.1, rel=1e-6)


def test_loss_stays_fp32_under_autocast():
    head = ArcFace(16, 10)
    batch, embeddings, out = _step_inputs(head)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = TopoFR(sde=False)(batch, embeddings.to(torch.bfloat16), out)
    assert r.loss.dtype == torch.float32


def _planted(rng, n, pi, sigma, omega):
    k = int(pi * n)
    return np.concatenate([rng.normal(0, sigma, k), rng.uniform(-omega, omega, n - k)]), k


def test_em_recovers_planted_mixtures_batched():
    rng = np.random.default_rng(0)
    params = [(0.7, 1.0, 6.0), (0.5, 2.0, 10.0)]
    samples = [_planted(rng, 4000, *p) for p in params]
    fit = fit_gauss_uniform(torch.tensor(np.stack([s for s, _ in samples])))
    for g, ((pi, sigma, omega), (x, k)) in enumerate(zip(params, samples)):
        assert fit.pi[g].item() == pytest.approx(pi, abs=0.03)
        assert fit.var[g].item() == pytest.approx(sigma**2, rel=0.1)
        assert fit.half_width[g].item() == pytest.approx(omega, rel=0.1)
        gauss = pi * np.exp(-0.5 * (x / sigma) ** 2) / (sigma * np.sqrt(2 * np.pi))
        true_hard = 1 - gauss / (gauss + (1 - pi) / (2 * omega))
        assert np.abs(fit.hard[g].numpy() - true_hard).max() < 0.05


def _reference_em(x: np.ndarray, iters: int) -> np.ndarray:
    """The EM of sde.fit_gauss_uniform written out in float64 with explicit densities."""
    pi, var, omega = 0.5, np.mean(x**2), np.abs(x).max()

    def easy(pi, var, omega):
        gauss = pi * np.exp(-(x**2) / (2 * var)) / np.sqrt(2 * np.pi * var)
        return gauss / (gauss + (1 - pi) / (2 * omega))

    for _ in range(iters):
        g = easy(pi, var, omega)
        h = 1 - g
        pi, var = g.mean(), np.sum(g * x**2) / np.sum(g)
        eta1, eta2 = np.sum(h * x) / np.sum(h), np.sum(h * x**2) / np.sum(h)
        omega = np.sqrt(3 * (eta2 - eta1**2))
    return 1 - easy(pi, var, omega)


def _entropy_like(n, seed):
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.gamma(1.0, 0.3, n - n // 4), rng.uniform(0, 6, n // 4)])


def test_em_matches_float64_transcription():
    x = _entropy_like(128, 1)
    x[::2] *= -1
    x = (x - x.mean()) / x.std()
    fit = fit_gauss_uniform(torch.from_numpy(x), iters=40)
    np.testing.assert_allclose(fit.hard.numpy(), _reference_em(x, 40), atol=1e-9)


@pytest.mark.parametrize("lam", [1.0, 2.0])
def test_sde_weights_match_transcription(lam):
    head = ArcFace(16, 10, s=16.0, m=0.3).double()
    batch, embeddings, out = _step_inputs(head, b=32, dtype=torch.float64)
    weights, fit = sde_weights(out.softmax, lam, "alternate", iters=30)
    assert not weights.requires_grad and weights.dtype == torch.float64
    logits = head.logits(embeddings, batch["labels"]).detach().numpy()
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    entropy = -np.sum(p * np.log(p), axis=1)
    entropy[::2] *= -1
    x = (entropy - entropy.mean()) / entropy.std()
    p_gt = p[np.arange(32), batch["labels"].numpy()]
    expected = (1 + _reference_em(x, 30)) ** lam * (1 - p_gt)
    np.testing.assert_allclose(weights.numpy(), expected, rtol=1e-8, atol=1e-10)


def test_topofr_returns_sde_weights_and_metrics():
    head = CosFace(16, 10)
    batch, embeddings, out = _step_inputs(head)
    r = TopoFR()(batch, embeddings, out)
    assert r.sample_weights.shape == (16,) and bool((r.sample_weights >= 0).all() & (r.sample_weights <= 2).all())
    assert set(r.metrics) == {"topo", "sde_pi", "sde_hard", "sde_weight", "rsp_frac"}


def test_heads_without_softmax_need_sde_off():
    with pytest.raises(ConfigError, match="sde=true needs a softmax-family head"):
        TopoFR().bind(SphereFace2(16, 10))
    head = SphereFace2(16, 10)
    reg = TopoFR(sde=False)
    reg.bind(head)
    batch, embeddings, out = _step_inputs(head)
    assert reg(batch, embeddings, out).sample_weights is None
    unpg = build_head("arcface", 16, 10, unpg={"k": 1.5})
    TopoFR().bind(unpg)
    batch, embeddings, out = _step_inputs(unpg)
    assert torch.isfinite(TopoFR()(batch, embeddings, out).sample_weights).all()
    for bad in ({"loss": "w2"}, {"xi": 1.5}, {"latent_scale": "learned"}, {"sde_sign": "odd"}):
        with pytest.raises(ConfigError, match="regularizer topofr"):
            TopoFR(**bad)


def test_perturbation_never_touches_clean_batch():
    images = (torch.rand(64, 3, 20, 20) * 2 - 1).contiguous(memory_format=torch.channels_last)
    clean = images.clone()
    out, op = random_structure_perturbation(images, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(images, clean) and out.data_ptr() != images.data_ptr()
    assert out.shape == images.shape and out.is_contiguous(memory_format=torch.channels_last)
    assert bool((op >= 0).all()) and set(op.tolist()) == {0, 1, 2, 3}
    assert bool((out != clean).flatten(1).any(dim=1).all())  # every op changes a noise image
    assert out.min() >= -1 and out.max() <= 1
    same, op = random_structure_perturbation(images, 0.0)
    assert torch.equal(same, clean) and bool((op == -1).all())


def test_perturbation_rate_is_xi():
    _, op = random_structure_perturbation(torch.zeros(4000, 3, 8, 8), 0.2, torch.Generator().manual_seed(1))
    assert (op >= 0).float().mean().item() == pytest.approx(0.2, abs=0.025)
    assert np.bincount(op[op >= 0].numpy(), minlength=4).min() > 150


def test_blur_matches_scipy_mirror_correlation():
    x = torch.rand(2, 3, 12, 10, dtype=torch.float64)
    sigma = torch.tensor([0.7, 3.0], dtype=torch.float64)
    got = gaussian_blur(x, sigma).numpy()
    for i, s in enumerate(sigma.tolist()):
        expected = x[i].numpy()
        for axis, size in ((2, 5), (1, 9)):
            t = np.arange(size) - (size - 1) / 2
            taps = np.exp(-0.5 * (t / s) ** 2)
            expected = correlate1d(expected, taps / taps.sum(), axis=axis, mode="mirror")
        np.testing.assert_allclose(got[i], expected, atol=1e-12)


def _jitter_reference(img: np.ndarray, factors, order) -> np.ndarray:
    """torchvision's ColorJitter on one [3, H, W] image in [0, 1], hue via colorsys."""
    gray = lambda y: 0.2989 * y[0] + 0.587 * y[1] + 0.114 * y[2]  # noqa: E731
    b, c, s, h = factors
    for k in order:
        if k == 0:
            img = np.clip(b * img, 0, 1)
        elif k == 1:
            img = np.clip(c * img + (1 - c) * gray(img).mean(), 0, 1)
        elif k == 2:
            img = np.clip(s * img + (1 - s) * gray(img)[None], 0, 1)
        else:
            flat = img.reshape(3, -1).T
            shifted = [colorsys.hsv_to_rgb((hh + h) % 1.0, ss, vv) for hh, ss, vv in
                       (colorsys.rgb_to_hsv(*px) for px in flat)]
            img = np.asarray(shifted).T.reshape(img.shape)
    return img


def test_color_jitter_matches_transcription():
    x = torch.rand(3, 3, 5, 4, dtype=torch.float64)
    factors = torch.tensor([[0.3, 0.5, 0.25, 0.2], [0.45, 0.35, 0.4, -0.08], [0.1, 0.6, 0.2, 0.3]], dtype=torch.float64)
    order = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]])
    got = color_jitter(x, factors, order).numpy()
    for i in range(3):
        expected = _jitter_reference(x[i].numpy(), factors[i].tolist(), order[i].tolist())
        np.testing.assert_allclose(got[i], expected, atol=1e-12)


def test_erase_boxes_follow_timm_ranges():
    boxes = draw_erase_boxes(500, 112, 112, torch.Generator().manual_seed(0))
    top, left, h, w = boxes.unbind(dim=1)
    assert bool((h > 0).all() & (h < 112).all() & (w < 112).all())
    assert bool((top + h <= 112).all() & (left + w <= 112).all() & (top >= 0).all() & (left >= 0).all())
    area = (h * w).double() / 112**2
    assert area.min() > 0.015 and area.max() < 0.36
    x = torch.ones(1, 3, 10, 10)
    erased = erase(x, torch.tensor([[2, 3, 4, 5]]))
    assert erased.sum().item() == 3 * (100 - 20) and erased[0, :, 2:6, 3:8].abs().sum() == 0


def test_short_training_run_with_topofr(tiny_config):
    summary = Trainer(tiny_config(regularizers=[{"name": "topofr"}], train={"run_name": "topo"})).fit(until_step=3)
    lines = [json.loads(x) for x in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "event" not in r and "topo" in r]
    assert len(steps) == 3 and all(math.isfinite(r["loss"]) and r["topo"] >= 0 for r in steps)


def test_sde_with_a_head_that_gives_no_softmax_fails_at_bind():
    from faceforge.heads import GIF

    gif = GIF(16, codes=torch.randint(0, 4, (10, 2)))  # its token heads are CosFace modules, it is not one
    with pytest.raises(ConfigError, match="sde=true needs a softmax-family head"):
        TopoFR().bind(gif)
    TopoFR(sde=False).bind(gif)
