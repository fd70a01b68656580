"""Subject-level bootstrap of the IJB metrics: 95% percentile intervals that respect how the data was sampled.

Pairs and probes are not independent (one subject's templates appear in thousands of pairs), so the resampling
unit is the subject: a resample draws S subjects with replacement, i.e. multiplicities c [S] from a multinomial.
Every pair and probe is then counted with a weight instead of being copied:

- a genuine pair or a probe of subject s counts c_s times (its copies in the resample);
- an impostor pair between subjects a and b counts c_a * c_b times (every copy of a against every copy of b).

TAR@FAR is read off the weighted scores: the threshold is the first impostor score (highest first) at which the
impostor weight above it would exceed FAR x the total impostor weight, and TAR is the genuine weight strictly above
it (on tie-free scores and unit weights, exactly the "interpolate" reading of eval.metrics). Only the top impostor
scores can hold such a threshold, so they are sorted once; every resample is then a gather, a cumulative sum and a
count, vectorised over a block of resamples. 1:N rates resample the probes by subject; the gallery stays as
enrolled (resampling it would change every search, not only the probes counted). Two models scored on the same
pairs share the multiplicities (same seed, same subjects), which is what makes their difference paired.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import scipy.sparse

from faceforge.eval.metrics import MIN_FALSE_ACCEPTS, SearchOutcomes

BLOCK = 16  # resamples handled together: bounds the [top impostors, BLOCK] weight arrays
MAX_FAR = 1e-2  # the largest FAR bootstrapped: above it the top impostors stop being a small part of all pairs


def resample_counts(subjects: int, resamples: int, seed: int) -> np.ndarray:
    """int [resamples, subjects] multiplicities of `resamples` draws of `subjects` subjects with replacement."""
    if subjects < 2 or resamples < 1:
        raise ValueError(f"a bootstrap needs >= 2 subjects and >= 1 resample, got {subjects} and {resamples}")
    rng = np.random.default_rng(seed)
    return rng.multinomial(subjects, np.full(subjects, 1.0 / subjects), size=resamples)


def percentile_interval(replicates: np.ndarray) -> list[float]:
    """[2.5th, 97.5th] percentile of the replicates: the 95% percentile interval."""
    lo, hi = np.percentile(np.asarray(replicates, dtype=np.float64), [2.5, 97.5])
    return [float(lo), float(hi)]


def _count_above(scores_desc: np.ndarray, cumulative: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """[B] weight of the entries scoring strictly above each resample's threshold (scores sorted highest first,
    `cumulative` their running weight sums [n, B])."""
    above = np.searchsorted(-scores_desc, -thresholds, side="left")  # entries with score > threshold
    padded = np.vstack([np.zeros((1, cumulative.shape[1])), cumulative])
    return padded[above, np.arange(cumulative.shape[1])]


def _thresholds(scores_desc: np.ndarray, cumulative: np.ndarray, budgets: np.ndarray) -> np.ndarray:
    """[B] first score (highest first) at which the running weight exceeds each budget; -inf when none does."""
    first = (cumulative <= budgets).sum(axis=0)
    return np.where(first < scores_desc.size, scores_desc[np.minimum(first, scores_desc.size - 1)], -np.inf)


@dataclass
class PairSubjects:
    """Which subjects each 1:1 pair joins: indices into a sorted subject list (equal for a genuine pair)."""

    subjects: np.ndarray  # the subject ids, sorted: column order of the multiplicities
    left: np.ndarray  # int [M]
    right: np.ndarray  # int [M]


def verification_replicates(
    scores: np.ndarray, labels: np.ndarray, pairs: PairSubjects, counts: np.ndarray, fars: Iterable[float],
    max_far: float = MAX_FAR,
) -> dict[float, np.ndarray | None]:
    """[B] TAR at each FAR per resample (`counts` from resample_counts); None where FAR x impostors is under
    MIN_FALSE_ACCEPTS (not measurable) or FAR is above `max_far` (not bootstrapped)."""
    scores, labels = np.asarray(scores, dtype=np.float64).ravel(), np.asarray(labels).ravel().astype(bool)
    impostor, genuine = ~labels, labels
    n_imp, n_subjects = int(impostor.sum()), pairs.subjects.size
    fars = [float(f) for f in fars]
    kept = [f for f in fars if f * n_imp >= MIN_FALSE_ACCEPTS and f <= max_far]
    result: dict[float, np.ndarray | None] = {f: None for f in fars}
    if not kept:
        return result
    a, b = pairs.left[impostor], pairs.right[impostor]
    between = scipy.sparse.csr_matrix((np.ones(n_imp), (a, b)), shape=(n_subjects, n_subjects))
    gen_order = np.argsort(-scores[genuine], kind="stable")
    gen_scores, gen_subject = scores[genuine][gen_order], pairs.left[genuine][gen_order]
    top = _TopImpostors(scores[impostor], a, b, int(np.ceil(1.5 * max(kept) * n_imp)) + 4096)
    tars = np.empty((len(kept), len(counts)))
    for start in range(0, len(counts), BLOCK):
        c = counts[start:start + BLOCK].T.astype(np.float64)  # [S, B]
        budgets = np.array(kept)[:, None] * np.einsum("sb,sb->b", c, between @ c)  # FAR x impostor weight
        thresholds = top.thresholds(c, budgets)
        gen_cum = np.cumsum(c[gen_subject], axis=0)
        tars[:, start:start + BLOCK] = [_count_above(gen_scores, gen_cum, t) / gen_cum[-1] for t in thresholds]
    result.update(zip(kept, tars))
    return result


class _TopImpostors:
    """The highest impostor scores, sorted once and kept across blocks of resamples; grown when a resample's
    budget reaches past them (one that drops the subjects of the top impostors needs more of them)."""

    def __init__(self, scores: np.ndarray, left: np.ndarray, right: np.ndarray, size: int) -> None:
        self.scores, self.left, self.right = scores, left, right
        self._take(size)

    def _take(self, size: int) -> None:
        size = min(size, self.scores.size)
        head = np.argpartition(-self.scores, size - 1)[:size] if size < self.scores.size else np.arange(size)
        self.head = head[np.argsort(-self.scores[head], kind="stable")]

    def thresholds(self, c: np.ndarray, budgets: np.ndarray) -> np.ndarray:
        """[F, B] weighted thresholds for multiplicities `c` [S, B] and impostor-weight budgets [F, B]."""
        while True:
            head = self.head
            cumulative = np.cumsum(c[self.left[head]] * c[self.right[head]], axis=0)
            if head.size == self.scores.size or (cumulative[-1] > budgets).all():
                return np.stack([_thresholds(self.scores[head], cumulative, row) for row in budgets])
            self._take(4 * head.size)


def identification_replicates(
    outcomes: SearchOutcomes, probe_subjects: np.ndarray, counts: np.ndarray, ranks: Iterable[int],
    fpirs: Iterable[float],
) -> dict[str, np.ndarray]:
    """[B] rank-k rates ("rank_k") and TPIR at each FPIR ("tpir@f") per resample of the probes' subjects
    (`probe_subjects`: each probe's column in `counts`); TPIR only in an open set (non-mated probes present)."""
    mated = outcomes.mate_rank > 0
    weights = counts.T[probe_subjects].astype(np.float64)  # [P, B]
    mated_weight = weights[mated].sum(axis=0)
    rank = outcomes.mate_rank[mated]
    result = {f"rank_{k}": (weights[mated] * (rank <= k)[:, None]).sum(axis=0) / mated_weight for k in ranks}
    if mated.all():
        return result
    alarm_order = np.argsort(-outcomes.top_nonmate[~mated], kind="stable")
    alarms, alarm_cum = outcomes.top_nonmate[~mated][alarm_order], np.cumsum(weights[~mated][alarm_order], axis=0)
    hit = rank == 1
    hit_order = np.argsort(-outcomes.mate_score[mated][hit], kind="stable")
    hits, hit_cum = outcomes.mate_score[mated][hit][hit_order], np.cumsum(weights[mated][hit][hit_order], axis=0)
    if hits.size == 0:
        hits, hit_cum = np.array([-np.inf]), np.zeros((1, weights.shape[1]))
    for f in fpirs:
        threshold = _thresholds(alarms, alarm_cum, f * alarm_cum[-1])
        result[f"tpir@{float(f):g}"] = _count_above(hits, hit_cum, threshold) / mated_weight
    return result


def difference_interval(replicates: list[np.ndarray], baseline: list[np.ndarray]) -> list[float]:
    """95% interval of (mean over `replicates`) - (mean over `baseline`), resample by resample: the runs (seeds)
    of two configs scored on one set with one bootstrap seed share their resamples, so the difference is paired."""
    if not replicates or not baseline:
        raise ValueError("a difference needs replicates of both configs")
    return percentile_interval(np.mean(replicates, axis=0) - np.mean(baseline, axis=0))
