"""Training: the Trainer (run folder, loop, checkpoints, evaluation), the optimisation step shared with the
benchmark, dataset opening, and `faceforge tokenize`. Names are imported on first use."""

from faceforge.exports import lazy_exports

_HOMES = {
    "Trainer": "faceforge.engine.trainer",
    "build_parts": "faceforge.engine.step", "optimisation_step": "faceforge.engine.step",
    "open_training_set": "faceforge.engine.datasets", "ensure_synthface": "faceforge.engine.datasets",
    "bench_train": "faceforge.engine.bench", "tokenize_dataset": "faceforge.engine.tokenize",
}
__all__ = sorted(_HOMES)
__getattr__, __dir__ = lazy_exports(__name__, _HOMES)
