"""The checkpoints/ folder: which checkpoints are kept, the checksums of their files, the one to resume from.

`latest.json` lists the kept checkpoints of the run, oldest first, each with the size and SHA-256 of its files as
written; its top-level `step`, `weights` and `state` name the newest (what evaluation and export read). A checkpoint
is recorded there only once its files are written, flushed and renamed into place, and older ones are deleted only
after that record is itself on disk, so a crash or a full disk at any point leaves the previous state usable.
A `latest.json` from before checksums (no `checkpoints` list) stands for its newest checkpoint, loaded unverified.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

from safetensors import SafetensorError

from faceforge.errors import ConfigError, DataError, FaceforgeError
from faceforge.fileio import LATEST, atomic_write

_CHUNK = 1 << 22


class CheckpointNotWritten(FaceforgeError):
    """A checkpoint could not be written (e.g. the disk is full); the message says the previous ones are intact."""


def weights_name(step: int) -> str:
    return f"step_{step:08d}.safetensors"


def state_name(step: int) -> str:
    return f"step_{step:08d}.state.pt"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def read_index(ckpt_dir: Path) -> list[dict]:
    """The kept checkpoints, oldest first: `{"step": N, "files": {name: {"bytes", "sha256"} or None}}`."""
    pointer = ckpt_dir / LATEST
    if not pointer.is_file():
        raise ConfigError(f"no checkpoint in {ckpt_dir.parent} (missing checkpoints/{LATEST})")
    try:
        info = json.loads(pointer.read_text())
        if "checkpoints" in info:
            return list(info["checkpoints"])
        return [{"step": int(info["step"]), "files": {info["weights"]: None, info["state"]: None}}]
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{pointer} is unreadable ({type(exc).__name__}: {exc})") from None


def problem(ckpt_dir: Path, entry: dict) -> str | None:
    """Why a checkpoint cannot be trusted (a file missing, of the wrong size, failing its checksum); None if intact."""
    for name, record in entry["files"].items():
        path = ckpt_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if record is None:  # written before checksums: only its presence can be checked
            continue
        size = path.stat().st_size
        if size != record["bytes"]:
            what = "truncated" if size < record["bytes"] else "too long"
            return f"{name} is {what} ({size} bytes, {record['bytes']} written)"
        if sha256_file(path) != record["sha256"]:
            return f"{name} is corrupt (SHA-256 differs from the one recorded when it was written)"
    return None


def choose(ckpt_dir: Path, step: int | None = None) -> tuple[dict, list[str]]:
    """The checkpoint to resume from, `step`'s or else the newest intact one, and why each newer one was passed over.

    Raises DataError listing every checkpoint tried when none is intact, ConfigError when `step` is not kept.
    """
    entries = read_index(ckpt_dir)
    candidates = [e for e in entries if e["step"] == step] if step is not None else entries[::-1]
    if not candidates:
        kept = ", ".join(str(e["step"]) for e in entries)
        raise ConfigError(f"no checkpoint of step {step} in {ckpt_dir} (kept: steps {kept})")
    tried = []
    for entry in candidates:
        why = problem(ckpt_dir, entry)
        if why is None:
            return entry, tried
        tried.append(f"{why} (step {entry['step']})")
    raise DataError(f"no intact checkpoint in {ckpt_dir}; tried: {'; '.join(tried)}")


def _record(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _index_text(entries: list[dict]) -> str:
    newest = entries[-1]["step"]
    return json.dumps({"step": newest, "weights": weights_name(newest), "state": state_name(newest),
                       "checkpoints": entries}, indent=1)


def _not_written(ckpt_dir: Path, step: int, exc: Exception, previous: list[dict]) -> CheckpointNotWritten:
    """The one-line error of a failed write: the reason (full disk named as such), and what is still there."""
    full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
    reason = "no space left on device" if full else (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    free = shutil.disk_usage(ckpt_dir).free / 1e9
    kept = f"newest: step {previous[-1]['step']}" if previous else "there were none"
    return CheckpointNotWritten(
        f"could not write the checkpoint of step {step} in {ckpt_dir}: {reason} ({free:.1f} GB free); "
        f"the previous checkpoints and {LATEST} are intact ({kept})"
    )


def _delete_unlisted(ckpt_dir: Path, previous: list[dict], kept: list[dict]) -> None:
    in_use = {name for e in kept for name in e["files"]}
    for entry in previous:
        for name in entry["files"]:
            if name not in in_use:
                (ckpt_dir / name).unlink(missing_ok=True)


def write_checkpoint(ckpt_dir: Path, step: int, writers: dict[str, Callable[[str], object]], keep: int) -> None:
    """Write one checkpoint's files (each flushed, then renamed), record them in latest.json, then delete old ones.

    `writers` maps file names to functions writing a temp path. The newest `keep` checkpoints stay (0: all); the one
    latest.json names is the new one, so it is never deleted. On a write error the files written so far are removed
    and CheckpointNotWritten says that the previous checkpoints are intact.
    """
    if keep < 0:
        raise ConfigError(f"train.keep_checkpoints must be >= 0 (0 keeps every checkpoint), got {keep}")
    previous = read_index(ckpt_dir) if (ckpt_dir / LATEST).is_file() else []
    written: dict[str, dict] = {}
    try:
        for name, write in writers.items():
            atomic_write(ckpt_dir / name, write)
            written[name] = _record(ckpt_dir / name)
        entries = [e for e in previous if e["step"] < step] + [{"step": step, "files": written}]
        kept = entries[-keep:] if keep else entries
        atomic_write(ckpt_dir / LATEST, lambda tmp: Path(tmp).write_text(_index_text(kept)))
    except (OSError, RuntimeError, SafetensorError) as exc:  # torch.save and safetensors wrap I/O errors
        for name in written:
            (ckpt_dir / name).unlink(missing_ok=True)
        raise _not_written(ckpt_dir, step, exc, previous) from exc
    _delete_unlisted(ckpt_dir, previous, kept)


def rewind(ckpt_dir: Path, step: int) -> None:
    """Make `step` the newest checkpoint: those after it (passed over as damaged, or abandoned by `--step`) are
    dropped from latest.json and then deleted, so that the resumed run has one line of checkpoints."""
    previous = read_index(ckpt_dir)
    kept = [e for e in previous if e["step"] <= step]
    if len(kept) < len(previous):
        atomic_write(ckpt_dir / LATEST, lambda tmp: Path(tmp).write_text(_index_text(kept)))
        _delete_unlisted(ckpt_dir, previous, kept)
