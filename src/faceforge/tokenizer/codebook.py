"""The codes file of `faceforge tokenize`: codes [N, l], code vectors [N, D] and how they were made."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from faceforge.errors import ConfigError, DataError
from faceforge.fileio import atomic_write

FORMAT = "faceforge-gif-codes"


def code_keys(codes: torch.Tensor, v: int) -> torch.Tensor:
    """Each code read as a base-v integer (int64 [N]): equal codes get equal keys, prefixes are key ranges."""
    length = codes.shape[1]
    if v**length >= 2**62:
        raise ConfigError(f"codes of {length} tokens over v={v} do not fit a 64-bit key")
    keys = torch.zeros(len(codes), dtype=torch.long, device=codes.device)
    for j in range(length):
        keys = keys * v + codes[:, j].long()
    return keys


def check_codes(codes: torch.Tensor, v: int, where: str) -> None:
    """Raise DataError naming `where` unless codes are [N, l] integers in [0, v) and no two rows are equal."""
    if codes.ndim != 2 or codes.is_floating_point() or codes.is_complex():
        raise DataError(f"{where}: codes must be an integer [N, l] matrix, got {codes.dtype} {list(codes.shape)}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= v):
        raise DataError(f"{where}: tokens must lie in [0, {v}), found {int(codes.min())}..{int(codes.max())}")
    unique = len(torch.unique(code_keys(codes, v)))
    if unique != len(codes):
        raise DataError(f"{where}: {len(codes) - unique} of {len(codes)} identities share a code with another")


@dataclass
class Codebook:
    """What a codes file holds; `meta` keeps the string metadata (v, l, t, epochs, seed, source, ...)."""

    codes: torch.Tensor
    code_vectors: torch.Tensor
    v: int
    meta: dict[str, str] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return self.codes.shape[1]

    @property
    def seed(self) -> int:
        return int(self.meta.get("seed", 0))


def save_codes(path: str | Path, book: Codebook) -> None:
    """Write codes (int64), code vectors (float32) and metadata to a .safetensors file, atomically."""
    meta = {**{k: str(val) for k, val in book.meta.items()}, "format": FORMAT, "v": str(book.v),
            "l": str(book.length), "identities": str(len(book.codes)), "dim": str(book.code_vectors.shape[1])}
    tensors = {"codes": book.codes.long().cpu().contiguous(), "code_vectors": book.code_vectors.float().cpu().contiguous()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def _codes_file(path: str | Path) -> Path:
    """`path` as a Path, or ConfigError when there is no such file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"codes file {p} not found (make one with `faceforge tokenize`)")
    return p


def codes_identities(path: str | Path) -> int:
    """How many identities a codes file covers, read from its header alone: sizes a GIF head (e.g. for a
    benchmark) without reading millions of code vectors an extra time."""
    p = _codes_file(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            return int(f.get_slice("codes").get_shape()[0])
    except (SafetensorError, OSError) as exc:
        raise DataError(f"cannot read codes file {p}: {exc}") from None


def load_codes(path: str | Path) -> Codebook:
    """Read and check a codes file: ConfigError when it is missing, DataError when it is malformed."""
    p = _codes_file(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = dict(f.metadata() or {})
            names = set(f.keys())
            if meta.get("format") != FORMAT or not {"codes", "code_vectors"} <= names:
                raise DataError(f"{p}: not a faceforge codes file (needs tensors codes, code_vectors)")
            codes, vectors = f.get_tensor("codes"), f.get_tensor("code_vectors")
    except (SafetensorError, OSError) as exc:
        raise DataError(f"cannot read codes file {p}: {exc}") from None
    try:
        v = int(meta["v"])
    except (KeyError, ValueError):
        raise DataError(f"{p}: metadata 'v' is missing or not an integer") from None
    check_codes(codes, v, str(p))
    if vectors.ndim != 2 or len(vectors) != len(codes):
        raise DataError(f"{p}: code_vectors {list(vectors.shape)} do not match codes {list(codes.shape)}")
    return Codebook(codes.long(), vectors.float(), v, meta)
