"""Linear-time TAR@FAR against scikit-learn's roc_curve, operating thresholds, and the 1:N identification metrics."""

import numpy as np
import pytest
from sklearn.metrics import roc_curve

from faceforge.eval.metrics import (
    SearchOutcomes,
    fast_tar_at_far,
    identification_metrics,
    roc_head,
    search_outcomes,
    tar_at_far,
    threshold_at_far,
)

FARS = [0.0, 1e-6, 1e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1.0]


def sklearn_reading(scores, labels, fars, mode):
    """TAR read off sklearn's roc_curve independently: the highest point of the ROC polyline at each FAR, or
    InsightFace's nearest-point loop (curve flipped, then the first minimum of |fpr - far|)."""
    fpr, tpr, _ = roc_curve(labels, scores.astype(np.float64))
    if mode == "interpolate":
        x0, x1, y0, y1 = fpr[:-1], fpr[1:], tpr[:-1], tpr[1:]
        tars = []
        for far in fars:
            on = (x0 <= far) & (far <= x1)
            t = np.divide(far - x0, x1 - x0, out=np.ones_like(x0), where=x1 > x0)
            tars.append(float(np.max((y0 + t * (y1 - y0))[on])))
        return tars
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    return [float(tpr[min(zip(np.abs(fpr - far), range(len(fpr))))[1]]) for far in fars]


def random_case(seed: int):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(50, 4000))
    labels = rng.random(n) < rng.uniform(0.02, 0.5)
    labels[:2] = [True, False]
    scores = rng.normal(labels * rng.uniform(0.5, 3), 1.0)
    quantum = [None, 1, 4, 32][seed % 4]  # coarse scores give ties within and across the classes
    if quantum:
        scores = np.round(scores * quantum) / quantum
    return scores.astype(np.float32), labels


@pytest.mark.parametrize("mode", ["interpolate", "nearest"])
def test_fast_tar_at_far_matches_sklearn_roc(mode):
    for seed in range(40):
        scores, labels = random_case(seed)
        fast = fast_tar_at_far(scores, labels, FARS, mode)
        assert list(fast) == FARS
        assert fast == tar_at_far(scores, labels, FARS, mode), seed
        np.testing.assert_allclose(list(fast.values()), sklearn_reading(scores, labels, FARS, mode), atol=1e-12)


def test_roc_head_is_a_prefix_of_sklearn_roc():
    for seed in range(20):
        scores, labels = random_case(seed)
        fpr, tpr, _ = roc_curve(labels, scores.astype(np.float64))
        for max_far in (0.0, 0.01, 0.2, 1.0):
            head_fpr, head_tpr = roc_head(scores[labels], scores[~labels], max_far)
            assert np.array_equal(head_fpr, fpr[:head_fpr.size]) and np.array_equal(head_tpr, tpr[:head_tpr.size])
            assert head_fpr[-1] > max_far or head_fpr.size == fpr.size


def test_fast_tar_at_far_rejects_bad_input():
    with pytest.raises(ValueError, match="both genuine"):
        fast_tar_at_far(np.ones(4), np.ones(4), [0.1])
    with pytest.raises(ValueError, match="finite"):
        fast_tar_at_far(np.array([0.1, np.nan]), np.array([1, 0]), [0.1])
    with pytest.raises(ValueError, match="mode"):
        fast_tar_at_far(np.array([0.1, 0.2]), np.array([1, 0]), [0.1], mode="linear")


def test_threshold_at_far_is_the_tightest_threshold_within_the_far():
    scores, labels = random_case(1)
    impostors = np.sort(scores[~labels].astype(np.float64))
    for far in (0.0, 0.01, 0.1, 0.5):
        point = threshold_at_far(scores, labels, far)
        accepted = np.sum(impostors > point["threshold"])
        assert accepted <= far * impostors.size
        # one impostor score lower would let in more than the FAR allows
        lower = impostors[impostors < point["threshold"]]
        assert lower.size == 0 or np.sum(impostors > lower[-1]) > far * impostors.size
        assert point["far"] == accepted / impostors.size
        assert point["tar"] == np.mean(scores[labels] > point["threshold"])


# Gallery: subject 1 (one template), subject 2 (two templates), subject 3. Probes: subjects 1, 2, 3, 4, 5, 1;
# subjects 4 and 5 are not enrolled (non-mated searches).
GALLERY = np.array([1, 2, 2, 3])
PROBES = np.array([1, 2, 3, 4, 5, 1])
SCORES = np.array([
    [0.90, 0.20, 0.30, 0.10],  # mate 0.90 first; best non-mate 0.30 (subject 2's better template)
    [0.50, 0.40, 0.62, 0.60],  # mate 0.62 (max of its two templates) first; best non-mate 0.60
    [0.80, 0.10, 0.20, 0.60],  # mate 0.60 second behind 0.80
    [0.20, 0.65, 0.10, 0.30],  # non-mated, top 0.65
    [0.10, 0.20, 0.30, 0.40],  # non-mated, top 0.40
    [0.35, 0.50, 0.10, 0.45],  # mate 0.35 third behind 0.50 and 0.45
])


def test_search_outcomes_by_hand():
    out = search_outcomes(SCORES, PROBES, GALLERY)
    assert out.mate_rank.tolist() == [1, 1, 2, 0, 0, 3]
    np.testing.assert_array_equal(out.mate_score, [0.90, 0.62, 0.60, np.nan, np.nan, 0.35])
    np.testing.assert_array_equal(out.top_nonmate, [0.30, 0.60, 0.80, 0.65, 0.40, 0.50])
    halves = [search_outcomes(SCORES[:2], PROBES[:2], GALLERY), search_outcomes(SCORES[2:], PROBES[2:], GALLERY)]
    assert SearchOutcomes.concatenate(halves).mate_rank.tolist() == out.mate_rank.tolist()


def test_identification_metrics_by_hand():
    result = identification_metrics(SCORES, PROBES, GALLERY, ranks=(1, 2, 5), fpirs=(0.1, 0.5, 1.0))
    # 4 mated probes, ranks 1, 1, 2, 3
    assert (result["rank_1"], result["rank_2"], result["rank_5"]) == (0.5, 0.75, 1.0)
    assert (result["mated_probes"], result["nonmated_probes"]) == (4, 2)
    # FPIR 0.1 allows no false alarm: threshold 0.65, only the 0.90 mate passes. FPIR 0.5 allows one: threshold
    # 0.40, both rank-1 mates (0.90, 0.62) pass. FPIR 1 allows both: TPIR is the rank-1 rate.
    assert result["tpir_at_fpir"] == {0.1: 0.25, 0.5: 0.5, 1.0: 0.5}


def test_identification_without_nonmated_probes_has_no_tpir():
    result = identification_metrics(SCORES[:3], PROBES[:3], GALLERY)
    assert result["tpir_at_fpir"] == {} and result["rank_1"] == 2 / 3
    with pytest.raises(ValueError, match="no probe has a mate"):
        identification_metrics(SCORES[3:5], PROBES[3:5], GALLERY)
