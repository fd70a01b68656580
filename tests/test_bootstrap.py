"""Subject-level bootstrap (eval.bootstrap): the weighted fast path against copying the resampled subjects' pairs
and probes and recomputing each metric directly; determinism; intervals that shrink with more subjects."""

import numpy as np
import pytest

from faceforge.eval.bootstrap import (
    PairSubjects, identification_replicates, percentile_interval, resample_counts, verification_replicates,
)
from faceforge.eval.metrics import SearchOutcomes, identification_rates, tar_at_far


def synthetic_pairs(subjects: int, probes: int, seed: int) -> tuple[np.ndarray, np.ndarray, PairSubjects]:
    """Every gallery template (one per subject) against every probe template, scores with a per-subject offset
    (so that subjects differ, which is what the subject-level resampling is about)."""
    rng = np.random.default_rng(seed)
    probe_subject = np.repeat(np.arange(subjects), probes)
    left, right = np.repeat(np.arange(subjects), probe_subject.size), np.tile(probe_subject, subjects)
    labels = left == right
    offset = rng.normal(0, 0.5, subjects)
    scores = rng.normal(0, 1, left.size) + labels * (2.5 + offset[left]) + 0.3 * (offset[left] + offset[right])
    return scores, labels, PairSubjects(np.arange(subjects), left, right)


def direct_tar(scores, labels, pairs, c, far):
    """Copy every drawn subject's pairs: copy i of a against copy j of b is an impostor pair when a != b, a copy's
    own genuine pairs once; then the unweighted rule: threshold = the (floor(far * n) + 1)-th highest impostor."""
    draws = np.repeat(np.arange(c.size), c)
    imp, gen = [], []
    for i, a in enumerate(draws):
        for j, b in enumerate(draws):
            chosen = (pairs.left == a) & (pairs.right == b)
            if a != b:
                imp.append(scores[chosen])
            elif i == j:
                gen.append(scores[chosen])
    imp, gen = np.sort(np.concatenate(imp))[::-1], np.concatenate(gen)
    allowed = int(np.floor(far * imp.size))
    return np.mean(gen > imp[allowed])


@pytest.mark.parametrize("far", [0.02, 0.05])  # 1,520 impostor pairs: 30 and 76 false accepts
def test_weighted_tar_matches_copying_the_resampled_subjects(far):
    scores, labels, pairs = synthetic_pairs(20, 4, 0)
    counts = resample_counts(20, 5, seed=3)
    fast = verification_replicates(scores, labels, pairs, counts, [far], max_far=0.1)[far]
    assert fast == pytest.approx([direct_tar(scores, labels, pairs, c, far) for c in counts], abs=1e-12)


def test_unit_weights_give_the_interpolated_tar_of_the_whole_set():
    scores, labels, pairs = synthetic_pairs(150, 2, 1)
    ones = np.ones((1, 150), dtype=int)
    for far in (1e-3, 1e-2):
        assert verification_replicates(scores, labels, pairs, ones, [far])[far][0] == pytest.approx(
            tar_at_far(scores, labels, [far])[far])


def test_not_measurable_and_not_bootstrapped_fars_are_none():
    scores, labels, pairs = synthetic_pairs(10, 2, 2)  # 180 impostor pairs: FAR 0.1 rests on 18 of them
    result = verification_replicates(scores, labels, pairs, resample_counts(10, 4, 0), [0.1, 0.2])
    assert result[0.1] is None and result[0.2] is None  # 0.2 is above MAX_FAR: not bootstrapped


def synthetic_outcomes(probes: int, subjects: int, seed: int) -> tuple[SearchOutcomes, np.ndarray]:
    rng = np.random.default_rng(seed)
    subject = rng.integers(0, subjects, probes)
    rank = np.where(subject % 3 == 0, 0, rng.integers(1, 4, probes))  # a third of the subjects not enrolled
    mate = np.where(rank > 0, rng.normal(1, 0.5, probes), np.nan)
    return SearchOutcomes(rank, mate, rng.normal(0.3, 0.4, probes)), subject


def test_weighted_identification_matches_copying_the_resampled_probes():
    outcomes, subject = synthetic_outcomes(300, 40, 4)
    counts = resample_counts(40, 6, seed=9)
    fast = identification_replicates(outcomes, subject, counts, (1, 5), (0.05, 0.2))
    for b, c in enumerate(counts):
        copies = np.concatenate([np.flatnonzero(subject == s).repeat(c[s]) for s in range(40)])
        direct = identification_rates(SearchOutcomes(*(x[copies] for x in (
            outcomes.mate_rank, outcomes.mate_score, outcomes.top_nonmate))), (1, 5), (0.05, 0.2))
        assert fast["rank_1"][b] == pytest.approx(direct["rank_1"]) and fast["rank_5"][b] == direct["rank_5"]
        assert [fast["tpir@0.05"][b], fast["tpir@0.2"][b]] == pytest.approx(list(direct["tpir_at_fpir"].values()))


def test_seeded_resamples_repeat_and_pair_two_models():
    scores, labels, pairs = synthetic_pairs(20, 3, 5)
    def tar(values):
        return verification_replicates(values, labels, pairs, resample_counts(20, 50, 7), [0.02], max_far=0.1)[0.02]

    first = tar(scores)
    assert np.array_equal(first, tar(scores))
    difference = tar(scores + 0.3 * labels) - first  # same resamples: a better model is better on every one of them
    assert (difference >= 0).all() and percentile_interval(difference)[1] > 0


def test_interval_shrinks_as_subjects_grow():
    widths = []
    for subjects in (40, 400):
        scores, labels, pairs = synthetic_pairs(subjects, 2, 6)
        lo, hi = percentile_interval(verification_replicates(
            scores, labels, pairs, resample_counts(subjects, 200, 0), [0.01])[0.01])
        widths.append(hi - lo)
    assert widths[1] < 0.6 * widths[0]


def test_bad_resample_request_is_one_line():
    with pytest.raises(ValueError, match="needs >= 2 subjects"):
        resample_counts(1, 10, 0)
