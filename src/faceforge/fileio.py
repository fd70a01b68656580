"""File plumbing shared by training, evaluation and export: atomic writes, and model weights (safetensors or
torch.save files) found and read without running code."""

from __future__ import annotations

import errno
import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
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


WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")  # torch weights; .bin only when it holds a torch file
MODEL_SUFFIXES = (*WEIGHT_SUFFIXES, ".onnx")
NESTING_KEYS = ("state_dict", "model", "backbone")  # where training scripts put the weights inside a saved dict
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # added by DistributedDataParallel / DataParallel and torch.compile
_LEGACY_TORCH = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"  # torch.save's old format opens with this pickled number


def file_format(path: Path) -> str | None:
    """'safetensors', 'torch' (zip or legacy torch.save), 'onnx' (by suffix) or None, read from the first bytes."""
    if path.suffix == ".onnx":
        return "onnx"
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_TORCH))
    if head.startswith(b"PK\x03\x04") or head == _LEGACY_TORCH:
        return "torch"
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= path.stat().st_size:
        return "safetensors"
    return None


def _model_files(folder: Path) -> list[Path]:
    """The model files directly in `folder`: .safetensors, .pt, .pth, .onnx, and .bin holding torch weights
    (not verification sets)."""
    found = []
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix in MODEL_SUFFIXES and (p.suffix != ".bin" or file_format(p) == "torch"):
            found.append(p)
    return found


def resolve_weights(path: str | Path) -> Path:
    """The model file a user names: a file as given; in a run folder, its newest checkpoint's weights; in any
    other folder, the one model file it holds (ConfigError when it holds none or several)."""
    p = Path(path)
    if p.is_dir():
        if (p / "checkpoints" / LATEST).is_file():
            return latest_checkpoint(p)[0]
        found = _model_files(p)
        if len(found) != 1:
            names = ", ".join(f.name for f in found[:4]) + (", ..." if len(found) > 4 else "")
            held = f"{len(found)} model files ({names})" if found else "no model file (checkpoints/latest.json, " \
                   f"{', '.join(MODEL_SUFFIXES)})"
            raise ConfigError(f"{p} holds {held}: name the file")
        return found[0]
    if not p.is_file():
        raise ConfigError(f"model not found: {p}")
    return p


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """The tensor dict inside what torch.load returned: the dict itself, or one nested under NESTING_KEYS."""
    while isinstance(obj, dict):
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
        inner = next((obj[k] for k in NESTING_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    keys = ", ".join(map(str, list(obj)[:5])) if isinstance(obj, dict) else type(obj).__name__
    raise DataError(f"{path}: no state dict inside (found {keys}; expected tensors, or a dict under "
                    f"{' / '.join(NESTING_KEYS)})")


def _strip_wrappers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys without the `module.` / `_orig_mod.` prefixes DDP and torch.compile put in front of every name."""
    out = {}
    for key, value in state.items():
        while key.startswith(WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def _read_torch(path: Path) -> object:
    """torch.load with weights_only=True: tensors and plain containers only, a pickle that needs code is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise DataError(f"refused {path}: its pickle needs code to load (only tensors and plain containers are "
                        "read, nothing in it was run)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise DataError(f"cannot read weights {path}: {str(exc).splitlines()[0]}") from None


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a model's weights (see resolve_weights): a .safetensors file, or a torch.save'd .pt / .pth /
    .bin state dict, plain or nested under NESTING_KEYS, with DDP / torch.compile key prefixes removed."""
    p = resolve_weights(path)
    kind = file_format(p)
    if kind == "safetensors":
        try:
            state = load_file(str(p))
        except (SafetensorError, OSError) as exc:
            raise DataError(f"cannot read weights {p}: {exc}") from None
    elif kind == "torch":
        state = _unwrap(_read_torch(p), p)
    elif kind == "onnx":
        raise ConfigError(f"{p} is an ONNX model; this needs torch weights (.safetensors, .pt, .pth, .bin)")
    elif p.suffix == ".bin":
        raise DataError(f"{p} is not a torch weights file (a verification set? give those with --bin)")
    else:
        raise DataError(f"cannot read weights {p}: neither safetensors nor a torch.save file")
    return _strip_wrappers(state)


def load_weight_rows(path: Path, rows: Callable[[str, list[int]], slice | None]) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file, each cut as read to the rows `rows(name, shape)` gives (None: all).

    A process loads its class shard of a checkpoint this way: the tensors are views of a memory map of the file,
    so only the rows it copies out are ever read, never the whole [N, D] matrix (the file must stay as it is while
    they are alive).
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            state = {}
            for name in f.keys():
                part = f.get_slice(name)
                cut = rows(name, part.get_shape())
                state[name] = f.get_tensor(name) if cut is None else part[cut]
            return state
    except (SafetensorError, OSError) as exc:
        raise DataError(f"cannot read weights {path}: {exc}") from None


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
