import os
from pathlib import Path

import numpy as np
import pytest

from faceforge.data import synthface
from faceforge.data.binsets import load_bin
from faceforge.data.images import decode_image
from faceforge.data.recordio import RecordReader
from faceforge.data.synthface_render import render_images, stack_params
from faceforge.errors import ConfigError, DataError

TINY = dict(identities=6, images_per_id=3, eval_identities=20, eval_images_per_id=2, pairs=20, progress=False)
FILES = ("train/train.rec", "train/train.idx", "train/property", "heldout.bin", "synthface.json")


def _bytes(root: Path) -> dict[str, bytes]:
    return {name: (root / name).read_bytes() for name in FILES}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "set"
    synthface.generate(root, seed=3, workers=1, **TINY)
    return root


def test_same_seed_same_bytes_any_worker_count(tiny, tmp_path):
    synthface.generate(tmp_path / "pool", seed=3, workers=2, **TINY)
    assert _bytes(tmp_path / "pool") == _bytes(tiny)


def test_other_seed_other_images(tiny, tmp_path):
    synthface.generate(tmp_path / "other", seed=4, workers=1, **TINY)
    other = _bytes(tmp_path / "other")
    assert other["train/train.rec"] != _bytes(tiny)["train/train.rec"]
    assert other["heldout.bin"] != _bytes(tiny)["heldout.bin"]


def test_rec_counts_and_layout(tiny):
    with RecordReader(tiny / "train/train.rec", tiny / "train/train.idx") as reader:
        first_identity, end = (int(x) for x in reader.read_header(0).label)
        assert (first_identity - 1, end - first_identity) == (18, 6)
        for cls in range(6):
            start, stop = (int(x) for x in reader.read_header(first_identity + cls).label)
            assert stop - start == 3
            labels = {int(reader.read_header(key).label) for key in range(start, stop)}
            assert labels == {cls}
        header, body = reader.read(1)
        assert decode_image(body, "record 1").shape == (112, 112, 3)
    assert (tiny / "train/property").read_text().strip() == "6,112,112"


def test_heldout_bin_is_ten_folds_half_genuine(tiny):
    images, issame = load_bin(tiny / "heldout.bin")
    assert len(images) == 40 and len(issame) == 20
    assert issame.reshape(10, 2).sum(axis=1).tolist() == [1] * 10
    assert decode_image(images[0], "pair 0").shape == (112, 112, 3)


def test_pairs_structure_at_default_size():
    index, issame = synthface.make_pairs(0, identities=600, images_per_id=10, pairs=6000)
    assert index.shape == (6000, 2) and issame.sum() == 3000
    identity = index // 10
    assert np.array_equal(identity[:, 0] == identity[:, 1], issame)
    assert np.all(index[:, 0] != index[:, 1])
    folds = identity.reshape(10, 600, 2)
    for f in range(10):
        assert issame[600 * f:600 * f + 300].all() and not issame[600 * f + 300:600 * (f + 1)].any()
        assert set(folds[f].ravel()) <= set(range(60 * f, 60 * (f + 1)))  # folds share no identity
    unordered = {tuple(sorted(pair)) for pair in index.tolist()}
    assert len(unordered) == 6000


def test_train_and_heldout_identities_are_disjoint(tiny):
    def vector(split: int, i: int) -> np.ndarray:
        return np.concatenate(list(synthface.identity_params(0, split, i).values()))

    train = np.stack([vector(synthface.TRAIN, i) for i in range(200)])
    heldout = np.stack([vector(synthface.HELDOUT, i) for i in range(200)])
    gaps = np.linalg.norm(train[:, None] - heldout[None], axis=2)
    assert gaps.min() > 0.1
    images, _ = load_bin(tiny / "heldout.bin")
    assert not set(images) & set(_train_jpegs(tiny))


def _train_jpegs(root: Path) -> list[bytes]:
    with RecordReader(root / "train/train.rec", root / "train/train.idx") as reader:
        first_identity = int(reader.read_header(0).label[0])
        return [reader.read(key)[1] for key in range(1, first_identity)]


def test_cache_hit_and_mismatch(tiny):
    before = os.stat(tiny / "train/train.rec").st_mtime_ns
    meta = synthface.generate(tiny, seed=3, workers=1, **TINY)
    assert meta["counts"]["train_images"] == 18 and meta["params"]["seed"] == 3
    assert os.stat(tiny / "train/train.rec").st_mtime_ns == before
    with pytest.raises(DataError, match="other parameters"):
        synthface.generate(tiny, seed=5, workers=1, **TINY)
    assert not list(tiny.parent.glob("set.tmp-*"))


def test_refuses_foreign_folder_and_bad_counts(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not a SynthFace set"):
        synthface.generate(tmp_path, workers=1, **TINY)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="multiple of 20"):
        synthface.generate(tmp_path / "x", **{**TINY, "pairs": 30})


def test_render_images_shape_and_identity_consistency():
    identity = [synthface.identity_params(0, 0, i) for i in (0, 0, 1)]
    nuisance = [synthface.image_params(0, 0, 0, 0, 0.0)] * 3
    images = render_images(stack_params(identity), stack_params(nuisance))
    assert images.shape == (3, 112, 112, 3) and images.dtype == np.uint8
    assert np.array_equal(images[0], images[1]) and not np.array_equal(images[0], images[2])
