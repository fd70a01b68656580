"""Training images from an InsightFace-style `train.rec` / `train.idx` folder."""

from __future__ import annotations

import multiprocessing
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image

from faceforge.data.images import decode_image
from faceforge.data.recordio import IRHeader, RecordReader
from faceforge.errors import DataError

SIZE = 112


class RecordDataset:
    """Map-style dataset of (uint8 112×112×3 RGB, class) read from `root/train.rec`.

    With a header record (key 0: label (a, b), empty body) the images are keys 1..a-1; without one
    every indexed key is an image. `on_corrupt="skip"` makes `read` return None for a bad record
    and count it in `skipped` (shared with DataLoader workers).
    """

    def __init__(self, root: str | Path, resize: bool = False, on_corrupt: str = "raise") -> None:
        if on_corrupt not in ("raise", "skip"):
            raise ValueError(f"on_corrupt must be 'raise' or 'skip', got {on_corrupt!r}")
        self.root = Path(root)
        self.resize = resize
        self.on_corrupt = on_corrupt
        self.reader = RecordReader(self.root / "train.rec", self.root / "train.idx")
        self.keys = self._image_keys()
        self._skipped = multiprocessing.Value("q", 0)

    @property
    def skipped(self) -> int:
        """How many corrupt records `read` has skipped, across all worker processes."""
        return self._skipped.value

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int] | None:
        return self.read(index)

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

    def read(self, index: int) -> tuple[np.ndarray, int] | None:
        """The image and class at `index`; None for a corrupt record when skipping."""
        key = self.keys[index]
        try:
            header, body = self.reader.read(key)
            label = self._class_of(header, key)
            image = decode_image(body, self.reader.where(key))
            if image.shape[:2] != (SIZE, SIZE):
                if not self.resize:
                    raise DataError(
                        f"{self.reader.where(key)}: image is {image.shape[1]}x{image.shape[0]}, expected "
                        f"{SIZE}x{SIZE} (resize=True rescales it)"
                    )
                image = np.array(Image.fromarray(image).resize((SIZE, SIZE), Image.Resampling.BILINEAR))
        except DataError:
            if self.on_corrupt == "raise":
                raise
            with self._skipped.get_lock():
                self._skipped.value += 1
            return None
        return image, label

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
