"""IJB evaluation: template pooling, blocked pair scoring, meta-file errors, the SynthFace IJB set end to end through
`faceforge eval`, and the embed / verify commands."""

import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from faceforge import cli
from faceforge.backbones import build_backbone
from faceforge.data.synthface_ijb import PREFIX, generate_ijb, render_subject
from faceforge.errors import DataError
from faceforge.eval import ijb_scoring
from faceforge.eval.ijb import evaluate_ijb
from faceforge.eval.ijb_meta import read_ijb
from faceforge.eval.options import EvalOptions
from faceforge.eval.ijb_scoring import pool_templates, score_pairs
from faceforge.eval.report import plot_det
from faceforge.models import load_backbone

SUBJECTS, PROBES_PER_SUBJECT = 6, 2
BACKBONE = {"name": "tiny", "embedding_size": 16, "stem": 8, "widths": [8, 16, 16]}


@pytest.fixture(scope="module")
def ijb_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ijb") / "synth"
    generate_ijb(root, SUBJECTS, PROBES_PER_SUBJECT, workers=1, progress=False)
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A run-like folder: config.yaml naming the tiny backbone, and its (random-init) weights."""
    folder = tmp_path_factory.mktemp("model")
    (folder / "config.yaml").write_text(json.dumps({"backbone": BACKBONE}))
    torch.manual_seed(0)
    model = build_backbone(**BACKBONE)
    save_file({f"backbone.{k}": v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    return folder


def test_pooling_three_template_toy():
    features = np.array([[1.0, 0, 0], [0, 2, 0], [0, 4, 0], [0, 0, 3], [1, 1, 0], [3, 0, 0]], dtype=np.float32)
    templates = np.array([7, 7, 7, 7, 3, 9])
    medias = np.array([1, 2, 2, 5, 1, 1])  # template 7: a still (media 1), a 2-frame video (media 2), a still (5)
    faceness = np.array([1.0, 0.5, 1.0, 1.0, 1.0, 0.2])
    ids, pooled = pool_templates(features, templates, medias, faceness)
    assert ids.tolist() == [3, 7, 9]
    # template 7 = [1,0,0] + mean([0,1,0], [0,4,0]) + [0,0,3] = [1, 2.5, 3], then unit length
    np.testing.assert_allclose(pooled[1], np.array([1, 2.5, 3]) / np.linalg.norm([1, 2.5, 3]), rtol=1e-6)
    np.testing.assert_allclose(pooled[0], np.array([1, 1, 0]) / np.sqrt(2), rtol=1e-6)
    np.testing.assert_allclose(pooled[2], [1, 0, 0], rtol=1e-6)
    # N0: every image counts with unit norm before the faceness weight: [1,0,0] + [0,0.75,0] + [0,0,1]
    _, unit = pool_templates(features, templates, medias, faceness, normalize_images=True)
    np.testing.assert_allclose(unit[1], np.array([1, 0.75, 1]) / np.linalg.norm([1, 0.75, 1]), rtol=1e-6)


@pytest.mark.parametrize("method", ["blocked", "gather", "auto"])
def test_score_pairs_matches_direct_dot_products(method, monkeypatch):
    monkeypatch.setattr(ijb_scoring, "BLOCK_ELEMENTS", 64)  # several blocks even on a small case
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((50, 8)).astype(np.float32)
    left, right = rng.integers(0, 12, 700), rng.integers(12, 50, 700)
    expected = np.einsum("ij,ij->i", feats[left].astype(np.float64), feats[right])
    np.testing.assert_allclose(score_pairs(feats, left, right, method=method), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(score_pairs(feats, right, left, method=method), expected, rtol=1e-5, atol=1e-5)


def test_generator_is_deterministic_and_landmarks_follow_the_face():
    first, again = render_subject(3, 5, 1, 0.75), render_subject(3, 5, 1, 0.75)
    frames = [frame for template in first for media in template for frame in media]
    assert [f[0] for f in frames] == [f[0] for template in again for media in template for f in media]
    assert len(first) == 2 and all(len(media) == 1 for media in first[0])  # gallery: stills only
    for _, points, faceness in frames:
        left_eye, right_eye, nose, mouth_left, mouth_right = points
        assert left_eye[0] < right_eye[0] and mouth_left[0] < mouth_right[0]
        assert max(left_eye[1], right_eye[1]) < nose[1] < min(mouth_left[1], mouth_right[1])
        assert 0.3 <= faceness <= 1.0


def test_synthface_ijb_end_to_end(ijb_root, model_dir):
    meta = read_ijb(ijb_root)
    assert meta.name == "SynthFace-IJB" and set(meta.galleries) == {"G1", "G2"}
    assert len(meta.pairs) == SUBJECTS * SUBJECTS * PROBES_PER_SUBJECT
    assert meta.labels.sum() == SUBJECTS * PROBES_PER_SUBJECT
    result = evaluate_ijb(load_backbone(model_dir / "model.safetensors"), ijb_root, EvalOptions(batch_size=32, progress=False))
    row = result.row
    assert row["mode"] == "N1D1F2" and row["templates"] == SUBJECTS * (1 + PROBES_PER_SUBJECT)
    assert list(row["tar_at_far"]) == [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
    assert all(0 <= v <= 1 for v in [*row["tar_at_far"].values(), *row["tar_at_far_nearest"].values()])
    for gallery in ("G1", "G2"):
        rates = row["identification"][gallery]
        assert rates["mated_probes"] == rates["nonmated_probes"] == SUBJECTS // 2 * PROBES_PER_SUBJECT
        assert rates["rank_1"] <= rates["rank_5"] == 1.0  # 3 subjects per gallery: every mate is in the top 5
    assert np.all(np.abs(result.scores) <= 1 + 1e-5) and result.scores.size == len(meta.pairs)


def test_eval_command_writes_report_and_threshold(ijb_root, model_dir, capsys):
    out = model_dir / "eval"
    assert cli.main(["eval", str(model_dir / "model.safetensors"), "--ijb", str(ijb_root), "--out", str(out),
                     "--no-progress", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rows[0]["set"] == "SynthFace-IJB" and rows[0]["pairs"] == SUBJECTS * SUBJECTS * PROBES_PER_SUBJECT
    report = (out / "report.md").read_text()
    assert "SynthFace-IJB TAR@1e-04" in report and "TPIR@FPIR=1e-02" in report and "![ROC](roc.png)" in report
    assert (out / "roc.png").stat().st_size > 0 and (out / "det.png").stat().st_size > 0
    assert json.loads((out / "results.json").read_text())["rows"][0]["set"] == "SynthFace-IJB"
    stored = json.loads((model_dir / "model.threshold.json").read_text())
    assert stored["set"] == "SynthFace-IJB" and stored["target_far"] == 1e-4 and stored["far"] <= 1e-4


def test_embed_and_verify_commands(ijb_root, model_dir, tmp_path, capsys):
    meta = read_ijb(ijb_root)
    raw = tmp_path / "raw"
    raw.mkdir()
    lines = []
    for name, points in zip(meta.images[:4], meta.landmarks[:4]):
        (raw / name).write_bytes((meta.image_dir / name).read_bytes())
        lines.append(" ".join([name, *map(str, points.ravel())]))
    (tmp_path / "points.txt").write_text("\n".join(lines) + "\n")
    weights = str(model_dir / "model.safetensors")
    assert cli.main(["embed", str(raw), "--out", str(tmp_path / "f.npy"), "--model", weights,
                     "--landmarks", str(tmp_path / "points.txt"), "--no-progress"]) == 0
    feats = np.load(tmp_path / "f.npy")
    assert feats.shape == (4, BACKBONE["embedding_size"])
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1, rtol=1e-5)
    assert (tmp_path / "f.txt").read_text().split() == sorted(meta.images[:4])
    capsys.readouterr()
    first, second = (str(raw / name) for name in sorted(meta.images[:4])[:2])
    assert cli.main(["verify", first, second, "--model", weights, "--landmarks", str(tmp_path / "points.txt"),
                     "--threshold", "0.5"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    np.testing.assert_allclose(result["cosine"], feats[0] @ feats[1], rtol=1e-5)
    assert result["same"] == (result["cosine"] > 0.5)
    Image.new("RGB", (112, 112)).save(tmp_path / "crop.png")  # aligned crops need no landmarks
    assert cli.main(["embed", str(tmp_path), "--out", str(tmp_path / "g.npy"), "--model", weights,
                     "--no-progress"]) == 0


@pytest.mark.parametrize("name, number, text, message", [
    ("face_tid_mid.txt", 2, "2.jpg x 2", "face_tid_mid.txt, line 2: expected 'image_name template_id media_id'"),
    ("name_5pts_score.txt", 2, "2.jpg 1 2 3", "name_5pts_score.txt, line 2: expected 'image_name x1 y1"),
    ("template_pair_label.txt", 3, "1 2", "template_pair_label.txt, line 3: expected 'template_id_1"),
    ("template_pair_label.txt", 3, "1 99999 0", "template_pair_label.txt, line 3: template 99999 has no images"),
    ("1N_gallery_G1.csv", 2, "123456,1,a.jpg", "1N_gallery_G1.csv, line 2: template 123456 has no images"),
])
def test_bad_meta_lines_name_file_and_line(ijb_root, tmp_path, name, number, text, message):
    shutil.copytree(ijb_root / "meta", tmp_path / "meta")
    path = tmp_path / "meta" / f"{PREFIX}_{name}"
    rows = path.read_text().splitlines()
    rows[number - 1] = text
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=re.escape(message)):
        read_ijb(tmp_path)


def test_missing_meta_files(tmp_path):
    with pytest.raises(DataError, match="no meta/\\*_face_tid_mid.txt"):
        read_ijb(tmp_path)
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "ijbc_face_tid_mid.txt").write_text("1.jpg 1 1\n")
    with pytest.raises(DataError, match="ijbc_name_5pts_score.txt: missing"):
        read_ijb(tmp_path)


def test_det_plot_survives_curves_with_nothing_to_show(tmp_path):
    perfect = (np.array([0.0, 0.0, 1.0]), np.array([0.0, 1.0, 1.0]))  # no error of either kind to put on log axes
    plot_det({"perfect": perfect}, tmp_path / "det.png", "DET")
    assert (tmp_path / "det.png").stat().st_size > 0
