"""Evaluation: 10-fold verification on .bin pair sets, IJB-B/C 1:1 and 1:N protocols, ROC metrics, embedding
folders, reports, and whole-model evaluation (`faceforge eval`). Names are imported on first use."""

from faceforge.exports import lazy_exports

_HOMES = {
    "VerificationSet": "faceforge.eval.verification", "evaluate_pairs": "faceforge.eval.verification",
    "evaluate_bin": "faceforge.eval.verification", "embed_images": "faceforge.eval.verification",
    "cosine_scores": "faceforge.eval.verification",
    "roc": "faceforge.eval.metrics", "tar_at_far": "faceforge.eval.metrics", "threshold_at_far": "faceforge.eval.metrics",
    "identification_metrics": "faceforge.eval.metrics",
    "evaluate_ijb": "faceforge.eval.ijb", "score_ijb": "faceforge.eval.ijb", "IJBResult": "faceforge.eval.ijb",
    "read_ijb": "faceforge.eval.ijb_meta",
    "Embedder": "faceforge.eval.embed", "embed_folder": "faceforge.eval.embed", "verify_pair": "faceforge.eval.embed",
    "evaluate_model": "faceforge.eval.model_eval", "EvalOptions": "faceforge.eval.options",
}
__all__ = sorted(_HOMES)
__getattr__, __dir__ = lazy_exports(__name__, _HOMES)
