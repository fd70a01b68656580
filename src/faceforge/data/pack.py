"""Build InsightFace-layout training sets and verification .bin files from folders of images.

Every image is decoded (so a corrupt file fails here, not mid-training), aligned onto the ArcFace template when
5-point landmarks are given, else resized to 112×112 when it is not already, and re-encoded as JPEG.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path, PurePosixPath

import numpy as np
from tqdm import tqdm

from faceforge.data.align import align_face
from faceforge.data.binsets import write_bin
from faceforge.data.folder import list_images
from faceforge.data.images import decode_image, encode_jpeg
from faceforge.data.images import resize_face
from faceforge.data.record_dataset import SIZE
from faceforge.data.recordio import write_insightface_set
from faceforge.errors import DataError

QUALITY = 95
_CHUNK = 32


def read_landmarks(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Parse a landmarks file: lines `relative/path.jpg x1 y1 ... x5 y5` → {posix path: 5×2 float array}."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read landmarks ({getattr(exc, 'strerror', None) or exc})") from None
    points: dict[str, np.ndarray] = {}
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        try:
            if len(fields) != 11:
                raise ValueError
            values = np.array([float(v) for v in fields[1:]]).reshape(5, 2)
            if not np.isfinite(values).all():
                raise ValueError
        except ValueError:
            raise DataError(
                f"{path}, line {number}: expected 'relative/path x1 y1 ... x5 y5' (11 fields, no spaces in the "
                f"path), got {len(fields)} fields"
            ) from None
        key = _key(fields[0])
        if key in points:
            raise DataError(f"{path}, line {number}: {fields[0]} appears twice")
        points[key] = values
    return points


def _key(relative: str | PurePosixPath) -> str:
    """A landmarks-file path in one canonical spelling (`./a//b.jpg` → `a/b.jpg`)."""
    return str(PurePosixPath(relative))


def prepare_image(path: str, landmarks: np.ndarray | None, quality: int) -> tuple[bytes, bool]:
    """(112×112 JPEG bytes, whether a resize was needed) for one image file; DataError names the file."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read image ({exc.strerror or exc})") from None
    image = decode_image(data, path)
    resized = False
    if landmarks is not None:
        try:
            image = align_face(image, landmarks, SIZE)
        except ValueError as exc:
            raise DataError(f"{path}: cannot align ({exc})") from None
    elif image.shape[:2] != (SIZE, SIZE):
        image = resize_face(image)
        resized = True
    return encode_jpeg(image, quality), resized


def _prepare_chunk(tasks: list[tuple[str, np.ndarray | None, int]]) -> list[tuple[bytes, bool]]:
    return [prepare_image(*task) for task in tasks]


def _prepared(tasks: list[tuple[str, np.ndarray | None, int]], workers: int) -> Iterator[tuple[bytes, bool]]:
    """prepare_image over `tasks` in order: in this process, or a spawn pool with a few chunks in flight per worker
    (bounded memory on millions of images) that stops at the first error."""
    chunks = (tasks[i : i + _CHUNK] for i in range(0, len(tasks), _CHUNK))
    if workers <= 1:
        for chunk in chunks:
            yield from _prepare_chunk(chunk)
        return
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        pending: deque[Future] = deque()
        for chunk in chunks:
            pending.append(pool.submit(_prepare_chunk, chunk))
            if len(pending) >= 4 * workers:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class _Stream(Sequence):
    """A one-pass iterable of known length: lets write_insightface_set put record 0 first in the file."""

    def __init__(self, items: Iterable, length: int) -> None:
        self._items, self._length = items, length

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator:
        return iter(self._items)

    def __getitem__(self, index):
        raise TypeError("a one-pass stream has no random access")


def _match_landmarks(
    relative: list[str], landmarks: str | os.PathLike | None, where: Path
) -> tuple[list[np.ndarray | None], int]:
    """Landmarks per image (None without a file) and how many file entries matched no image."""
    if landmarks is None:
        return [None] * len(relative), 0
    points = read_landmarks(landmarks)
    missing = [path for path in relative if path not in points]
    if missing:
        raise DataError(
            f"{landmarks}: no landmarks for {where / missing[0]} ({len(missing)} of {len(relative)} images missing)"
        )
    return [points[path] for path in relative], len(points) - len(relative)


def pack_folder(
    image_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    landmarks: str | os.PathLike | None = None,
    workers: int = 1,
    quality: int = QUALITY,
    progress: bool = True,
) -> dict:
    """Pack `image_root/<identity>/<image>` into `out_dir/train.rec, train.idx, property` (InsightFace layout).

    Output is byte-identical for any `workers`; the three files appear only once all are complete.
    Returns counts: images, classes, aligned, resized (non-112×112 images rescaled without landmarks).
    """
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
    start = time.perf_counter()
    root, out = Path(image_root), Path(out_dir)
    if out.resolve().is_relative_to(root.resolve()):
        raise DataError(f"{out}: output folder lies inside the image folder {root}; choose another")
    classes, files, labels = list_images(root)
    relative = [_key(path.relative_to(root).as_posix()) for path in files]
    points, unused = _match_landmarks(relative, landmarks, root)
    tasks = [(str(path), lm, quality) for path, lm in zip(files, points)]
    resized: list[str] = []

    def samples() -> Iterator[tuple[bytes, int]]:
        results = _prepared(tasks, workers)
        for name, label, (jpeg, was_resized) in zip(relative, labels.tolist(), tqdm(
                results, total=len(tasks), desc="pack", unit="img", disable=not progress)):
            if was_resized:
                resized.append(name)
            yield jpeg, label

    out.mkdir(parents=True, exist_ok=True)
    staging = out / f".pack-{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        write_insightface_set(staging, _Stream(samples(), len(tasks)), len(classes), (SIZE, SIZE))
        (staging / "classes.txt").write_text("".join(f"{name}\n" for name in classes), encoding="utf-8")
        for name in ("train.rec", "train.idx", "classes.txt", "property"):
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {
        "out_dir": str(out),
        "images": len(tasks),
        "classes": len(classes),
        "aligned": len(tasks) if landmarks is not None else 0,
        "resized": len(resized),
        "resized_example": resized[0] if resized else None,
        "landmarks_unused": unused,
        "seconds": round(time.perf_counter() - start, 2),
    }


def read_pairs(pairs_txt: str | os.PathLike) -> list[tuple[str, str, bool]]:
    """Parse a pairs list: lines `path_a path_b 1|0` (1 = same identity)."""
    pairs_txt = Path(pairs_txt)
    try:
        text = pairs_txt.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{pairs_txt}: cannot read pairs ({getattr(exc, 'strerror', None) or exc})") from None
    pairs = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 3 or fields[2] not in ("0", "1"):
            raise DataError(f"{pairs_txt}, line {number}: expected 'path_a path_b 1|0', got {line.strip()[:80]!r}")
        pairs.append((fields[0], fields[1], fields[2] == "1"))
    if not pairs:
        raise DataError(f"{pairs_txt}: no pairs")
    return pairs


def pack_pairs(
    pairs_txt: str | os.PathLike,
    out_bin: str | os.PathLike,
    root: str | os.PathLike | None = None,
    landmarks: str | os.PathLike | None = None,
) -> int:
    """Write a verification .bin from a pairs list; paths are relative to `root` (default: the list's folder).

    Images are aligned with `landmarks` (paths relative to the same folder) when given. Returns the pair count.
    """
    base = Path(root) if root is not None else Path(pairs_txt).parent
    pairs = read_pairs(pairs_txt)
    points = read_landmarks(landmarks) if landmarks is not None else None
    encoded: dict[str, bytes] = {}
    images = []
    for a, b, _ in pairs:
        for name in (a, b):
            key = _key(name)
            if key not in encoded:
                lm = None
                if points is not None:
                    if key not in points:
                        raise DataError(f"{landmarks}: no landmarks for {base / key}")
                    lm = points[key]
                encoded[key] = prepare_image(str(base / key), lm, QUALITY)[0]
            images.append(encoded[key])
    write_bin(out_bin, images, [same for _, _, same in pairs])
    return len(pairs)
