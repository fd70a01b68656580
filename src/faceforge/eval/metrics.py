"""Score-level verification metrics (ROC AUC, TAR@FAR) built on scikit-learn's ROC."""

from collections.abc import Iterable
from typing import Literal

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve


def _validated(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel().astype(bool)
    if scores.shape != labels.shape:
        raise ValueError(f"scores and labels differ in length: {scores.size} vs {labels.size}")
    if labels.all() or not labels.any():
        raise ValueError("a ROC needs both genuine (label 1) and impostor (label 0) pairs")
    return scores, labels


def roc(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC (fpr, tpr) of `scores` (higher = more similar) against binary `labels`, from sklearn's roc_curve."""
    scores, labels = _validated(scores, labels)
    fpr, tpr, _ = roc_curve(labels, scores)
    return fpr, tpr


def _interpolate(fpr: np.ndarray, tpr: np.ndarray, fars: np.ndarray) -> np.ndarray:
    # Equivalent to np.interp(fars, fpr, tpr), written out because the ROC has repeated FPRs
    # (vertical steps), which np.interp does not promise to handle: at an FPR shared by several
    # points take the highest TPR, between FPRs interpolate from there to the next point.
    right = np.searchsorted(fpr, fars, side="right")
    left = right - 1
    right = np.minimum(right, fpr.size - 1)
    span = fpr[right] - fpr[left]
    weight = np.divide(fars - fpr[left], span, out=np.zeros_like(fars), where=span > 0)
    return tpr[left] + weight * (tpr[right] - tpr[left])


def _nearest(fpr: np.ndarray, tpr: np.ndarray, fars: np.ndarray) -> np.ndarray:
    # Reversed so that argmin's first hit is the highest TPR at the nearest FPR (and, on a
    # distance tie between two FPRs, the larger FPR), as the InsightFace IJB scripts read it.
    fpr, tpr = fpr[::-1], tpr[::-1]
    return np.array([tpr[np.argmin(np.abs(fpr - far))] for far in fars])


def tar_at_far(
    scores: np.ndarray,
    labels: np.ndarray,
    fars: Iterable[float],
    mode: Literal["interpolate", "nearest"] = "interpolate",
) -> dict[float, float]:
    """TAR (TPR) at each target FAR on the sklearn ROC of `scores` (higher = more similar, label 1 = genuine).

    "interpolate" reads the ROC linearly between its points; "nearest" is InsightFace's legacy reading
    (TPR of the point whose FPR is nearest the target), which can sit above the target FAR.
    A FAR below 1/num_impostors cannot be measured but still returns a value: "interpolate" lies between
    the TPR at zero false accepts and the TPR at the first false accept, "nearest" is usually the former.
    """
    if mode not in ("interpolate", "nearest"):
        raise ValueError(f"mode must be 'interpolate' or 'nearest', got {mode!r}")
    keys = [float(far) for far in fars]
    targets = np.array(keys, dtype=np.float64)
    if np.any((targets < 0) | (targets > 1)):
        raise ValueError(f"FARs must lie in [0, 1], got {keys}")
    fpr, tpr = roc(scores, labels)
    read = _interpolate if mode == "interpolate" else _nearest
    return dict(zip(keys, read(fpr, tpr, targets).tolist()))


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC of `scores` against binary `labels` (sklearn's roc_auc_score)."""
    scores, labels = _validated(scores, labels)
    return float(roc_auc_score(labels, scores))
