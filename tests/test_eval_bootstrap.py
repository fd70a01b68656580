"""`faceforge eval --ijb --bootstrap N` end to end on a small SynthFace-IJB set: intervals per metric in
results.json and report.md, replicates on disk, the same seed giving the same intervals, bad input refused."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from faceforge import cli
from faceforge.backbones import build_backbone
from faceforge.data.synthface_ijb import generate_ijb

BACKBONE = {"name": "tiny", "embedding_size": 16, "stem": 8, "widths": [8, 16, 16]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """30 subjects x 3 probe templates: 2,610 impostor pairs, so TAR@1e-2 is measurable and TAR@1e-3 is not."""
    root = tmp_path_factory.mktemp("bootijb")
    generate_ijb(root / "synth", 30, 3, workers=1, progress=False)
    (root / "config.yaml").write_text(json.dumps({"backbone": BACKBONE}))
    torch.manual_seed(0)
    state = build_backbone(**BACKBONE).state_dict()
    save_file({f"backbone.{k}": v.contiguous() for k, v in state.items()}, root / "model.safetensors")
    return root


def _eval(root, out, *extra):
    assert cli.main(["eval", str(root / "model.safetensors"), "--ijb", str(root / "synth"), "--out", str(out),
                     "--no-progress", "--device", "cpu", "--bootstrap", "40", *extra]) == 0
    return json.loads((out / "results.json").read_text())["rows"][0]


def test_every_metric_gets_an_interval(setup):
    row = _eval(setup, setup / "a")
    ci = row["ci95"]
    assert row["bootstrap"] == {"resamples": 40, "seed": 0, "unit": "subject"}
    assert ci["tar@0.001"] is None and ci["tar@0.1"] is None  # not measurable / above the bootstrapped FARs
    for key in ("tar@0.01", "G1/rank_1", "G2/rank_5", "G1/tpir@0.1", "mean/rank_1", "mean/tpir@0.1"):
        assert 0 <= ci[key][0] <= ci[key][1] <= 1, key
    lo, hi = ci["G1/rank_1"]
    report = (setup / "a" / "report.md").read_text()
    assert f"{row['identification']['G1']['rank_1']:.4f} [{lo:.4f}, {hi:.4f}]" in report
    with np.load(setup / "a" / "bootstrap_SynthFace-IJB.npz") as npz:
        assert npz["tar@0.01"].shape == (40,) and "tar@0.001" not in npz


def test_same_seed_same_intervals_other_seed_other(setup):
    first = _eval(setup, setup / "b")["ci95"]
    assert _eval(setup, setup / "c")["ci95"] == first
    assert _eval(setup, setup / "d", "--bootstrap-seed", "1")["ci95"] != first


def test_negative_resamples_are_refused(setup, capsys):
    assert cli.main(["eval", str(setup / "model.safetensors"), "--ijb", str(setup / "synth"), "--bootstrap", "-1"]) != 0
    assert capsys.readouterr().err.strip() == "faceforge: error: --bootstrap takes a number of resamples >= 0, got -1"
