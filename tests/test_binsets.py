"""Verification .bin sets: round trip, Python-2 pickles, and refusing pickles that run code."""

from __future__ import annotations

import os
import pickle
import struct

import numpy as np
import pytest

from faceforge.data.binsets import load_bin, write_bin
from faceforge.errors import DataError


def test_round_trip(tmp_path):
    path = tmp_path / "lfw.bin"
    images = [b"a", b"bb", b"\x00\xff", b"d"]
    write_bin(path, images, [True, False])
    loaded, issame = load_bin(path)
    assert loaded == images
    assert issame.dtype == bool and issame.tolist() == [True, False]
    assert [p.name for p in tmp_path.iterdir()] == ["lfw.bin"]


def test_write_rejects_unpaired_images(tmp_path):
    with pytest.raises(ValueError):
        write_bin(tmp_path / "x.bin", [b"a", b"b", b"c"], [True])
    assert list(tmp_path.iterdir()) == []


class _RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_refuses_pickle_that_runs_code(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([_RunsShell(marker), b"x"], [True]), protocol=2))
    with pytest.raises(DataError, match="evil.bin") as info:
        load_bin(path)
    assert "system" in str(info.value) and not marker.exists()


def test_refuses_numpy_issame(tmp_path):
    path = tmp_path / "np.bin"
    path.write_bytes(pickle.dumps(([b"a", b"b"], np.array([True]))))
    with pytest.raises(DataError, match="np.bin"):
        load_bin(path)


def test_refuses_persistent_ids(tmp_path):
    path = tmp_path / "pid.bin"
    path.write_bytes(b"\x80\x02P0\n.")  # PERSID opcode
    with pytest.raises(DataError, match="persistent"):
        load_bin(path)


def python2_pickle(images: list[bytes], issame: list[bool]) -> bytes:
    """What Python 2 writes for (list of str, list of bool) at protocol 2: BINSTRING opcodes."""
    out = b"\x80\x02](" + b"".join(b"T" + struct.pack("<I", len(image)) + image for image in images) + b"e"
    out += b"](" + b"".join(b"\x88" if same else b"\x89" for same in issame) + b"e"
    return out + b"\x86."


def test_loads_python2_pickle(tmp_path):
    path = tmp_path / "py2.bin"
    path.write_bytes(python2_pickle([b"\xff\xd8one", b"\xff\xd8two"], [False]))
    images, issame = load_bin(path)
    assert images == [b"\xff\xd8one", b"\xff\xd8two"] and issame.tolist() == [False]


def test_loads_text_images_as_latin1(tmp_path):
    path = tmp_path / "str.bin"
    path.write_bytes(pickle.dumps((["\xff\xd8a", "b"], [1]), protocol=2))
    images, issame = load_bin(path)
    assert images == [b"\xff\xd8a", b"b"] and issame.tolist() == [True]


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not a pickle",
        pickle.dumps(([b"a"], [True])),
        pickle.dumps(([b"a", 3], [True])),
        pickle.dumps(([b"a", b"b"], [2])),
        pickle.dumps({"images": [], "issame": []}),
        pickle.dumps(([b"a", b"b"], [True]))[:-3],
    ],
)
def test_malformed_bins_raise_data_error(tmp_path, content):
    path = tmp_path / "bad.bin"
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        load_bin(path)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="absent.bin"):
        load_bin(tmp_path / "absent.bin")


def test_python3_protocol2_pickle_loads_but_other_codecs_calls_do_not(tmp_path):
    path = tmp_path / "p2.bin"
    path.write_bytes(pickle.dumps(([b"\xff\xd8a", b"\xff\xd8b"], [True]), protocol=2))
    images, issame = load_bin(path)
    assert images == [b"\xff\xd8a", b"\xff\xd8b"] and issame.tolist() == [True]
    evil = tmp_path / "evil.bin"
    evil.write_bytes(b"\x80\x02c_codecs\nencode\nq\x00X\x01\x00\x00\x00aX\x05\x00\x00\x00utf-7\x86R.")
    with pytest.raises(DataError, match="unexpected arguments"):
        load_bin(evil)
