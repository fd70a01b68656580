"""MXNet RecordIO (.rec/.idx) reading and writing without MXNet.

Framing follows dmlc-core: each piece is magic, lrecord (cflag in the top 3 bits, length in the
low 29), data zero-padded to 4 bytes. A payload holding the magic at a 4-byte-aligned position is
split there into pieces (cflag 1 first, 2 middle, 3 last) and the magic itself is dropped.
"""

from __future__ import annotations

import operator
import os
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from faceforge.errors import DataError
from faceforge.fileio import atomic_write

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_FRAME = struct.Struct("<II")
_IR = struct.Struct("<IfQQ")
_LENGTH_MASK = (1 << 29) - 1
# float32 labels address keys exactly only up to 2**24.
_MAX_EXACT_KEY = 1 << 24

Label = float | tuple[float, ...]


class IRHeader(NamedTuple):
    """MXNet's image-record header; a tuple label is stored as a float32 array after the header."""

    flag: int
    label: Label
    id: int
    id2: int


def pack_record(header: IRHeader, body: bytes) -> bytes:
    """Serialise header and body the way `mx.recordio.pack` does (flag = label-array length)."""
    if isinstance(header.label, (tuple, list, np.ndarray)):
        values = np.asarray(header.label, dtype="<f4").ravel()
        if values.size == 0:
            raise ValueError("a label array needs at least one value")
        head = _IR.pack(values.size, 0.0, header.id, header.id2) + values.tobytes()
    else:
        head = _IR.pack(0, float(header.label), header.id, header.id2)
    return head + bytes(body)


def unpack_record(payload: bytes, where: str) -> tuple[IRHeader, bytes]:
    """Split a record payload into its header and body; `where` names file and key in errors."""
    if len(payload) < _IR.size:
        raise DataError(f"{where}: record header is {len(payload)} bytes, need {_IR.size}")
    flag, label, id_, id2 = _IR.unpack_from(payload)
    if flag == 0:
        return IRHeader(0, label, id_, id2), payload[_IR.size :]
    end = _IR.size + 4 * flag
    if end > len(payload):
        raise DataError(f"{where}: label array of {flag} values runs past the {len(payload)}-byte payload")
    values = np.frombuffer(payload, dtype="<f4", count=flag, offset=_IR.size)
    return IRHeader(flag, tuple(values.tolist()), id_, id2), payload[end:]


def _frame(payload: bytes) -> bytes:
    """Encode one payload as dmlc RecordIO pieces, splitting at aligned copies of the magic."""
    aligned = len(payload) // 4 * 4
    words = np.frombuffer(payload, dtype="<u4", count=aligned // 4)
    splits = (np.flatnonzero(words == MAGIC) * 4).tolist()
    pieces = []
    start = 0
    for cflag, cut in zip([1] + [2] * len(splits), splits):
        pieces += [_FRAME.pack(MAGIC, (cflag << 29) | (cut - start)), payload[start:cut]]
        start = cut + 4
    last = len(payload) - start
    pieces += [_FRAME.pack(MAGIC, ((3 if splits else 0) << 29) | last), payload[start:]]
    pieces.append(b"\0" * (-len(payload) % 4))
    return b"".join(pieces)


def _temp(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


class RecordWriter:
    """Writes a .rec/.idx pair into temp files that replace the final names only on a clean close."""

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike) -> None:
        self._paths = (Path(rec_path), Path(idx_path))
        self._rec = open(_temp(self._paths[0]), "wb")
        try:
            self._idx = open(_temp(self._paths[1]), "w", encoding="ascii")
        except BaseException:
            self._rec.close()
            _temp(self._paths[0]).unlink()
            raise
        self._offset = 0
        self._keys: set[int] = set()
        self._open = True

    def write(self, key: int, payload: bytes) -> None:
        """Append one record under `key` (an int, unique within the file)."""
        key = operator.index(key)
        if key in self._keys:
            raise ValueError(f"duplicate record key {key}")
        if len(payload) > _LENGTH_MASK:
            raise ValueError(f"record {key} is {len(payload)} bytes; RecordIO allows at most {_LENGTH_MASK}")
        framed = _frame(bytes(payload))
        self._rec.write(framed)
        self._idx.write(f"{key}\t{self._offset}\n")
        self._offset += len(framed)
        self._keys.add(key)

    def close(self) -> None:
        """Flush both files to disk and move them to their final names."""
        if not self._open:
            return
        self._open = False
        for handle in (self._rec, self._idx):
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
        for path in self._paths:
            os.replace(_temp(path), path)

    def discard(self) -> None:
        """Drop everything written so far, leaving no file behind."""
        if not self._open:
            return
        self._open = False
        for handle, path in zip((self._rec, self._idx), self._paths):
            handle.close()
            _temp(path).unlink(missing_ok=True)

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.discard()


def _parse_idx(idx_path: Path) -> tuple[list[int], dict[int, int]]:
    try:
        text = idx_path.read_bytes().decode("ascii")
    except OSError as exc:
        raise DataError(f"{idx_path}: cannot read index ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise DataError(f"{idx_path}: index is not ASCII text") from None
    keys: list[int] = []
    offsets: dict[int, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        try:
            if len(fields) != 2:
                raise ValueError
            key, offset = int(fields[0]), int(fields[1])
        except ValueError:
            raise DataError(f"{idx_path}, line {number}: expected 'key<TAB>offset', got {line.strip()[:60]!r}") from None
        if key in offsets:
            raise DataError(f"{idx_path}, line {number}: key {key} appears twice")
        keys.append(key)
        offsets[key] = offset
    return keys, offsets


class RecordReader:
    """Random access to an indexed .rec; safe to share with forked DataLoader workers."""

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike) -> None:
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path)
        if not self.rec_path.is_file():
            raise DataError(f"{self.rec_path}: record file not found")
        self.keys, self.offsets = _parse_idx(self.idx_path)
        self._handle = None
        self._pid: int | None = None
        self._size = 0

    def where(self, key: int) -> str:
        """How errors name a record: the .rec path and the key."""
        return f"{self.rec_path}, key {key}"

    def read(self, key: int) -> tuple[IRHeader, bytes]:
        """Header and body of the record stored under `key`."""
        return unpack_record(self._payload(key), self.where(key))

    def read_header(self, key: int) -> IRHeader:
        """Header of the record under `key`, reading only the bytes it needs."""
        head = self._payload(key, limit=_IR.size)
        flag = _IR.unpack_from(head)[0] if len(head) == _IR.size else 0
        if flag:
            head = self._payload(key, limit=_IR.size + 4 * flag)
        return unpack_record(head, self.where(key))[0]

    def close(self) -> None:
        """Release the file handle; the next read reopens it."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> RecordReader:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_handle=None, _pid=None, _size=0)
        return state

    def _file(self):
        if self._handle is None or self._pid != os.getpid():
            # After a fork the inherited handle shares its file position with the parent.
            self._handle = open(self.rec_path, "rb", buffering=0)
            self._pid = os.getpid()
            self._size = os.fstat(self._handle.fileno()).st_size
        return self._handle

    def _payload(self, key: int, limit: int | None = None) -> bytes:
        """Join the pieces of one record, stopping early once `limit` bytes are known."""
        where = self.where(key)
        try:
            offset = self.offsets[key]
        except KeyError:
            raise DataError(f"{where}: key is not in the index {self.idx_path}") from None
        handle = self._file()
        if not 0 <= offset <= self._size - _FRAME.size:
            raise DataError(f"{where}: index offset {offset} is outside the {self._size}-byte file")
        parts: list[bytes] = []
        got = 0
        allowed = (0, 1)
        while True:
            if offset + _FRAME.size > self._size:
                raise DataError(f"{where}: record continues past the end of the file at offset {offset}")
            handle.seek(offset)
            magic, lrecord = _FRAME.unpack(_read_exact(handle, _FRAME.size, where))
            if magic != MAGIC:
                raise DataError(f"{where}: bad magic 0x{magic:08x} at offset {offset}")
            cflag, length = lrecord >> 29, lrecord & _LENGTH_MASK
            if cflag not in allowed:
                raise DataError(f"{where}: broken piece sequence (cflag {cflag}) at offset {offset}")
            if offset + _FRAME.size + length > self._size:
                raise DataError(f"{where}: {length}-byte record at offset {offset} runs past the end of the file")
            want = length if limit is None else min(length, limit - got)
            parts.append(_read_exact(handle, want, where))
            got += want
            if cflag in (0, 3) or (limit is not None and got >= limit):
                break
            parts.append(_MAGIC_BYTES)
            got += len(_MAGIC_BYTES)
            offset += _FRAME.size + (length + 3) // 4 * 4
            allowed = (2, 3)
        payload = b"".join(parts)
        return payload if limit is None else payload[:limit]


def _read_exact(handle, size: int, where: str) -> bytes:
    data = handle.read(size)
    if len(data) != size:
        raise DataError(f"{where}: file ended early (was it truncated while open?)")
    return data


def read_record(
    rec_path: str | os.PathLike, idx_path: str | os.PathLike, key: int
) -> tuple[tuple[int, Label, int, int], bytes]:
    """The raw ((flag, label, id, id2), body) of one record; opens and closes the files."""
    with RecordReader(rec_path, idx_path) as reader:
        return reader.read(key)


def write_insightface_set(
    out_dir: str | os.PathLike,
    samples: Iterable[tuple[bytes, int]],
    num_classes: int,
    image_size: tuple[int, int] = (112, 112),
) -> int:
    """Write `train.rec/.idx/property` in InsightFace's layout; returns the number of images.

    Samples are (encoded image, class) grouped by class 0..num_classes-1 in order. Record 0 holds
    label (a, b): images are keys 1..a-1, identity records a..b-1 hold each class's [start, end).
    Readers go through the index, so record 0 may sit at the end of the file when `samples` is a
    one-pass iterable and the counts are unknown up front.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    last_image_key = _MAX_EXACT_KEY - num_classes - 1
    counted = len(samples) if isinstance(samples, Sequence) else None
    if counted is not None and counted > last_image_key:
        raise ValueError(f"{counted} images and {num_classes} classes exceed the 2**24 keys float32 labels can address")
    ranges: list[list[int]] = []
    key = 1
    with RecordWriter(out / "train.rec", out / "train.idx") as writer:
        if counted is not None:
            writer.write(0, pack_record(IRHeader(2, (counted + 1, counted + 1 + num_classes), 0, 0), b""))
        for body, label in samples:
            label = operator.index(label)
            if label == len(ranges) and label < num_classes:
                ranges.append([key, key])
            elif not ranges or label != len(ranges) - 1:
                raise ValueError(
                    f"sample {key - 1} has class {label}; samples must come grouped by class 0..{num_classes - 1} in order"
                )
            if key > last_image_key:
                raise ValueError(f"more images than the 2**24 keys float32 labels can address with {num_classes} classes")
            writer.write(key, pack_record(IRHeader(0, float(label), key, 0), body))
            ranges[-1][1] = key + 1
            key += 1
        if len(ranges) != num_classes:
            raise ValueError(f"samples cover {len(ranges)} classes, expected {num_classes}")
        first_identity = key
        for offset, (start, end) in enumerate(ranges):
            identity_key = first_identity + offset
            writer.write(identity_key, pack_record(IRHeader(2, (start, end), identity_key, 0), b""))
        if counted is None:
            writer.write(0, pack_record(IRHeader(2, (first_identity, first_identity + num_classes), 0, 0), b""))
    prop = f"{num_classes},{image_size[0]},{image_size[1]}\n"
    atomic_write(out / "property", lambda tmp: Path(tmp).write_text(prop, encoding="ascii"))
    return key - 1
