"""Score-level metrics: 1:1 verification (ROC, AUC, TAR@FAR, also a linear-time TAR@FAR for millions of pairs)
and 1:N identification (rank-k, TPIR@FPIR)."""

from collections.abc import Iterable
from dataclasses import dataclass
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


def _targets(fars: Iterable[float], mode: str) -> tuple[list[float], np.ndarray]:
    if mode not in ("interpolate", "nearest"):
        raise ValueError(f"mode must be 'interpolate' or 'nearest', got {mode!r}")
    keys = [float(far) for far in fars]
    targets = np.array(keys, dtype=np.float64)
    if np.any((targets < 0) | (targets > 1)):
        raise ValueError(f"FARs must lie in [0, 1], got {keys}")
    return keys, targets


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
    keys, targets = _targets(fars, mode)
    return dict(zip(keys, tar_from_roc(*roc(scores, labels), targets, mode).tolist()))


def tar_from_roc(
    fpr: np.ndarray, tpr: np.ndarray, fars: np.ndarray, mode: Literal["interpolate", "nearest"] = "interpolate"
) -> np.ndarray:
    """Read TAR at each FAR off an ROC (sorted by FPR, as roc_curve gives it), the way tar_at_far describes."""
    read = _interpolate if mode == "interpolate" else _nearest
    return read(np.asarray(fpr), np.asarray(tpr), np.asarray(fars, dtype=np.float64))


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC of `scores` against binary `labels` (sklearn's roc_auc_score)."""
    scores, labels = _validated(scores, labels)
    return float(roc_auc_score(labels, scores))


def _counts(impostor: np.ndarray, genuine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fps, tps) at every distinct score, highest first: how many impostors / genuines score >= it."""
    thresholds = np.unique(np.concatenate([impostor, genuine]))[::-1]
    fps = impostor.size - np.searchsorted(np.sort(impostor), thresholds, side="left")
    tps = genuine.size - np.searchsorted(np.sort(genuine), thresholds, side="left")
    return fps.astype(np.float64), tps.astype(np.float64)


def _corners(fps: np.ndarray, tps: np.ndarray) -> np.ndarray:
    """roc_curve's drop_intermediate rule: keep the ends and every point where either count changes its step."""
    keep = np.ones(fps.size, dtype=bool)
    if fps.size > 2:
        keep[1:-1] = (np.diff(fps, 2) != 0) | (np.diff(tps, 2) != 0)
    return keep


def roc_head(genuine: np.ndarray, impostor: np.ndarray, max_far: float) -> tuple[np.ndarray, np.ndarray]:
    """The points of sklearn's roc_curve (fpr, tpr) from FPR 0 to just past `max_far`, identical to its output.

    Only the top ~max_far of the impostor scores can reach that part of the curve, so they are found with a
    partition (linear time) and only they are sorted: the fast path for the 15.7M pairs of IJB-C. The last
    FPR returned is the first one above `max_far`, with all its points, so reading TAR at any FAR <= max_far
    ("interpolate" or "nearest") gives the same result as on the whole curve.
    """
    genuine = np.asarray(genuine).ravel()
    impostor = np.asarray(impostor).ravel()
    if genuine.size == 0 or impostor.size == 0:
        raise ValueError("a ROC needs both genuine (label 1) and impostor (label 0) pairs")
    if not (np.isfinite(genuine).all() and np.isfinite(impostor).all()):
        raise ValueError("scores must be finite")
    n_imp = impostor.size
    extra = 256
    while True:
        wanted = int(np.ceil(max_far * n_imp)) + extra
        full = wanted >= n_imp
        if full:
            top_imp, top_gen = impostor, genuine
        else:
            cut = np.partition(impostor, n_imp - wanted)[n_imp - wanted]
            top_imp, top_gen = impostor[impostor >= cut], genuine[genuine >= cut]
        fps, tps = _counts(top_imp, top_gen)
        keep = _corners(fps, tps)
        if full:
            end = fps.size
            break
        # The last point's fate depends on the next, unseen one: accept the head only if a known kept point lies
        # beyond max_far and every point sharing its FPR is known too; else look further down the scores.
        past = np.flatnonzero(keep[:-1] & (fps[:-1] / n_imp > max_far))
        if past.size and fps[-1] > fps[past[0]]:
            end = int(np.searchsorted(fps, fps[past[0]], side="right"))
            break
        extra *= 8
    fps, tps = np.r_[0.0, fps[:end][keep[:end]]], np.r_[0.0, tps[:end][keep[:end]]]
    return fps / n_imp, tps / genuine.size


def fast_tar_at_far(
    scores: np.ndarray,
    labels: np.ndarray,
    fars: Iterable[float],
    mode: Literal["interpolate", "nearest"] = "interpolate",
) -> dict[float, float]:
    """tar_at_far's exact result (same modes) from `roc_head`: linear time in the number of pairs, not n log n."""
    keys, targets = _targets(fars, mode)
    scores = np.asarray(scores).ravel()
    labels = np.asarray(labels).ravel().astype(bool)
    if scores.shape != labels.shape:
        raise ValueError(f"scores and labels differ in length: {scores.size} vs {labels.size}")
    fpr, tpr = roc_head(scores[labels], scores[~labels], float(targets.max(initial=0.0)))
    return dict(zip(keys, tar_from_roc(fpr, tpr, targets, mode).tolist()))


MIN_FALSE_ACCEPTS = 20  # a TAR@FAR threshold rests on FAR × impostors impostor pairs; fewer than this is noise


def unmeasurable_fars(fars: Iterable[float], impostors: int) -> list[float]:
    """The FARs at which `impostors` impostor pairs allow fewer than MIN_FALSE_ACCEPTS false accepts: a TAR read
    there is not measurable (below 1 / impostors the ROC does not even have a point at that FAR)."""
    return [far for far in fars if far * impostors < MIN_FALSE_ACCEPTS]


def threshold_at_far(scores: np.ndarray, labels: np.ndarray, far: float) -> dict[str, float]:
    """The operating point "accept when score > threshold" that lets at most `far` of the impostors through.

    threshold is the (floor(far * impostors) + 1)-th highest impostor score; returns it with the FAR and TAR
    actually measured there (a FAR below 1 / impostors gives the highest impostor score and a FAR of 0).
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel().astype(bool)
    if not 0 <= far < 1:
        raise ValueError(f"far must lie in [0, 1), got {far}")
    impostor, genuine = scores[~labels], scores[labels]
    if impostor.size == 0 or genuine.size == 0:
        raise ValueError("a threshold needs both genuine (label 1) and impostor (label 0) pairs")
    rank = int(np.floor(far * impostor.size))
    threshold = float(np.partition(impostor, impostor.size - 1 - rank)[impostor.size - 1 - rank])
    return {
        "threshold": threshold,
        "far": float(np.mean(impostor > threshold)),
        "tar": float(np.mean(genuine > threshold)),
    }


@dataclass
class SearchOutcomes:
    """What each 1:N search (one probe against a gallery) produced, the inputs of every identification rate."""

    mate_rank: np.ndarray  # int [P]: 1 + non-mate subjects scoring strictly above the mate; 0 = no mate enrolled
    mate_score: np.ndarray  # float [P]: best score over the mate's gallery templates; nan when none
    top_nonmate: np.ndarray  # float [P]: best score over the other subjects' templates; -inf when none

    @classmethod
    def concatenate(cls, parts: list["SearchOutcomes"]) -> "SearchOutcomes":
        fields = ("mate_rank", "mate_score", "top_nonmate")
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in fields))


def search_outcomes(scores: np.ndarray, probe_subjects: np.ndarray, gallery_subjects: np.ndarray) -> SearchOutcomes:
    """Rank of the mate and best non-mate score of each probe, from a [probes, gallery templates] score matrix.

    A subject enrolled with several templates counts once, with its best score.
    """
    scores = np.asarray(scores, dtype=np.float64)
    probe_subjects, gallery_subjects = np.asarray(probe_subjects).ravel(), np.asarray(gallery_subjects).ravel()
    if scores.shape != (probe_subjects.size, gallery_subjects.size) or gallery_subjects.size == 0:
        raise ValueError(f"scores must be [probes, gallery] = [{probe_subjects.size}, {gallery_subjects.size}], "
                         f"got {list(scores.shape)}")
    subjects, counts = np.unique(gallery_subjects, return_counts=True)
    order = np.argsort(gallery_subjects, kind="stable")
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    per_subject = np.maximum.reduceat(scores[:, order], starts, axis=1)  # [P, subjects], subjects sorted
    column = np.searchsorted(subjects, probe_subjects).clip(max=subjects.size - 1)
    mated = subjects[column] == probe_subjects
    rows = np.arange(probe_subjects.size)
    mate_score = np.where(mated, per_subject[rows, column], np.nan)
    per_subject[rows[mated], column[mated]] = -np.inf
    top_nonmate = per_subject.max(axis=1)
    above = (per_subject > mate_score[:, None]).sum(axis=1)
    return SearchOutcomes(np.where(mated, above + 1, 0), mate_score, top_nonmate)


def identification_rates(
    outcomes: SearchOutcomes, ranks: Iterable[int] = (1, 5), fpirs: Iterable[float] = (1e-2, 1e-1)
) -> dict:
    """Closed-set rank-k rates over the mated probes, and open-set TPIR at each FPIR.

    A non-mated probe raises a false alarm when its top non-mate score is above the threshold; the threshold
    for FPIR f is the highest that lets at most floor(f * non-mated probes) through. TPIR counts the mated
    probes whose mate is ranked first and scores above that threshold. TPIR needs non-mated probes (an open
    set): without them it is left empty.
    """
    mated = outcomes.mate_rank > 0
    if not mated.any():
        raise ValueError("no probe has a mate in the gallery")
    rank = outcomes.mate_rank[mated]
    result: dict = {f"rank_{k}": float(np.mean(rank <= k)) for k in ranks}
    alarms = np.sort(outcomes.top_nonmate[~mated])[::-1]
    hits = outcomes.mate_score[mated][rank == 1]
    tpir = {}
    for f in fpirs:
        allowed = int(np.floor(f * alarms.size))
        threshold = alarms[allowed] if allowed < alarms.size else -np.inf
        tpir[float(f)] = float(np.sum(hits > threshold) / rank.size)
    result["tpir_at_fpir"] = tpir if alarms.size else {}
    result["mated_probes"], result["nonmated_probes"] = int(mated.sum()), int(alarms.size)
    return result


def identification_metrics(
    scores: np.ndarray,
    probe_subjects: np.ndarray,
    gallery_subjects: np.ndarray,
    ranks: Iterable[int] = (1, 5),
    fpirs: Iterable[float] = (1e-2, 1e-1),
) -> dict:
    """1:N metrics of a [probes, gallery templates] score matrix: rank-k identification rates and TPIR@FPIR."""
    return identification_rates(search_outcomes(scores, probe_subjects, gallery_subjects), ranks, fpirs)
