"""File plumbing shared by training, evaluation and export: atomic writes and safetensors weights."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from faceforge.errors import ConfigError, DataError

LATEST = "latest.json"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename is durable only once its folder is), where the filesystem allows it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems (network, FUSE) cannot fsync a folder; the rename still happened
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[str], object]) -> None:
    """Call write(tmp_path) on a temp file beside `path`, flush it to disk, rename it over `path`, flush the folder.

    Readers never see half a file, and after a crash or power loss `path` holds the old or the new file whole.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the result gets a normal file's permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def latest_checkpoint(run_dir: str | Path) -> tuple[Path, Path]:
    """(weights, trainer state) paths of the checkpoint a run folder's checkpoints/latest.json names (its newest)."""
    pointer = Path(run_dir) / "checkpoints" / LATEST
    if not pointer.is_file():
        raise ConfigError(f"no checkpoint in {run_dir} (missing checkpoints/{LATEST})")
    try:
        info = json.loads(pointer.read_text())
        return pointer.parent / info["weights"], pointer.parent / info["state"]
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{pointer} is unreadable ({type(exc).__name__}: {exc})") from None


def resolve_weights(path: str | Path) -> Path:
    """A .safetensors file as given, or the newest checkpoint's weights of a run folder."""
    p = Path(path)
    if p.is_dir():
        return latest_checkpoint(p)[0]
    if not p.is_file():
        raise ConfigError(f"weights not found: {p}")
    return p


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors file (or of a run folder's newest checkpoint)."""
    p = resolve_weights(path)
    try:
        return load_file(str(p))
    except (SafetensorError, OSError) as exc:
        raise DataError(f"cannot read weights {p}: {exc}") from None


def split_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under `prefix.` with the prefix removed."""
    n = len(prefix) + 1
    return {k[n:]: v for k, v in state.items() if k.startswith(prefix + ".")}


def load_into(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load a state dict strictly, turning shape or key mismatches into one-line ConfigErrors naming `what`."""
    own = module.state_dict()
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise ConfigError(f"{what}: {key} has shape {list(value.shape)}, model expects {list(own[key].shape)}")
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"{what}: missing keys {missing[:3]}, unexpected keys {unexpected[:3]}")
