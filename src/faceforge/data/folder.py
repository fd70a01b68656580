"""Training images from a folder tree: one sub-folder per identity, like torchvision's ImageFolder."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from faceforge.data.images import decode_image
from faceforge.data.record_dataset import FaceImages
from faceforge.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def list_images(root: str | Path) -> tuple[list[str], list[Path], np.ndarray]:
    """(class names, image paths, int64 labels) of a folder tree, in sorted order so labels are reproducible.

    Classes are the non-hidden sub-folders of `root` (sorted names → 0..C-1); images are the files directly
    inside each one whose suffix is in IMAGE_SUFFIXES (any case), sorted by name. Files in `root` are ignored.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: no identity sub-folders (expected one folder of images per identity)")
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        images = sorted(
            p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        )
        if not images:
            raise DataError(f"{root / name}: identity folder holds no {'/'.join(IMAGE_SUFFIXES)} images")
        files += images
        labels += [label] * len(images)
    return classes, files, np.array(labels, dtype=np.int64)


class ImageFolderDataset(FaceImages):
    """Map-style dataset of (uint8 112×112×3 RGB, class) from `root/<identity>/<image>`; same API as RecordDataset."""

    def __init__(self, root: str | Path, resize: bool = False, on_corrupt: str = "raise") -> None:
        super().__init__(resize, on_corrupt)
        self.root = Path(root)
        self.class_names, self.files, self._labels = list_images(self.root)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def labels(self) -> np.ndarray:
        """Class of every image (int64), from the folder names alone."""
        return self._labels

    @property
    def num_classes(self) -> int:
        """One class per identity sub-folder."""
        return len(self.class_names)

    def _load(self, index: int) -> tuple[np.ndarray, int]:
        path = self.files[index]
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise DataError(f"{path}: cannot read image ({exc.strerror or exc})") from None
        return self._fit(decode_image(data, str(path)), str(path)), int(self._labels[index])
