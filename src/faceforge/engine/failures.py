"""What a run under torchrun reports when it fails: a lost peer as such, anything else as itself, with its place.

A collective that fails (a peer died) or outlasts train.dist_timeout_s ends every surviving rank with one line
(`TrainingAborted`); an out-of-memory or a shape bug is not a lost peer and keeps its type and cause.
"""

from __future__ import annotations

import os
import traceback

import torch
import torch.distributed as dist

from faceforge.errors import FaceforgeError


class TrainingAborted(FaceforgeError):
    """Training cannot go on (e.g. the loss stayed non-finite); the message says why and where."""


# How a collective says a peer died or it outlasted its timeout: NCCL raises DistError subclasses; gloo raises a
# RuntimeError that names its transport.
_PEER_SIGNS = ("gloo/transport", "NCCL", "Connection reset by peer", "Connection closed by peer", "Timed out")


def collective_failed(exc: BaseException) -> bool:
    """Whether `exc` came out of a torch.distributed collective (so another rank may be gone), not out of the
    step itself: an out-of-memory or a shape bug is never reported as a lost peer."""
    if isinstance(exc, torch.OutOfMemoryError) or not isinstance(exc, RuntimeError):
        return False
    if isinstance(exc, dist.DistError) or any(sign in str(exc) for sign in _PEER_SIGNS):
        return True
    frames = traceback.extract_tb(exc.__traceback__)
    return any(f"torch{os.sep}distributed{os.sep}" in frame.filename for frame in frames[-3:])


def _with_place(exc: BaseException, where: str) -> BaseException:
    """`exc` again with `where: ` in front of its message and `exc` as its cause, of the same type where that type
    can be rebuilt from a message (else `exc` itself, with the place as a note)."""
    try:
        again = type(exc)(f"{where}: {exc}")
    except Exception:  # a type whose constructor takes more than a message
        exc.add_note(where)
        return exc
    again.__cause__ = exc
    return again


def torchrun_error(exc: Exception, rank: int, world: int, step: int, timeout_s: float) -> BaseException:
    """The exception a rank raises in place of `exc` (already a one-line FaceforgeError: `exc` itself)."""
    if isinstance(exc, FaceforgeError):
        return exc
    if not collective_failed(exc):
        return _with_place(exc, f"rank {rank}/{world}, step {step}")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    aborted = TrainingAborted(
        f"rank {rank}/{world}: lost the other processes at step {step} (a collective failed or waited over "
        f"train.dist_timeout_s={timeout_s:g}s; another rank may have died, see its log): {first}"
    )
    aborted.__cause__ = exc
    return aborted
