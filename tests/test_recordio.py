"""RecordIO framing, InsightFace layout, RecordDataset and corruption handling."""

from __future__ import annotations

import functools
import pickle
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from faceforge.data.images import decode_image, encode_jpeg
from faceforge.data.record_dataset import RecordDataset
from faceforge.data.recordio import (
    MAGIC,
    IRHeader,
    RecordReader,
    RecordWriter,
    pack_record,
    read_record,
    unpack_record,
    write_insightface_set,
)
from faceforge.errors import DataError

MAGIC_BYTES = struct.pack("<I", MAGIC)


def face(seed: int, size: int = 112) -> bytes:
    rng = np.random.default_rng(seed)
    return encode_jpeg(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), quality=80)


def write_records(tmp_path: Path, records: dict[int, bytes]) -> tuple[Path, Path]:
    rec, idx = tmp_path / "a.rec", tmp_path / "a.idx"
    with RecordWriter(rec, idx) as writer:
        for key, payload in records.items():
            writer.write(key, payload)
    return rec, idx


def make_set(root: Path, per_class: tuple[int, ...] = (2, 3, 1), iterable: bool = False) -> list[tuple[bytes, int]]:
    samples = [(face(10 * label + i), label) for label, count in enumerate(per_class) for i in range(count)]
    write_insightface_set(root, iter(samples) if iterable else samples, num_classes=len(per_class))
    return samples


# --- framing ---------------------------------------------------------------------------------

def test_pack_unpack_scalar_and_array_labels():
    header, body = unpack_record(pack_record(IRHeader(9, 3.0, 7, 8), b"xyz"), "w")
    assert header == IRHeader(0, 3.0, 7, 8) and body == b"xyz"  # scalar labels force flag 0, as MXNet does
    header, body = unpack_record(pack_record(IRHeader(0, (1.5, 2.0, -3.0), 1, 2), b"img"), "w")
    assert header == IRHeader(3, (1.5, 2.0, -3.0), 1, 2) and body == b"img"


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"abc",
        MAGIC_BYTES,
        MAGIC_BYTES + b"tail1",
        b"head" + MAGIC_BYTES + b"mid." + MAGIC_BYTES + MAGIC_BYTES + b"end",
        b"x" + MAGIC_BYTES + b"yz",  # unaligned magic is not split
        b"abcd" + MAGIC_BYTES,
    ],
)
def test_round_trip_including_split_records(tmp_path, payload):
    rec, idx = write_records(tmp_path, {5: b"before", 6: payload, 7: b"after!"})
    with RecordReader(rec, idx) as reader:
        assert reader.keys == [5, 6, 7]
        assert reader._payload(6) == payload
        assert reader._payload(7) == b"after!"
    assert rec.stat().st_size % 4 == 0


def test_split_record_framing_matches_dmlc(tmp_path):
    rec, idx = write_records(tmp_path, {0: b"abcd" + MAGIC_BYTES + b"efgh" + MAGIC_BYTES + b"ij"})
    raw = rec.read_bytes()
    frames = [struct.unpack_from("<II", raw, at) for at in (0, 12, 24)]
    assert [(magic, lrec >> 29, lrec & (2**29 - 1)) for magic, lrec in frames] == [
        (MAGIC, 1, 4),
        (MAGIC, 2, 4),
        (MAGIC, 3, 2),
    ]
    assert raw[32:] == b"ij\0\0" and idx.read_text() == "0\t0\n"


def test_read_record_and_headers(tmp_path):
    rec, idx = write_records(tmp_path, {3: pack_record(IRHeader(0, (4.0, 9.0), 3, 0), b"\x0a\x23\xd7\xce" * 3)})
    (flag, label, id_, id2), body = read_record(rec, idx, 3)
    assert (flag, label, id_, id2) == (2, (4.0, 9.0), 3, 0) and body == MAGIC_BYTES * 3
    assert RecordReader(rec, idx).read_header(3) == IRHeader(2, (4.0, 9.0), 3, 0)


def test_writer_leaves_nothing_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with RecordWriter(tmp_path / "a.rec", tmp_path / "a.idx") as writer:
            writer.write(0, b"data")
            raise RuntimeError
    assert list(tmp_path.iterdir()) == []


def test_reader_reopens_after_fork_and_pickles_without_handle(tmp_path):
    rec, idx = write_records(tmp_path, {1: b"one!", 2: b"two"})
    reader = RecordReader(rec, idx)
    reader._payload(1)
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._handle is None and clone._payload(2) == b"two"
    reader._pid = -1  # what a forked child sees
    assert reader._payload(2) == b"two"


# --- InsightFace layout and RecordDataset -----------------------------------------------------

@pytest.mark.parametrize("iterable", [False, True])
def test_insightface_layout(tmp_path, iterable):
    make_set(tmp_path, (2, 3, 1), iterable=iterable)
    assert (tmp_path / "property").read_text() == "3,112,112\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["property", "train.idx", "train.rec"]
    reader = RecordReader(tmp_path / "train.rec", tmp_path / "train.idx")
    assert sorted(reader.keys) == list(range(10))
    assert reader.read(0) == (IRHeader(2, (7.0, 10.0), 0, 0), b"")
    ranges = [reader.read(key)[0].label for key in (7, 8, 9)]
    assert ranges == [(1.0, 3.0), (3.0, 6.0), (6.0, 7.0)]
    assert [reader.read_header(key).label for key in range(1, 7)] == [0.0, 0.0, 1.0, 1.0, 1.0, 2.0]


@pytest.mark.parametrize("labels", [[1, 0], [0, 2], [0, 1, 0], [0], [-1, 0]])
def test_insightface_set_rejects_ungrouped_labels(tmp_path, labels):
    with pytest.raises(ValueError):
        write_insightface_set(tmp_path, [(b"img", label) for label in labels], num_classes=2)
    assert list(tmp_path.iterdir()) == []


def test_record_dataset(tmp_path):
    samples = make_set(tmp_path, (2, 3, 1))
    ds = RecordDataset(tmp_path)
    assert len(ds) == 6 and ds.num_classes == 3
    assert ds.labels.dtype == np.int64 and ds.labels.tolist() == [0, 0, 1, 1, 1, 2]
    image, label = ds[3]
    assert image.shape == (112, 112, 3) and image.dtype == np.uint8 and label == 1
    assert np.array_equal(image, decode_image(samples[3][0], "x"))


def test_record_dataset_without_header_or_property(tmp_path):
    rec, idx = tmp_path / "train.rec", tmp_path / "train.idx"
    with RecordWriter(rec, idx) as writer:
        for key, label in enumerate([4, 1, 2]):
            writer.write(key, pack_record(IRHeader(0, (float(label), 0.5), key, 0), face(key, size=96)))
    ds = RecordDataset(tmp_path, resize=True)
    assert len(ds) == 3 and ds.num_classes == 5 and ds.labels.tolist() == [4, 1, 2]
    assert ds.read(0)[0].shape == (112, 112, 3)
    with pytest.raises(DataError, match=r"train\.rec, key 0: image is 96x96"):
        RecordDataset(tmp_path).read(0)


def test_dataloader_with_workers(tmp_path):
    make_set(tmp_path, (3, 3))
    loader = torch.utils.data.DataLoader(RecordDataset(tmp_path), batch_size=2, num_workers=2)
    batches = list(loader)
    assert sum(len(labels) for _, labels in batches) == 6
    assert batches[0][0].shape == (2, 112, 112, 3)
    assert torch.cat([labels for _, labels in batches]).tolist() == [0, 0, 0, 1, 1, 1]


# --- corruption -------------------------------------------------------------------------------

def corrupt_set(tmp_path: Path, how: str) -> None:
    make_set(tmp_path, (2, 2))
    rec, idx = tmp_path / "train.rec", tmp_path / "train.idx"
    offsets = dict(line.split("\t") for line in idx.read_text().splitlines())
    at = int(offsets["2"])
    data = bytearray(rec.read_bytes())
    if how == "bad magic":
        data[at] ^= 0xFF
    elif how == "truncated":
        data = data[: at + 40]
    elif how == "offset outside":
        idx.write_text(idx.read_text().replace(f"2\t{at}\n", f"2\t{len(data) + 8}\n"))
    elif how == "undecodable":
        data[at + 8 + 24 : at + 8 + 200] = bytes(192)
    elif how == "missing key":
        idx.write_text("".join(f"{k}\t{v}\n" for k, v in offsets.items() if k != "2"))
    rec.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["bad magic", "truncated", "offset outside", "undecodable", "missing key"])
def test_corrupt_record_names_file_and_key(tmp_path, how):
    corrupt_set(tmp_path, how)
    ds = RecordDataset(tmp_path)
    with pytest.raises(DataError) as info:
        ds.read(1)
    message = str(info.value)
    assert "\n" not in message and f"{tmp_path / 'train.rec'}, key 2" in message
    skipping = RecordDataset(tmp_path, on_corrupt="skip")
    assert skipping.read(1) is None and skipping.skipped == 1
    assert skipping.read(0)[1] == 0


def test_skipped_counts_across_workers(tmp_path):
    corrupt_set(tmp_path, "bad magic")
    ds = RecordDataset(tmp_path, on_corrupt="skip")
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=2, collate_fn=lambda batch: batch[0])
    assert [item is None for item in loader] == [False, True, False, False]
    assert ds.skipped == 1


def test_malformed_index_line(tmp_path):
    (tmp_path / "train.rec").write_bytes(b"")
    (tmp_path / "train.idx").write_text("0\t0\nnot an index line\n")
    with pytest.raises(DataError, match=r"train\.idx, line 2"):
        RecordDataset(tmp_path)


# --- fuzzing ----------------------------------------------------------------------------------

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def exercise(root: Path) -> None:
    """Everything a trainer does with a dataset; only DataError may escape."""
    try:
        ds = RecordDataset(root, resize=True)
        ds.labels
        ds.num_classes
        for i in range(len(ds)):
            try:
                ds.read(i)
            except DataError:
                pass
    except DataError:
        pass


INDEX_LINES = st.lists(st.tuples(st.integers(-5, 5), st.integers(-8, 320)), max_size=6).map(
    lambda pairs: "".join(f"{key}\t{offset}\n" for key, offset in pairs).encode()
)


@FUZZ
@given(rec=st.binary(max_size=300), idx=st.one_of(INDEX_LINES, st.binary(max_size=40)))
def test_fuzz_random_bytes(rec, idx):
    with tempfile.TemporaryDirectory() as name:
        root = Path(name)
        (root / "train.rec").write_bytes(rec)
        (root / "train.idx").write_bytes(idx)
        exercise(root)


@functools.cache
def valid_set() -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as name:
        root = Path(name)
        samples = [(face(i, size=16), label) for i, label in enumerate([0, 0, 1])]
        samples.append((b"\x0a\x23\xd7\xce" * 4 + face(9, size=16), 1))  # forces a split record
        write_insightface_set(root, samples, num_classes=2)
        return {p.name: p.read_bytes() for p in root.iterdir()}


@FUZZ
@given(data=st.data())
def test_fuzz_mutated_set(data):
    files = valid_set()
    rec = bytearray(files["train.rec"])
    for _ in range(data.draw(st.integers(1, 8))):
        rec[data.draw(st.integers(0, len(rec) - 1))] = data.draw(st.integers(0, 255))
    rec = rec[: data.draw(st.integers(0, len(rec)))]
    with tempfile.TemporaryDirectory() as name:
        root = Path(name)
        (root / "train.rec").write_bytes(bytes(rec))
        (root / "train.idx").write_bytes(files["train.idx"])
        exercise(root)
