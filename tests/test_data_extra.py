"""ImageFolderDataset, five-point alignment, and packing folders into .rec / .bin sets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from faceforge.data.align import ARCFACE_TEMPLATE, align_face, similarity_transform
from faceforge.data.binsets import load_bin
from faceforge.data.folder import ImageFolderDataset
from faceforge.data.images import decode_image
from faceforge.data.pack import pack_folder, pack_pairs
from faceforge.data.record_dataset import RecordDataset
from faceforge.data.recordio import RecordReader
from faceforge.errors import DataError

INSIGHTFACE_DST = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
)


def smooth_image(seed: int, height: int = 112, width: int = 112) -> np.ndarray:
    """A smooth colour field: survives JPEG well and differs per seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    channels = [np.sin(rng.uniform(1, 6) * x + rng.uniform(1, 6) * y + rng.uniform(0, 6)) for _ in range(3)]
    return ((np.stack(channels, -1) + 1) * 127.5).astype(np.uint8)


def save(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def make_tree(root: Path, sizes: dict[str, list[str]]) -> None:
    """root/<class>/<file>; a name ending in ':WxH' gets that size instead of 112×112."""
    seed = 0
    for name, files in sizes.items():
        for spec in files:
            filename, _, size = spec.partition(":")
            width, height = map(int, size.split("x")) if size else (112, 112)
            save(root / name / filename, smooth_image(seed, height, width))
            seed += 1


@pytest.fixture
def tree(tmp_path) -> Path:
    root = tmp_path / "faces"
    make_tree(root, {"bob": ["b1.png", "a0.JPG"], "alice": ["x.jpeg", "y.bmp", "z.jpg"], "carol": ["c.jpg:150x120"]})
    (root / "alice" / "notes.txt").write_text("not an image")
    (root / ".thumbnails").mkdir()
    (root / "README").write_text("ignored")
    return root


# --- ImageFolderDataset ----------------------------------------------------------------------------


def test_folder_dataset_labels_and_read(tree):
    ds = ImageFolderDataset(tree, resize=True)
    assert ds.class_names == ["alice", "bob", "carol"] and ds.num_classes == 3
    assert [p.name for p in ds.files] == ["x.jpeg", "y.bmp", "z.jpg", "a0.JPG", "b1.png", "c.jpg"]
    assert ds.labels.dtype == np.int64 and ds.labels.tolist() == [0, 0, 0, 1, 1, 2]
    image, label = ds[4]
    assert label == 1 and image.shape == (112, 112, 3) and image.dtype == np.uint8
    assert np.array_equal(image, np.array(Image.open(tree / "bob" / "b1.png")))  # PNG is lossless
    assert ds.read(5)[0].shape == (112, 112, 3)  # the 150x120 image, resized


def test_folder_dataset_size_check_and_corrupt_images(tree):
    with pytest.raises(DataError, match=r"carol/c\.jpg: image is 150x120"):
        ImageFolderDataset(tree).read(5)
    (tree / "alice" / "y.bmp").write_bytes(b"BM not really")
    with pytest.raises(DataError, match=r"alice/y\.bmp: cannot decode"):
        ImageFolderDataset(tree).read(1)
    skipping = ImageFolderDataset(tree, on_corrupt="skip")
    assert skipping.read(1) is None and skipping.read(5) is None and skipping.skipped == 2
    assert skipping.read(0) is not None and skipping.skipped == 2


def test_folder_dataset_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        ImageFolderDataset(tmp_path / "missing")
    with pytest.raises(DataError, match="no identity sub-folders"):
        ImageFolderDataset(tmp_path)
    make_tree(tmp_path, {"a": ["1.jpg"]})
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=r"/b: identity folder holds no"):
        ImageFolderDataset(tmp_path)


# --- alignment ----------------------------------------------------------------------------------


def test_template_matches_insightface_and_maps_to_itself():
    assert np.allclose(ARCFACE_TEMPLATE, INSIGHTFACE_DST, atol=1e-9)
    assert np.allclose(similarity_transform(ARCFACE_TEMPLATE, ARCFACE_TEMPLATE), np.eye(2, 3), atol=1e-12)
    image = smooth_image(3)
    assert np.array_equal(align_face(image, ARCFACE_TEMPLATE), image)  # pixel centres line up exactly


def test_known_similarity_is_recovered():
    rng = np.random.default_rng(1)
    for _ in range(20):
        angle, scale, shift = rng.uniform(-np.pi, np.pi), rng.uniform(0.2, 5), rng.uniform(-300, 300, 2)
        matrix = np.hstack([scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]),
                            shift[:, None]])
        src = rng.uniform(0, 250, (5, 2))
        assert np.allclose(similarity_transform(src, src @ matrix[:, :2].T + shift), matrix, atol=1e-6)


def test_noisy_fit_is_the_least_squares_similarity_and_never_a_reflection():
    rng = np.random.default_rng(2)
    src, dst = rng.uniform(0, 100, (5, 2)), ARCFACE_TEMPLATE + rng.normal(0, 3, (5, 2))
    # Independent check: x' = a x - b y + tx, y' = b x + a y + ty is linear in (a, b, tx, ty).
    rows = np.vstack([np.c_[src[:, 0], -src[:, 1], np.ones(5), np.zeros(5)],
                      np.c_[src[:, 1], src[:, 0], np.zeros(5), np.ones(5)]])
    a, b, tx, ty = np.linalg.lstsq(rows, np.r_[dst[:, 0], dst[:, 1]], rcond=None)[0]
    assert np.allclose(similarity_transform(src, dst), [[a, -b, tx], [b, a, ty]], atol=1e-9)
    mirrored = src * [-1, 1]
    assert np.linalg.det(similarity_transform(src, mirrored)[:, :2]) > 0
    with pytest.raises(ValueError, match="coincide"):
        similarity_transform(np.ones((5, 2)), dst)


@pytest.mark.parametrize("size", [112, 224])
def test_warped_landmark_blobs_land_on_the_template(size):
    angle, scale = 0.3, 1.6
    rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    landmarks = (ARCFACE_TEMPLATE - 56) @ rotation.T + [100.3, 90.7]
    y, x = np.mgrid[0:180, 0:200]
    canvas = np.zeros((180, 200, 3), np.uint8)
    for lx, ly in landmarks:
        canvas[..., 0] = np.maximum(canvas[..., 0], 255 * np.exp(-((x - lx) ** 2 + (y - ly) ** 2) / 8))
    warped = align_face(canvas, landmarks, size)[..., 0].astype(float)
    assert warped.shape == (size, size)
    wy, wx = np.mgrid[0:size, 0:size]
    for tx, ty in ARCFACE_TEMPLATE * size / 112:
        near = warped * (((wx - tx) ** 2 + (wy - ty) ** 2) < (6 * size / 112) ** 2)
        centre = np.array([(near * wx).sum(), (near * wy).sum()]) / near.sum()
        assert np.abs(centre - [tx, ty]).max() < 0.05 * size / 112  # a half-pixel convention slip would be 0.3+


# --- packing -------------------------------------------------------------------------------------


def read_set(out: Path) -> tuple[list, list[tuple[int, int]]]:
    with RecordReader(out / "train.rec", out / "train.idx") as reader:
        header = reader.read(0)[0]
        first_id, end = map(int, header.label)
        ranges = [tuple(map(int, reader.read(k)[0].label)) for k in range(first_id, end)]
        return reader.keys, ranges


def test_pack_folder_round_trip(tree, tmp_path):
    out = tmp_path / "rec"
    stats = pack_folder(tree, out, progress=False)
    assert stats["images"] == 6 and stats["classes"] == 3 and stats["resized"] == 1
    assert stats["resized_example"] == "carol/c.jpg" and stats["aligned"] == 0
    assert sorted(p.name for p in out.iterdir()) == ["classes.txt", "property", "train.idx", "train.rec"]
    assert (out / "classes.txt").read_text().split() == ["alice", "bob", "carol"]
    assert (out / "property").read_text().strip() == "3,112,112"
    keys, ranges = read_set(out)
    assert keys[0] == 0 and ranges == [(1, 4), (4, 6), (6, 7)]  # record 0 first, then images, then identities
    ds = RecordDataset(out)
    assert len(ds) == 6 and ds.num_classes == 3 and ds.labels.tolist() == [0, 0, 0, 1, 1, 2]
    folder = ImageFolderDataset(tree, resize=True)
    for i in range(6):
        image, label = ds.read(i)
        assert image.shape == (112, 112, 3) and label == folder.labels[i]
        assert np.abs(image.astype(int) - folder.read(i)[0]).mean() < 3  # JPEG q95 re-encoding


def test_pack_folder_with_landmarks_and_workers_identical(tree, tmp_path, monkeypatch):
    monkeypatch.setattr("faceforge.data.pack._CHUNK", 2)  # several chunks, so both workers get some
    folder = ImageFolderDataset(tree)
    marks = tmp_path / "marks.txt"
    lines = [f"./{p.relative_to(tree).as_posix()} " + " ".join(f"{v:.3f}" for v in (ARCFACE_TEMPLATE * 0.9 + i).ravel())
             for i, p in enumerate(folder.files)]
    marks.write_text("\n".join(lines[::-1]) + "\nunused/extra.jpg" + " 1" * 10 + "\n")
    one = pack_folder(tree, tmp_path / "one", landmarks=marks, workers=1, progress=False)
    assert pack_folder(tree, tmp_path / "two", landmarks=marks, workers=2, progress=False)["aligned"] == 6
    assert one["aligned"] == 6 and one["resized"] == 0 and one["landmarks_unused"] == 1
    for name in ("train.rec", "train.idx", "property", "classes.txt"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    ds = RecordDataset(tmp_path / "one")
    assert all(ds.read(i)[0].shape == (112, 112, 3) for i in range(len(ds)))
    marks.write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(DataError, match=r"no landmarks for .*alice/x\.jpeg \(1 of 6"):
        pack_folder(tree, tmp_path / "three", landmarks=marks, progress=False)
    marks.write_text("alice/x.jpeg 1 2 3\n")
    with pytest.raises(DataError, match=r"marks\.txt, line 1: expected"):
        pack_folder(tree, tmp_path / "three", landmarks=marks, progress=False)


def test_pack_folder_failure_leaves_previous_output(tree, tmp_path, monkeypatch):
    monkeypatch.setattr("faceforge.data.pack._CHUNK", 1)
    out = tmp_path / "rec"
    pack_folder(tree, out, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (tree / "bob" / "b1.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match=r"bob/b1\.png: cannot decode"):
        pack_folder(tree, out, workers=2, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temp files, old set intact
    with pytest.raises(DataError, match="inside the image folder"):
        pack_folder(tree, tree / "packed", progress=False)


def test_pack_pairs_round_trip(tree, tmp_path):
    pairs = tree / "pairs.txt"
    pairs.write_text("alice/x.jpeg alice/z.jpg 1\n\nalice/x.jpeg bob/b1.png 0\ncarol/c.jpg bob/a0.JPG 0\n")
    out = tmp_path / "set.bin"
    assert pack_pairs(pairs, out) == 3
    images, issame = load_bin(out)
    assert issame.tolist() == [True, False, False] and len(images) == 6
    assert images[0] == images[2]  # one encoding per distinct image
    assert all(decode_image(blob, "bin").shape == (112, 112, 3) for blob in images)
    marks = tmp_path / "marks.txt"
    marks.write_text("".join(f"{n} " + " ".join(map(str, ARCFACE_TEMPLATE.ravel())) + "\n"
                             for n in ("alice/x.jpeg", "alice/z.jpg", "bob/b1.png", "carol/c.jpg", "bob/a0.JPG")))
    assert pack_pairs(pairs, out, root=tree, landmarks=marks) == 3
    carol = decode_image(load_bin(out)[0][4], "bin").astype(int)  # template landmarks: a crop, not a resize
    assert np.abs(carol - np.array(Image.open(tree / "carol" / "c.jpg"))[:112, :112]).mean() < 3
    pairs.write_text("alice/x.jpeg alice/z.jpg yes\n")
    with pytest.raises(DataError, match=r"pairs\.txt, line 1"):
        pack_pairs(pairs, out)
