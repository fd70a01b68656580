"""Pair verification: the InsightFace 10-fold `.bin` protocol, flip-fused embedding and raw-pixel baseline."""

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_curve
from sklearn.preprocessing import normalize

from faceforge.data.binsets import load_bin
from faceforge.data.images import FACE_SIZE, decode_image, resize_face, to_unit_range
from faceforge.eval.metrics import roc, roc_auc, tar_at_far
from faceforge.runtime import autocast_dtype

THRESHOLDS = np.arange(0, 4, 0.01)  # squared-L2 thresholds of the InsightFace protocol
REPORTED_FARS = (1e-3, 1e-2)
_CHUNK_ROWS = 4096  # bounds the float64 working copies for wide inputs such as raw pixels

ArrayLike = np.ndarray | torch.Tensor


def as_numpy(x: ArrayLike) -> np.ndarray:
    """A numpy view or copy of a numpy array or (detached, CPU, bf16 widened to float32) torch tensor."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.float() if x.dtype == torch.bfloat16 else x).numpy()
    return np.asarray(x)


def _pair_scores(emb1: ArrayLike, emb2: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Squared L2 distance and cosine of each L2-normalised row pair, in float64, a chunk of rows at a time."""
    a, b = as_numpy(emb1), as_numpy(emb2)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"emb1 and emb2 must both be [N, D], got {a.shape} and {b.shape}")
    dist, cosine = np.empty(len(a)), np.empty(len(a))
    for start in range(0, len(a), _CHUNK_ROWS):
        rows = slice(start, start + _CHUNK_ROWS)
        x = normalize(a[rows].astype(np.float64), copy=False)
        y = normalize(b[rows].astype(np.float64), copy=False)
        diff = x - y
        dist[rows] = np.einsum("ij,ij->i", diff, diff)
        cosine[rows] = np.einsum("ij,ij->i", x, y)
    return dist, cosine


def cosine_scores(emb1: ArrayLike, emb2: ArrayLike) -> np.ndarray:
    """Cosine similarity of each row pair of `emb1` and `emb2` (float64 [N])."""
    return _pair_scores(emb1, emb2)[1]


def _kfold_threshold_accuracy(
    dist: np.ndarray, issame: np.ndarray, nfolds: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per contiguous fold: accuracy at the grid threshold that is best on the other folds, and that threshold."""
    sizes = np.array([len(part) for part in np.array_split(np.arange(dist.size), nfolds)])
    fold = np.repeat(np.arange(nfolds), sizes)
    k = THRESHOLDS.size
    # A pair is predicted genuine (dist < t_j) exactly for the thresholds j >= bucket.
    bucket = np.searchsorted(THRESHOLDS, dist, side="right")
    flat = (fold * 2 + issame) * (k + 1) + bucket
    counts = np.bincount(flat, minlength=nfolds * 2 * (k + 1)).reshape(nfolds, 2, k + 1)
    accepted = np.cumsum(counts, axis=2)[:, :, :k]  # [fold, impostor/genuine, threshold]
    impostors = counts[:, 0].sum(axis=1, keepdims=True)
    correct = accepted[:, 1] + impostors - accepted[:, 0]  # [fold, threshold]
    # Every threshold sees the same training pairs, so comparing counts is comparing accuracies.
    best = np.argmax(correct.sum(axis=0) - correct, axis=1)
    return correct[np.arange(nfolds), best] / sizes, THRESHOLDS[best]


def _best_threshold_accuracy(scores: np.ndarray, issame: np.ndarray) -> float:
    # Accuracy at every distinct cut of the sorted scores, i.e. every ROC point.
    fpr, tpr, _ = roc_curve(issame, scores, drop_intermediate=False)
    genuine = issame.sum()
    impostor = issame.size - genuine
    return float(np.max(tpr * genuine + (1 - fpr) * impostor) / issame.size)


def evaluate_pairs(emb1: ArrayLike, emb2: ArrayLike, issame: ArrayLike, nfolds: int = 10) -> dict:
    """InsightFace 10-fold verification of pairs (emb1[i], emb2[i]), plus AUC, TAR@FAR and the optimistic accuracy.

    Squared L2 distance of L2-normalised embeddings; contiguous folds; on each fold the threshold in
    0, 0.01, ..., 3.99 best on the other folds (first on ties) is scored on the held-out fold.
    `accuracy` / `accuracy_std` are the mean / population std over folds ("Accuracy-Flip" when the embeddings
    are flip-fused). `auc` and `tar_at_far` ({1e-3, 1e-2}, interpolated) use the cosine of all pairs.
    `best_threshold_accuracy` is the optimistic single best threshold on all pairs (OpenSphere / UNPG style),
    not comparable with `accuracy`.
    """
    dist, scores = _pair_scores(emb1, emb2)
    labels = as_numpy(issame).astype(bool).ravel()
    if labels.size != dist.size:
        raise ValueError(f"issame has {labels.size} entries for {dist.size} pairs")
    if not 2 <= nfolds <= labels.size:
        raise ValueError(f"nfolds must be in [2, {labels.size}], got {nfolds}")
    fold_acc, thresholds = _kfold_threshold_accuracy(dist, labels, nfolds)
    return {
        "accuracy": float(fold_acc.mean()),
        "accuracy_std": float(fold_acc.std()),
        "threshold": float(thresholds.mean()),
        "fold_accuracies": fold_acc.tolist(),
        "auc": roc_auc(scores, labels),
        "tar_at_far": tar_at_far(scores, labels, REPORTED_FARS),
        "best_threshold_accuracy": _best_threshold_accuracy(scores, labels),
    }


def embed_views(
    model: torch.nn.Module,
    images: np.ndarray | Sequence[np.ndarray],
    batch_size: int,
    device: str | torch.device,
    flip: bool,
    precision: str,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Float32 embeddings of the images and, with `flip`, of their horizontal mirrors."""
    if len(images) == 0:
        raise ValueError("no images to embed")
    device = torch.device(device)
    dtype = autocast_dtype(precision, device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
    views: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast:
            for start in range(0, len(images), batch_size):
                batch = np.asarray(images[start : start + batch_size])
                if batch.ndim != 4 or batch.shape[-1] != 3 or batch.dtype != np.uint8:
                    raise ValueError(f"images must be uint8 [N, H, W, 3] RGB, got {batch.dtype} {batch.shape}")
                x = to_unit_range(torch.from_numpy(batch).to(device).permute(0, 3, 1, 2))
                views[0].append(model(x).float().cpu())
                if flip:
                    views[1].append(model(torch.flip(x, dims=[3])).float().cpu())
    finally:
        model.train(was_training)
    original = torch.cat(views[0]).numpy()
    return original, torch.cat(views[1]).numpy() if flip else None


def embed_images(
    model: torch.nn.Module,
    images: np.ndarray | Sequence[np.ndarray],
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    flip: bool = True,
    precision: str = "auto",
) -> np.ndarray:
    """Embed uint8 RGB [N, 112, 112, 3] images as float32 [N, D]; with `flip`, model(x) + model(mirror(x)).

    Inputs are scaled to [-1, 1] as in training; the model runs in eval mode without gradients (its mode is
    restored), under the autocast that `precision` names (as train.precision: 'auto' is bf16 on a GPU that runs it
    natively, fp32 on the CPU). Flip-fused embeddings are summed, not normalised.
    """
    original, flipped = embed_views(model, images, batch_size, device, flip, precision)
    return original + flipped if flipped is not None else original


def pixel_embeddings(images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """Raw pixels scaled to [-1, 1] and flattened (float32 [N, H*W*3]): the "raw-pixel cosine" baseline."""
    pixels = np.asarray(images)
    if pixels.ndim != 4 or pixels.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [N, H, W, C], got {pixels.dtype} {pixels.shape}")
    return to_unit_range(pixels.reshape(len(pixels), -1))


@dataclass
class VerificationSet:
    """A `.bin` verification set decoded once to uint8 RGB, so repeated evaluation during training skips decoding."""

    name: str
    images: np.ndarray  # uint8 [2 * num_pairs, 112, 112, 3]; pair i is (images[2i], images[2i + 1])
    issame: np.ndarray  # bool [num_pairs]

    @classmethod
    def load(cls, path: str | Path) -> "VerificationSet":
        """Read a `.bin` (LFW, CFP-FP, AgeDB-30, ...) and decode it; non-112x112 images are resized bilinearly."""
        blobs, issame = load_bin(path)
        images = np.empty((len(blobs), FACE_SIZE, FACE_SIZE, 3), dtype=np.uint8)
        for i, blob in enumerate(blobs):
            images[i] = resize_face(decode_image(blob, f"{path} image {i}"))
        return cls(Path(path).stem, images, issame)

    @property
    def num_pairs(self) -> int:
        return len(self.issame)

    def _score(self, fused: np.ndarray) -> tuple[dict, tuple[np.ndarray, np.ndarray]]:
        result = evaluate_pairs(fused[0::2], fused[1::2], self.issame)
        result["num_pairs"] = self.num_pairs
        return result, roc(cosine_scores(fused[0::2], fused[1::2]), self.issame)

    def score_views(
        self, original: np.ndarray, flipped: np.ndarray | None
    ) -> tuple[dict, tuple[np.ndarray, np.ndarray], np.ndarray]:
        """The 10-fold protocol on embeddings already computed (see `embed_views`), the cosine ROC, and the
        cosine of each pair of the fused embeddings (what an operating threshold is chosen on)."""
        fused = original if flipped is None else original + flipped
        raw = original if flipped is None else np.concatenate([original, flipped])
        result, curve = self._score(fused)
        result["xnorm"] = float(np.linalg.norm(raw.astype(np.float64), axis=1).mean())
        return result, curve, cosine_scores(fused[0::2], fused[1::2])

    def evaluate(
        self,
        model: torch.nn.Module,
        batch_size: int = 256,
        device: str | torch.device = "cpu",
        flip: bool = True,
        precision: str = "auto",
    ) -> tuple[dict, tuple[np.ndarray, np.ndarray]]:
        """The 10-fold protocol on `model` (see evaluate_bin) and the cosine ROC (fpr, tpr) for plotting."""
        return self.score_views(*embed_views(model, self.images, batch_size, device, flip, precision))[:2]

    def evaluate_pixels(self) -> tuple[dict, tuple[np.ndarray, np.ndarray]]:
        """The same protocol with raw-pixel embeddings: the "raw-pixel cosine" baseline."""
        return self._score(pixel_embeddings(self.images))


def evaluate_bin(
    model: torch.nn.Module,
    bin_path: str | Path,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    flip: bool = True,
    precision: str = "auto",
) -> dict:
    """Run the InsightFace `.bin` protocol (LFW, CFP-FP, AgeDB-30, ...) on `model`: evaluate_pairs' dict plus
    `xnorm` and `num_pairs`.

    `xnorm` follows InsightFace: the mean L2 norm of the raw, un-fused embeddings (original and, with `flip`,
    mirrored images each count once), not the norm of their sum.
    """
    return VerificationSet.load(bin_path).evaluate(model, batch_size, device, flip, precision)[0]
