"""Verification protocol, TAR@FAR readings, embedding with flip fusion and run reports."""

import io
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import accuracy_score, roc_auc_score, roc_curve
from sklearn.model_selection import KFold

from faceforge.data.images import decode_image
from faceforge.eval.metrics import roc, roc_auc, tar_at_far
from faceforge.eval.report import image_link, plot_roc, plot_training_curves, write_report
from faceforge.eval.verification import (
    VerificationSet,
    _kfold_threshold_accuracy,
    cosine_scores,
    embed_images,
    evaluate_bin,
    evaluate_pairs,
    pixel_embeddings,
)

GRID = np.arange(0, 4, 0.01)


def reference_kfold(dist: np.ndarray, issame: np.ndarray) -> tuple[list[float], list[float]]:
    """Plain loop version of the InsightFace protocol on precomputed squared distances."""
    accuracies, thresholds = [], []
    for train, test in KFold(n_splits=10, shuffle=False).split(dist):
        train_acc = [np.mean(issame[train] == (dist[train] < t)) for t in GRID]
        best = GRID[int(np.argmax(train_acc))]
        accuracies.append(accuracy_score(issame[test], dist[test] < best))
        thresholds.append(best)
    return accuracies, thresholds


def noisy_pairs(n: int, dim: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    issame = rng.random(n) < 0.5
    emb1 = rng.normal(size=(n, dim))
    emb2 = np.where(issame[:, None], emb1 + noise * rng.normal(size=(n, dim)), rng.normal(size=(n, dim)))
    return emb1 * rng.uniform(0.5, 3, size=(n, 1)), emb2, issame


def test_evaluate_pairs_matches_loop_reference():
    emb1, emb2, issame = noisy_pairs(1003, 16, noise=1.0, seed=0)
    result = evaluate_pairs(emb1, emb2, issame)

    a = emb1 / np.linalg.norm(emb1, axis=1, keepdims=True)
    b = emb2 / np.linalg.norm(emb2, axis=1, keepdims=True)
    dist = np.sum((a - b) ** 2, axis=1)
    cosine = np.sum(a * b, axis=1)
    accuracies, thresholds = reference_kfold(dist, issame)
    assert 0.7 < result["accuracy"] < 0.99
    np.testing.assert_allclose(result["fold_accuracies"], accuracies, rtol=0, atol=1e-12)
    assert result["accuracy"] == pytest.approx(np.mean(accuracies))
    assert result["accuracy_std"] == pytest.approx(np.std(accuracies))
    assert result["threshold"] == pytest.approx(np.mean(thresholds))
    assert result["auc"] == pytest.approx(roc_auc_score(issame, cosine))
    fpr, tpr, _ = roc_curve(issame, cosine)
    for far in (1e-3, 1e-2):
        assert result["tar_at_far"][far] == pytest.approx(np.interp(far, fpr, tpr))
    optimistic = max(accuracy_score(issame, cosine >= t) for t in np.unique(cosine))
    assert result["best_threshold_accuracy"] == pytest.approx(optimistic)
    assert result["best_threshold_accuracy"] >= result["accuracy"]


def test_threshold_sweep_handles_distances_on_the_grid():
    rng = np.random.default_rng(1)
    issame = rng.random(997) < 0.5
    steps = np.where(issame, rng.integers(0, 150, 997), rng.integers(90, 300, 997))
    dist = GRID[steps]  # exactly equal to grid thresholds: `dist < t` must be strict
    accuracies, thresholds = reference_kfold(dist, issame)
    fold_acc, chosen = _kfold_threshold_accuracy(dist, issame, 10)
    np.testing.assert_allclose(fold_acc, accuracies, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(chosen, thresholds)


def test_separable_and_random_pairs():
    rng = np.random.default_rng(2)
    emb1 = rng.normal(size=(600, 32))
    issame = np.arange(600) % 2 == 0
    emb2 = np.where(issame[:, None], emb1, -emb1)  # genuine distance 0, impostor distance 4
    perfect = evaluate_pairs(emb1, emb2, issame)
    assert perfect["accuracy"] == 1.0 and perfect["accuracy_std"] == 0.0
    assert perfect["threshold"] == pytest.approx(0.01)  # first threshold with full training accuracy
    assert perfect["auc"] == 1.0 and perfect["best_threshold_accuracy"] == 1.0
    assert perfect["tar_at_far"] == {1e-3: 1.0, 1e-2: 1.0}

    chance = evaluate_pairs(rng.normal(size=(2000, 32)), rng.normal(size=(2000, 32)), rng.random(2000) < 0.5)
    assert chance["accuracy"] == pytest.approx(0.5, abs=0.06)
    assert chance["auc"] == pytest.approx(0.5, abs=0.06)
    assert len(chance["fold_accuracies"]) == 10


def test_evaluate_pairs_accepts_torch_and_rejects_bad_shapes():
    emb1, emb2, issame = noisy_pairs(200, 8, noise=0.8, seed=3)
    from_numpy = evaluate_pairs(emb1, emb2, issame)
    from_torch = evaluate_pairs(torch.from_numpy(emb1), torch.from_numpy(emb2), torch.from_numpy(issame))
    assert from_torch == from_numpy
    with pytest.raises(ValueError):
        evaluate_pairs(emb1, emb2[:, :4], issame)
    with pytest.raises(ValueError):
        evaluate_pairs(emb1, emb2, issame[:-1])


def test_tar_at_far_readings():
    # ROC corners: (0, 1/3) (1/4, 1/3) (1/4, 2/3) (1/2, 2/3) (1/2, 1) ... ; 4 impostors.
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])
    labels = np.array([1, 0, 1, 0, 1, 0, 0])
    interpolated = tar_at_far(scores, labels, [0.1, 0.2, 0.25, 0.4])
    nearest = tar_at_far(scores, labels, [0.1, 0.2, 0.25, 0.4], mode="nearest")
    assert interpolated == pytest.approx({0.1: 1 / 3, 0.2: 1 / 3, 0.25: 2 / 3, 0.4: 2 / 3})
    # Nearest reads the point at FAR 1/4 for a 0.2 target (above the target), and the highest TPR there.
    assert nearest == pytest.approx({0.1: 1 / 3, 0.2: 2 / 3, 0.25: 2 / 3, 0.4: 1.0})
    # Below 1 / num_impostors both still answer: the TPR at zero false accepts here.
    assert tar_at_far(scores, labels, [1e-6])[1e-6] == pytest.approx(1 / 3)
    assert tar_at_far(scores, labels, [1e-6], mode="nearest")[1e-6] == pytest.approx(1 / 3)
    assert roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores))


def test_interpolation_on_tied_scores_and_agreement_with_np_interp():
    # One genuine and one impostor with the same score: the ROC is the diagonal (0, 0) -> (1, 1).
    tied = tar_at_far([0.5, 0.5], [1, 0], [0.3])
    assert tied[0.3] == pytest.approx(0.3)
    assert tar_at_far([0.5, 0.5], [1, 0], [0.3], mode="nearest")[0.3] == 0.0

    rng = np.random.default_rng(4)
    labels = rng.random(5000) < 0.3
    scores = np.round(rng.normal(labels.astype(float), 1.0), 2)  # rounded: many ties
    fpr, tpr, _ = roc_curve(labels, scores)
    fars = np.logspace(-4, 0, 30)
    ours = tar_at_far(scores, labels, fars)
    np.testing.assert_allclose(list(ours.values()), np.interp(fars, fpr, tpr), atol=1e-12)
    with pytest.raises(ValueError):
        tar_at_far(scores, labels, [1e-3], mode="closest")
    with pytest.raises(ValueError):
        tar_at_far(scores, np.ones_like(labels), [1e-3])


class TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, kernel_size=8, stride=8)
        self.bn = torch.nn.BatchNorm2d(4)
        self.drop = torch.nn.Dropout(0.5)
        self.fc = torch.nn.Linear(4 * 14 * 14, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.bn(self.conv(x)).flatten(1)))


def manual_embeddings(model: torch.nn.Module, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        return model(x), model(x.flip(3))


def test_embed_images_flip_fusion():
    torch.manual_seed(0)
    model = TinyNet()
    model.bn.running_mean.uniform_(-0.5, 0.5)
    model.train()
    images = np.random.default_rng(5).integers(0, 256, size=(5, 112, 112, 3), dtype=np.uint8)

    fused = embed_images(model, images, batch_size=2)
    assert model.training
    model.eval()
    original, mirrored = manual_embeddings(model, images)
    assert fused.dtype == np.float32 and fused.shape == (5, 8)
    np.testing.assert_allclose(fused, (original + mirrored).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(embed_images(model, images, flip=False), original.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(embed_images(model, list(images), batch_size=3), fused, rtol=1e-5, atol=1e-5)
    assert not model.training
    with pytest.raises(ValueError):
        embed_images(model, images.astype(np.float32))


def test_pixel_embeddings_range():
    images = np.array([np.zeros((4, 4, 3)), np.full((4, 4, 3), 255)], dtype=np.uint8)
    pixels = pixel_embeddings(images)
    assert pixels.dtype == np.float32 and pixels.shape == (2, 48)
    assert pixels.min() == -1.0 and pixels.max() == 1.0


def jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def test_evaluate_bin_on_a_small_bin_file(tmp_path):
    rng = np.random.default_rng(6)
    sizes = [112] * 36 + [128] * 4  # a few need resizing, as in some third-party .bin files
    images = [rng.integers(0, 256, size=(s, s, 3), dtype=np.uint8) for s in sizes]
    issame = [bool(i % 2) for i in range(20)]
    blobs = [jpeg(image) for image in images]
    path = tmp_path / "tiny.bin"
    path.write_bytes(pickle.dumps((blobs, issame)))
    torch.manual_seed(1)
    model = TinyNet()

    result = evaluate_bin(model, path, batch_size=16)

    decoded = [decode_image(blob, "test") for blob in blobs]
    decoded = np.stack([np.asarray(Image.fromarray(d).resize((112, 112), Image.Resampling.BILINEAR)) for d in decoded])
    model.eval()
    original, mirrored = manual_embeddings(model, decoded)
    fused = (original + mirrored).numpy()
    expected = evaluate_pairs(fused[0::2], fused[1::2], np.array(issame))
    raw_norms = torch.cat([original, mirrored]).norm(dim=1)
    assert result["num_pairs"] == 20
    assert result["xnorm"] == pytest.approx(raw_norms.mean().item(), rel=1e-5)  # un-fused, as InsightFace
    assert result["accuracy"] == pytest.approx(expected["accuracy"])
    assert result["auc"] == pytest.approx(expected["auc"], abs=1e-6)

    vs = VerificationSet.load(path)
    assert vs.name == "tiny" and vs.num_pairs == 20
    np.testing.assert_array_equal(vs.images, decoded)
    metrics, (fpr, tpr) = vs.evaluate(model, batch_size=7)
    assert metrics["auc"] == pytest.approx(result["auc"], abs=1e-6)
    assert fpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    pixels, _ = vs.evaluate_pixels()
    flat = pixel_embeddings(decoded)
    assert pixels == {**evaluate_pairs(flat[0::2], flat[1::2], issame), "num_pairs": 20}


def test_report_files(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    lines = [{"event": "start"}]
    lines += [{"step": s, "loss": 10 / (s + 1), "lr": 0.1 * (1 - s / 50), "epoch": 0} for s in range(50)]
    metrics.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    plot_training_curves(metrics, tmp_path / "curves.png")

    emb1, emb2, issame = noisy_pairs(500, 16, noise=1.0, seed=7)
    model_roc = roc(cosine_scores(emb1, emb2), issame)  # what VerificationSet plots
    cosine = np.sum(emb1 * emb2, 1) / np.linalg.norm(emb1, axis=1) / np.linalg.norm(emb2, axis=1)
    fpr, tpr, _ = roc_curve(issame, cosine)
    np.testing.assert_allclose(model_roc[0], fpr)
    np.testing.assert_allclose(model_roc[1], tpr)
    pixel_roc = roc(cosine_scores(emb1, np.random.default_rng(8).normal(size=emb2.shape)), issame)
    plot_roc({"tiny": model_roc, "raw pixels": pixel_roc}, tmp_path / "plots" / "roc.png", "LFW")

    for png in (tmp_path / "curves.png", tmp_path / "plots" / "roc.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000

    rows = [{"model": "tiny", "accuracy": 0.912345678, "auc": 0.97}, {"model": "raw pixels", "accuracy": 0.5}]
    roc_link = image_link(tmp_path, tmp_path / "plots" / "roc.png", "roc")
    out = write_report(tmp_path, {"Summary": "Two models.", "LFW": rows, "ROC": roc_link})
    text = out.read_text()
    assert out == tmp_path / "report.md"
    assert "## LFW" in text and "Two models." in text
    assert "| model | accuracy | auc |" in text
    assert "| tiny | 0.912346 | 0.97 |" in text and "| raw pixels | 0.5 |  |" in text
    assert "![roc](plots/roc.png)" in text
    assert not list(tmp_path.glob(".*.tmp"))
