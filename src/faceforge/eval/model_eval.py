"""`faceforge eval`: load a model (run folder, checkpoint, state dict, ONNX), score it on verification .bin sets and
IJB folders, and write one report for all of them (report.md, results.json, ROC and DET plots, operating
threshold). TAR@FAR readings that too few impostor pairs back are left out as not measurable."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from faceforge.errors import ConfigError
from faceforge.eval.bootstrap import percentile_interval
from faceforge.eval.ijb import IJBResult, bootstrap_ijb, evaluate_ijb
from faceforge.eval.metrics import MIN_FALSE_ACCEPTS, threshold_at_far, unmeasurable_fars
from faceforge.eval.options import THRESHOLD_FAR, EvalOptions
from faceforge.eval.report import NOT_MEASURABLE, eval_sections, image_link, plot_det, plot_roc, write_report
from faceforge.eval.verification import VerificationSet, embed_views
from faceforge.fileio import atomic_write, resolve_weights
from faceforge.models import load_model, run_config, threshold_path
from faceforge.runtime import pick_device

def default_out_dir(weights: str | Path) -> Path:
    """`<run folder>/eval` for weights of a run, else an `eval` folder beside the weights file."""
    path = resolve_weights(weights)
    config = run_config(path)
    return (config.parent if config else path.parent) / "eval"


@dataclass
class Evaluation:
    """Every protocol's report row and ROC, and the operating threshold chosen on one of them."""

    weights: Path
    model: dict  # faceforge.models.LoadedModel.info(): architecture, input, where it came from
    rows: list[dict] = field(default_factory=list)
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    threshold: dict | None = None
    replicates: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # per set: bootstrap replicates


def evaluate_model(
    weights: str | Path,
    bins: Sequence[str] = (),
    ijb_roots: Sequence[str] = (),
    backbone: str | None = None,
    options: EvalOptions = EvalOptions(),
    threshold_far: float = THRESHOLD_FAR,
    pixel_mean: Sequence[float] | None = None,
    pixel_std: Sequence[float] | None = None,
) -> Evaluation:
    """One row per .bin set (InsightFace 10-fold) and per IJB folder (1:1 TAR@FAR, 1:N when listed).

    The operating threshold is chosen at `threshold_far` on the first IJB set's pairs, else on the first .bin
    set's pairs (cosine of flip-fused embeddings, accept when above). `weights` is anything
    faceforge.models.load_model takes; `pixel_mean` / `pixel_std` set an ONNX model's input scaling.
    """
    if not bins and not ijb_roots:
        raise ConfigError("nothing to evaluate: give --bin and/or --ijb")
    if options.bootstrap < 0:
        raise ConfigError(f"--bootstrap takes a number of resamples >= 0, got {options.bootstrap}")
    dev, flip = pick_device(options.device), options.flip
    loaded = load_model(weights, backbone, pixel_mean, pixel_std)
    model = loaded.module.to(dev)
    result = Evaluation(loaded.file, loaded.info())
    sets = [("bin", p) for p in bins] + [("ijb", p) for p in ijb_roots]
    threshold_set = ("ijb", ijb_roots[0]) if ijb_roots else ("bin", bins[0])
    for kind, path in tqdm(sets, desc="eval sets", unit="set", disable=not options.progress or len(sets) < 2):
        if kind == "ijb":
            ijb = evaluate_ijb(model, path, options)
            row, curve, scores, labels = ijb.row, ijb.curve, ijb.scores, ijb.labels
            if options.bootstrap:
                result.replicates[row["set"]] = add_intervals(row, ijb, options)
        else:
            vs = VerificationSet.load(path)
            views = embed_views(model, vs.images, options.batch_size, dev, flip, "auto")
            metrics, curve, scores = vs.score_views(*views)
            row, labels = {"set": vs.name, "pairs": vs.num_pairs, **metrics}, vs.issame
        result.rows.append(mark_unmeasurable(row, labels))
        result.curves[row["set"]] = curve
        if (kind, path) == threshold_set:
            result.threshold = {"set": row["set"], "pairs": int(len(labels)), "target_far": threshold_far,
                                **threshold_at_far(scores, labels, threshold_far),
                                "measurable": not unmeasurable_fars([threshold_far], row["impostor_pairs"]),
                                "score": "cosine of flip-fused embeddings" if flip else "cosine of embeddings",
                                "decision": "same identity when score > threshold",
                                "weights": result.weights.name}
    return result


def add_intervals(row: dict, ijb: IJBResult, options: EvalOptions) -> dict[str, np.ndarray]:
    """Put the subject-level bootstrap's 95% intervals into `row["ci95"]` (None: not measurable) and return
    the replicates that have them, for write_evaluation to keep (compare.py pairs two models' replicates)."""
    replicates = bootstrap_ijb(ijb, options.bootstrap, options.bootstrap_seed)
    row["ci95"] = {key: None if v is None else percentile_interval(v) for key, v in replicates.items()}
    row["bootstrap"] = {"resamples": options.bootstrap, "seed": options.bootstrap_seed, "unit": "subject"}
    return {key: v for key, v in replicates.items() if v is not None}


def mark_unmeasurable(row: dict, labels: np.ndarray) -> dict:
    """The row with its impostor count, and TAR@FAR readings set to None (not measurable) where fewer than
    MIN_FALSE_ACCEPTS impostor pairs would be accepted at that FAR."""
    impostors = int(np.size(labels) - np.count_nonzero(labels))
    gone = unmeasurable_fars(row["tar_at_far"], impostors)
    row["impostor_pairs"] = impostors
    row["not_measurable_fars"] = gone
    for key in ("tar_at_far", "tar_at_far_nearest"):
        if key in row:
            row[key] = {far: None if far in gone else tar for far, tar in row[key].items()}
    return row


def write_evaluation(evaluation: Evaluation, out_dir: str | Path) -> Path:
    """Write report.md, results.json, roc.png and det.png to `out_dir`, and the threshold beside the weights."""
    out = Path(out_dir)
    plot_roc(evaluation.curves, out / "roc.png", "verification ROC (1:1)")
    plot_det(evaluation.curves, out / "det.png", "verification DET (1:1)")
    config = run_config(evaluation.weights)
    model = f"{config.parent.name}/{evaluation.weights.stem}" if config else evaluation.weights.stem
    sections = eval_sections(evaluation.rows, evaluation.threshold, model)
    sections["Plots"] = "\n\n".join([image_link(out, out / "roc.png", "ROC"), image_link(out, out / "det.png", "DET")])
    write_report(out, sections, title=f"Evaluation: {evaluation.weights}")
    results = {"weights": str(evaluation.weights), "model": evaluation.model, "rows": evaluation.rows,
               "threshold": evaluation.threshold}
    text = json.dumps(results, indent=2, default=float) + "\n"
    atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    for name, replicates in evaluation.replicates.items():
        atomic_write(out / f"bootstrap_{name}.npz", lambda tmp, r=replicates: _save_npz(tmp, r))
    if evaluation.threshold is not None:
        text = json.dumps(evaluation.threshold, indent=2) + "\n"
        atomic_write(threshold_path(evaluation.weights), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return out / "report.md"


def _save_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as f:  # a file object: np.savez would add ".npz" to a path
        np.savez(f, **arrays)


def _tar(value: float | None, width: int = 0) -> str:
    return f"{NOT_MEASURABLE if value is None else format(value, '.4f'):>{width}}"


def format_table(rows: list[dict]) -> str:
    """Fixed-width tables for the terminal: .bin sets (accuracy, TAR@FAR, AUC, XNorm), then IJB sets; a legend
    when a TAR@FAR cell is not measurable."""
    lines = []
    bins = [r for r in rows if "accuracy" in r]
    if bins:
        lines.append(f"{'set':<16}{'pairs':>7}{'accuracy':>18}{'TAR@1e-3':>10}{'TAR@1e-2':>10}{'AUC':>8}{'XNorm':>8}")
        for r in bins:
            acc = f"{r['accuracy']:.4f} ± {r['accuracy_std']:.4f}"
            lines.append(
                f"{r['set']:<16}{r['pairs']:>7}{acc:>18}{_tar(r['tar_at_far'][1e-3], 10)}"
                f"{_tar(r['tar_at_far'][1e-2], 10)}{r['auc']:>8.4f} {r['xnorm']:>7.2f}"
            )
    for r in (r for r in rows if "tar_at_far_nearest" in r):
        fars = list(r["tar_at_far"])
        head = f"{r['set']} 1:1 ({r['pairs']} pairs, {r['mode']}), TAR at FAR "
        lines.append(head + " ".join(f"{f:.0e}" for f in fars))
        lines.append(f"  {'interpolated':<14}" + " ".join(_tar(r["tar_at_far"][f], 6) for f in fars))
        lines.append(f"  {'nearest (IF)':<14}" + " ".join(_tar(r["tar_at_far_nearest"][f], 6) for f in fars))
        for gallery, rates in r.get("identification", {}).items():
            tpir = " ".join(f"TPIR@FPIR={f:.0e} {v:.4f}" for f, v in rates.get("tpir_at_fpir", {}).items())
            lines.append(f"  1:N {gallery:<5} rank-1 {rates['rank_1']:.4f} rank-5 {rates['rank_5']:.4f} {tpir}")
    if any(r.get("not_measurable_fars") for r in rows):
        lines.append(f"{NOT_MEASURABLE}: not measurable, fewer than {MIN_FALSE_ACCEPTS}/FAR impostor pairs")
    return "\n".join(lines)
