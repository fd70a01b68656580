"""`faceforge embed` and `faceforge verify`: flip-fused embeddings of face images from any model faceforge loads
(weights, checkpoints, ONNX), and a same / different decision at the threshold stored beside it by `faceforge eval`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import numpy as np
from tqdm import tqdm

from faceforge.data.align import align_face
from faceforge.data.folder import IMAGE_SUFFIXES
from faceforge.data.images import FACE_SIZE, decode_image, resize_face
from faceforge.data.pack import read_landmarks
from faceforge.errors import ConfigError, DataError
from faceforge.eval.verification import embed_images
from faceforge.fileio import atomic_write
from faceforge.models import load_model, threshold_path
from faceforge.runtime import pick_device

_CHUNK = 512  # images decoded and embedded at a time


class Embedder:
    """Images (uint8 [N, 112, 112, 3] RGB) -> float32 [N, D] embeddings, image and mirror summed (flip fusion).

    `model` is anything `faceforge.models.load_model` takes; `pixel_mean` / `pixel_std` set an ONNX model's input.
    """

    def __init__(
        self, model: str | Path, backbone: str | None = None, device: str = "auto", batch_size: int = 64,
        pixel_mean: Sequence[float] | None = None, pixel_std: Sequence[float] | None = None,
    ) -> None:
        loaded = load_model(model, backbone, pixel_mean, pixel_std)
        self.file, self.batch_size = loaded.file, batch_size
        self.device = pick_device(device)
        self.model = loaded.module.to(self.device)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return embed_images(self.model, images, self.batch_size, self.device, flip=True)

    def threshold(self) -> dict:
        """The operating point stored beside the model (see `faceforge eval`); ConfigError when there is none."""
        path = threshold_path(self.file)
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"no threshold stored for {self.file} (expected {path}: run `faceforge eval` on it, "
                              "or pass --threshold)") from None
        except ValueError as exc:
            raise DataError(f"{path}: not a threshold JSON ({exc})") from None


def load_face(path: Path, landmarks: np.ndarray | None) -> np.ndarray:
    """A 112x112 uint8 face: aligned with its 5 landmarks when given, else taken as an aligned crop (resized)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read image ({exc.strerror or exc})") from None
    image = decode_image(data, str(path))
    if landmarks is None:
        return resize_face(image)
    try:
        return align_face(image, landmarks, FACE_SIZE)
    except ValueError as exc:
        raise DataError(f"{path}: cannot align with its landmarks ({exc})") from None


def _landmarks_for(keys: Sequence[str], landmarks_file: str | Path | None) -> list:
    """The 5 landmarks of each image key from the file, or None for every image without a file."""
    if landmarks_file is None:
        return [None] * len(keys)
    table = read_landmarks(landmarks_file)
    missing = [key for key in keys if key not in table]
    if missing:
        raise DataError(f"{landmarks_file}: no landmarks for {missing[0]} ({len(missing)} images lack them)")
    return [table[key] for key in keys]


def embed_folder(
    embedder: Embedder,
    folder: str | Path,
    out: str | Path,
    landmarks_file: str | Path | None = None,
    normalize: bool = True,
    progress: bool = True,
) -> dict:
    """Embed every image under `folder` (sorted, recursive) into `out` (.npy, [N, D] float32, L2-normalised unless
    `normalize` is False) and list their paths, relative to `folder`, row by row in `out` with suffix .txt."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"{root}: no {'/'.join(IMAGE_SUFFIXES)} images")
    keys = [str(PurePosixPath(p.relative_to(root).as_posix())) for p in files]
    points = _landmarks_for(keys, landmarks_file)
    parts = []
    for start in tqdm(range(0, len(files), _CHUNK), desc="embed", unit="chunk", disable=not progress):
        chunk = range(start, min(start + _CHUNK, len(files)))
        parts.append(embedder(np.stack([load_face(files[i], points[i]) for i in chunk])))
    feats = np.concatenate(parts)
    if normalize:
        feats /= np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    out = Path(out)

    def save(tmp: str) -> None:
        with open(tmp, "wb") as f:  # np.save would add .npy to the temporary name
            np.save(f, feats)

    atomic_write(out, save)
    names = out.with_suffix(".txt")
    atomic_write(names, lambda tmp: Path(tmp).write_text("\n".join(keys) + "\n", encoding="utf-8"))
    return {"images": len(files), "dim": int(feats.shape[1]), "out": str(out), "names": str(names),
            "normalized": normalize}


def verify_pair(
    embedder: Embedder, first: str | Path, second: str | Path, landmarks_file: str | Path | None = None,
    threshold: float | None = None,
) -> dict:
    """Cosine of two face images and the decision at `threshold`, or at the threshold stored with the model.

    With a landmarks file, each image is looked up by the path as given, then by its file name.
    """
    paths = [Path(first), Path(second)]
    table = read_landmarks(landmarks_file) if landmarks_file else None
    points = []
    for p in paths:
        if table is None:
            points.append(None)
            continue
        key = next((k for k in (str(PurePosixPath(p.as_posix())), p.name) if k in table), None)
        if key is None:
            raise DataError(f"{landmarks_file}: no landmarks for {p}")
        points.append(table[key])
    feats = embedder(np.stack([load_face(p, pts) for p, pts in zip(paths, points)])).astype(np.float64)
    cosine = float(feats[0] @ feats[1] / max(np.linalg.norm(feats[0]) * np.linalg.norm(feats[1]), 1e-12))
    stored = {"threshold": threshold, "source": "--threshold"} if threshold is not None else embedder.threshold()
    return {"cosine": cosine, "same": cosine > stored["threshold"], "threshold": stored["threshold"],
            "threshold_from": {k: stored[k] for k in ("set", "target_far", "far", "tar", "source") if k in stored}}
