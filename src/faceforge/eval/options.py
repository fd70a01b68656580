"""How evaluation runs a model, as one object every protocol takes (`faceforge eval`'s flags and their defaults).

No torch here: the CLI reads these defaults when it builds its parser.
"""

from __future__ import annotations

from dataclasses import dataclass

THRESHOLD_FAR = 1e-4  # FAR at which `faceforge eval` picks the verify threshold it stores beside the weights


@dataclass(frozen=True)
class EvalOptions:
    """Batch size, device ('auto': the GPU when there is one), flip-test fusion, image-decoding workers (IJB),
    progress bars, and the subject-level bootstrap of IJB metrics (resamples, 0 = off; seed: the same seed gives
    two models the same resamples, so their difference is paired)."""

    batch_size: int = 256
    device: str = "auto"
    flip: bool = True
    workers: int = 0
    progress: bool = True
    bootstrap: int = 0
    bootstrap_seed: int = 0
