"""benchmarks/compare.py's IJB table on fake results (no training): means, seed spread, the paired bootstrap
interval of the difference to the first config, and the verdict rule."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

_SPEC = importlib.util.spec_from_file_location("compare", Path(__file__).parents[1] / "benchmarks" / "compare.py")
compare = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(compare)


def fake_run(config: str, seed: int, level: float, spread: float, noise: np.ndarray, missing: str = "") -> dict:
    """A run whose every metric is `level` + seed offset, with replicates `value + noise` (shared resamples)."""
    value = level + spread * (seed - 1)
    metrics = {key: None if key == missing else value for key in compare.IJB_METRICS}
    return {"config": config, "seed": seed,
            "ijb": {"metrics": metrics, "replicates": {key: value + noise for key in compare.IJB_METRICS}}}


def test_table_reports_mean_spread_interval_and_verdict():
    noise = np.random.default_rng(0).normal(0, 0.01, 200)
    rows = [fake_run("base", s, 0.50, 0.01, noise) for s in range(3)]
    rows += [fake_run("better", s, 0.60, 0.01, noise + np.linspace(-0.005, 0.005, 200)) for s in range(3)]
    rows += [fake_run("noisy", s, 0.52, 0.05, noise + np.random.default_rng(1).normal(0, 0.05, 200))
             for s in range(3)]
    lines = compare.ijb_table(rows).splitlines()
    assert len(lines) == 2 + 3 * len(compare.IJB_METRICS)
    base, better, noisy = lines[2], lines[2 + len(compare.IJB_METRICS)], lines[2 + 2 * len(compare.IJB_METRICS)]
    assert base == "| base | TAR@1e-5 | 0.5000 | 0.0100 |  |  |  |"
    cells = [c.strip() for c in better.split("|")[1:-1]]
    assert cells[:5] == ["better", "TAR@1e-5", "0.6000", "0.0100", "+0.1000"] and cells[6] == "measurable"
    lo, hi = (float(x) for x in cells[5].strip("[]").split(","))
    assert 0.094 < lo < 0.1 < hi < 0.106  # the shared noise cancels: only the small added part is left
    assert noisy.endswith("| no measurable difference |")  # +0.02 is inside its 0.05 seed spread


def test_verdict_needs_both_the_interval_and_the_seed_spread():
    assert compare.verdict(0.03, [0.01, 0.05], [0.01, 0.02]) == "measurable"
    assert compare.verdict(0.03, [-0.01, 0.07], [0.01, 0.02]) == "no measurable difference"
    assert compare.verdict(-0.03, [-0.05, -0.01], [0.04, 0.01]) == "no measurable difference"


def test_not_measurable_metric_is_marked():
    noise = np.zeros(10)
    rows = [fake_run("base", 0, 0.5, 0.0, noise), fake_run("other", 0, 0.6, 0.0, noise, missing="tar@1e-05")]
    lines = compare.ijb_table(rows).splitlines()
    assert lines[2 + len(compare.IJB_METRICS)] == "| other | TAR@1e-5 | n/m | | | | |"
    assert lines[3 + len(compare.IJB_METRICS)].endswith("| measurable (one seed: no spread) |")


def test_metrics_are_read_from_a_results_row():
    row = {"tar_at_far": {"1e-05": None, "0.0001": 0.5, "0.001": 0.7},
           "identification": {"mean": {"rank_1": 0.8, "tpir_at_fpir": {"0.01": 0.6}}}}
    assert compare.ijb_metrics(row) == pytest.approx(
        {"tar@1e-05": None, "tar@0.0001": 0.5, "tar@0.001": 0.7, "mean/rank_1": 0.8, "mean/tpir@0.01": 0.6})
