"""Training images from an InsightFace-style `train.rec` / `train.idx` folder."""

from __future__ import annotations

import multiprocessing
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import numpy as np

from faceforge.data.images import FACE_SIZE, decode_image, resize_face
from faceforge.data.recordio import IRHeader, RecordReader
from faceforge.errors import DataError

SIZE = FACE_SIZE


class FaceImages:
    """What RecordDataset and ImageFolderDataset share: the 112×112 check (or resize) and the on_corrupt policy.

    Subclasses implement `_load(index) -> (image, label)`, raising DataError for a bad sample; with
    `on_corrupt="skip"`, `read` returns None instead and counts it in `skipped` (shared with DataLoader workers).
    """

    def __init__(self, resize: bool, on_corrupt: str) -> None:
        if on_corrupt not in ("raise", "skip"):
            raise ValueError(f"on_corrupt must be 'raise' or 'skip', got {on_corrupt!r}")
        self.resize = resize
        self.on_corrupt = on_corrupt
        self._skipped = multiprocessing.Value("q", 0)

    @property
    def skipped(self) -> int:
        """How many corrupt samples `read` has skipped, across all worker processes."""
        return self._skipped.value

    def __getitem__(self, index: int) -> tuple[np.ndarray, int] | None:
        return self.read(index)

    def read(self, index: int) -> tuple[np.ndarray, int] | None:
        """The image and class at `index`; None for a corrupt sample when skipping."""
        try:
            return self._load(index)
        except DataError:
            if self.on_corrupt == "raise":
                raise
            with self._skipped.get_lock():
                self._skipped.value += 1
            return None

    def _load(self, index: int) -> tuple[np.ndarray, int]:
        raise NotImplementedError

    def _fit(self, image: np.ndarray, where: str) -> np.ndarray:
        """`image` at 112×112: as is, bilinearly resized when `resize`, else a DataError naming `where`."""
        if image.shape[:2] == (SIZE, SIZE):
            return image
        if not self.resize:
            raise DataError(
                f"{where}: image is {image.shape[1]}x{image.shape[0]}, expected {SIZE}x{SIZE} (resize=True rescales it)"
            )
        return resize_face(image)


class RecordDataset(FaceImages):
    """Map-style dataset of (uint8 112×112×3 RGB, class) read from `root/train.rec`.

    With a header record (key 0: label (a, b), empty body) the images are keys 1..a-1; without one
    every indexed key is an image. `on_corrupt="skip"` makes `read` return None for a bad record
    and count it in `skipped` (shared with DataLoader workers).
    """

    def __init__(self, root: str | Path, resize: bool = False, on_corrupt: str = "raise") -> None:
        super().__init__(resize, on_corrupt)
        self.root = Path(root)
        self.reader = RecordReader(self.root / "train.rec", self.root / "train.idx")
        self.keys = self._image_keys()

    def __len__(self) -> int:
        return len(self.keys)

    @cached_property
    def labels(self) -> np.ndarray:
        """Class of every image (int64), from record headers only; -1 marks unreadable ones when skipping."""
        labels = np.empty(len(self.keys), dtype=np.int64)
        for i, key in enumerate(self.keys):
            try:
                labels[i] = self._class_of(self.reader.read_header(key), key)
            except DataError:
                if self.on_corrupt == "raise":
                    raise
                labels[i] = -1
        return labels

    @cached_property
    def num_classes(self) -> int:
        """From the `property` file when present, else the largest label + 1."""
        path = self.root / "property"
        if not path.exists():
            return int(self.labels.max(initial=-1)) + 1
        try:
            count = int(path.read_text(encoding="ascii").split(",")[0])
        except (OSError, UnicodeDecodeError, ValueError):
            count = 0
        if count < 1:
            raise DataError(f"{path}: expected 'num_classes,height,width' on the first line")
        return count

    def _load(self, index: int) -> tuple[np.ndarray, int]:
        key = self.keys[index]
        where = self.reader.where(key)
        header, body = self.reader.read(key)
        label = self._class_of(header, key)
        return self._fit(decode_image(body, where), where), label

    def _image_keys(self) -> Sequence[int]:
        keys = self.reader.keys
        if 0 not in self.reader.offsets:
            return keys
        header, body = self.reader.read(0)
        # A header record has label (a, b) and no image; a multi-label image stored at key 0 of a
        # header-less rec would otherwise be mistaken for one and silently drop the data.
        if header.flag < 2 or body:
            return keys
        end = header.label[0]
        if not (1 <= end <= len(keys) and end == int(end)):
            raise DataError(f"{self.reader.where(0)}: header record label {header.label} has no valid image-key end")
        return range(1, int(end))

    def _class_of(self, header: IRHeader, key: int) -> int:
        value = header.label[0] if header.flag else header.label
        if not (0 <= value < 2**31 and value == int(value)):
            raise DataError(f"{self.reader.where(key)}: label {value} is not a class id")
        return int(value)
