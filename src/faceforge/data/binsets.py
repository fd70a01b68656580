"""Verification `.bin` sets (LFW, CFP-FP, AgeDB-30, ...): a pickled (images, issame) pair.

Pair i is images 2i and 2i+1. The files were pickled under Python 2, so they load with
encoding='bytes'; a restricted unpickler refuses anything that would import or call code.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from faceforge.errors import DataError
from faceforge.fileio import atomic_write


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """What Python 3 pickles at protocols 0-2 call to rebuild bytes (`_codecs.encode(str, 'latin1')`), and nothing else."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise DataError("pickle calls _codecs.encode with unexpected arguments")
    return text.encode("latin1")


class _PlainUnpickler(pickle.Unpickler):
    """Builds only built-in containers and scalars: no global lookups (bar a checked bytes rebuild), no persistent ids."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("_codecs", "encode"):
            return _latin1_bytes
        raise DataError(f"pickle wants {module}.{name}")

    def persistent_load(self, pid):
        raise DataError("pickle uses persistent ids")


def write_bin(path: str | os.PathLike, images: Sequence[bytes], issame: Sequence[bool]) -> None:
    """Pickle (images, issame) the way InsightFace's .bin files are laid out, via a temp file."""
    if len(images) != 2 * len(issame):
        raise ValueError(f"{len(images)} images for {len(issame)} pairs; need exactly two per pair")
    payload = ([bytes(image) for image in images], [bool(same) for same in issame])
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(pickle.dumps(payload, protocol=4)))


def load_bin(path: str | os.PathLike) -> tuple[list[bytes], np.ndarray]:
    """Encoded images and the boolean issame array of a .bin set; DataError if it is anything else."""
    try:
        with open(path, "rb") as handle:
            loaded = _PlainUnpickler(handle, encoding="bytes").load()
        return _validate(loaded)
    except Exception as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise DataError(f"{path}: not a verification .bin set ({reason})") from None


def _validate(loaded: object) -> tuple[list[bytes], np.ndarray]:
    if not (isinstance(loaded, (tuple, list)) and len(loaded) == 2):
        raise ValueError("expected a pickled (images, issame) pair")
    images, issame = loaded
    if not (isinstance(images, (list, tuple)) and isinstance(issame, (list, tuple))):
        raise ValueError("images and issame must be lists")
    if len(images) != 2 * len(issame):
        raise ValueError(f"{len(images)} images for {len(issame)} pairs")
    # Python-3 pickles of text images decode to str; latin-1 maps them back byte for byte.
    blobs = [image.encode("latin-1") if isinstance(image, str) else image for image in images]
    if not all(isinstance(blob, (bytes, bytearray)) for blob in blobs):
        raise ValueError("every image must be encoded bytes")
    if not all(isinstance(same, int) and same in (0, 1) for same in issame):
        raise ValueError("issame must hold booleans")
    return [bytes(blob) for blob in blobs], np.array(issame, dtype=bool)
