"""Run reports: training-curve and ROC plots (matplotlib Agg, no pyplot state) and a markdown report.md."""

import json
import os
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from faceforge.eval.metrics import MIN_FALSE_ACCEPTS
from faceforge.fileio import atomic_write


def _save(fig: Figure, out_png: str | Path) -> None:
    FigureCanvasAgg(fig)
    atomic_write(out_png, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))


def plot_training_curves(metrics_jsonl_path: str | Path, out_png: str | Path) -> None:
    """Plot loss and learning rate against step from a metrics.jsonl.

    Lines with an `event` key, and lines lacking any of step / loss / lr, are skipped.
    """
    steps, losses, lrs = [], [], []
    with open(metrics_jsonl_path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            record = json.loads(line)
            if "event" in record or not {"step", "loss", "lr"} <= record.keys():
                continue
            steps.append(record["step"])
            losses.append(record["loss"])
            lrs.append(record["lr"])
    if not steps:
        raise ValueError(f"{metrics_jsonl_path}: no lines with step, loss and lr")
    fig = Figure(figsize=(7, 6))
    loss_ax, lr_ax = fig.subplots(2, 1, sharex=True)
    loss_ax.plot(steps, losses, lw=1)
    loss_ax.set_ylabel("loss")
    loss_ax.grid(alpha=0.3)
    lr_ax.plot(steps, lrs, lw=1, color="tab:orange")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("step")
    lr_ax.grid(alpha=0.3)
    _save(fig, out_png)


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], out_png: str | Path, title: str) -> None:
    """Plot one ROC per named model or baseline, TAR against FAR on a log axis (FAR = 0 points cannot be shown)."""
    fig = Figure(figsize=(6, 5))
    ax = fig.subplots()
    smallest = 1.0
    for name, (fpr, tpr) in curves.items():
        fpr, tpr = np.asarray(fpr), np.asarray(tpr)
        shown = fpr > 0
        ax.plot(fpr[shown], tpr[shown], lw=1.2, label=name)
        if shown.any():
            smallest = min(smallest, float(fpr[shown].min()))
    ax.set_xscale("log")
    ax.set_xlim(min(smallest, 1e-2), 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("FAR (false accept rate)")
    ax.set_ylabel("TAR (true accept rate)")
    ax.set_title(title)
    ax.grid(which="both", alpha=0.3)
    ax.legend(loc="lower right")
    _save(fig, out_png)


def plot_det(curves: dict[str, tuple[np.ndarray, np.ndarray]], out_png: str | Path, title: str) -> None:
    """Plot one DET curve per name: false non-match rate (1 - TAR) against FAR, both on log axes."""
    fig = Figure(figsize=(6, 5))
    ax = fig.subplots()
    low_far, low_frr = 1e-2, 1e-2
    for name, (fpr, tpr) in curves.items():
        fpr, fnr = np.asarray(fpr), 1.0 - np.asarray(tpr)
        shown = (fpr > 0) & (fnr > 0)  # a perfect curve has no point to show on log axes
        ax.plot(fpr[shown], fnr[shown], lw=1.2, label=name)
        if shown.any():
            low_far, low_frr = min(low_far, float(fpr[shown].min())), min(low_frr, float(fnr[shown].min()))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(low_far, 1.0)
    ax.set_ylim(low_frr, 1.0)
    ax.set_xlabel("FAR (false accept rate)")
    ax.set_ylabel("FRR (false reject rate = 1 - TAR)")
    ax.set_title(title)
    ax.grid(which="both", alpha=0.3)
    if curves:
        ax.legend(loc="upper right")
    _save(fig, out_png)


def image_link(run_dir: str | Path, image_path: str | Path, alt: str) -> str:
    """Markdown image tag for `image_path`, linked relative to `run_dir` so the report folder can move."""
    relative = os.path.relpath(Path(image_path).resolve(), Path(run_dir).resolve())
    return f"![{alt}]({Path(relative).as_posix()})"


def _cell(value: object) -> str:
    text = format(value, ".6g") if isinstance(value, float) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(rows: list[dict]) -> str:
    if not rows:
        return "_(no rows)_"
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(_cell(c) for c in columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_report(run_dir: str | Path, sections: dict[str, str | list[dict]], title: str | None = None) -> Path:
    """Write `run_dir/report.md`: one `##` section per entry, a table for a list of dicts, a string verbatim.

    Images belong in strings as relative links (see `image_link`). The file is replaced atomically.
    """
    run_dir = Path(run_dir)
    parts = [f"# {title or 'Report: ' + run_dir.resolve().name}"]
    for title, body in sections.items():
        parts.append(f"## {title}\n\n{body if isinstance(body, str) else _table(body)}")
    text = "\n\n".join(parts) + "\n"
    out = run_dir / "report.md"
    atomic_write(out, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return out


# Verification sets in the order and spelling of the papers' tables.
BIN_NAMES = {"lfw": "LFW", "cfp_fp": "CFP-FP", "agedb_30": "AgeDB-30", "calfw": "CALFW", "cplfw": "CPLFW",
             "cfp_ff": "CFP-FF", "vgg2_fp": "VGG2-FP"}
PAPER_FARS = (1e-5, 1e-4)
NOT_MEASURABLE = "n/m"  # a TAR@FAR cell with too few impostor pairs behind it (see eval.metrics.unmeasurable_fars)


def _pct(value: float | None) -> str:
    return NOT_MEASURABLE if value is None else f"{100 * value:.2f}"


def _rate(value: float | None, ci95: list[float] | None = None) -> str:
    """A rate to 4 places, followed by its bootstrap interval as `[lo, hi]` when there is one."""
    if value is None:
        return NOT_MEASURABLE
    return f"{value:.4f}" + ("" if ci95 is None else f" [{ci95[0]:.4f}, {ci95[1]:.4f}]")


def paper_row(rows: list[dict], model: str) -> dict:
    """One row laid out like the papers' tables (percentages): .bin accuracies, then per IJB set TAR at 1e-5
    and 1e-4 (interpolated) and, when run, 1:N rank-1 and TPIR at FPIR 1e-2 averaged over the galleries."""
    order = list(BIN_NAMES)
    bins = sorted((r for r in rows if "accuracy" in r),
                  key=lambda r: (order.index(r["set"]) if r["set"] in order else len(order), r["set"]))
    table = {"model": model, **{BIN_NAMES.get(r["set"], r["set"]): _pct(r["accuracy"]) for r in bins}}
    for r in (r for r in rows if "tar_at_far_nearest" in r):
        table.update({f"{r['set']} TAR@{far:.0e}": _pct(r["tar_at_far"][far]) for far in PAPER_FARS})
        mean = r.get("identification", {}).get("mean")
        if mean:
            table[f"{r['set']} rank-1"] = _pct(mean["rank_1"])
            if 1e-2 in mean.get("tpir_at_fpir", {}):
                table[f"{r['set']} TPIR@1e-2"] = _pct(mean["tpir_at_fpir"][1e-2])
    return table


def _ijb_sections(r: dict) -> dict[str, list[dict]]:
    """An IJB row's 1:1 and 1:N tables; each cell with its 95% bootstrap interval when `--bootstrap` ran."""
    ci = r.get("ci95", {})
    title = f"{r['set']} 1:1 ({r['mode']}; {r['images']} images, {r['templates']} templates, {r['pairs']} pairs)"
    if "bootstrap" in r:
        title += f", 95% subject-bootstrap intervals ({r['bootstrap']['resamples']} resamples)"
    sections = {title: [{"FAR": f"{far:.0e}", "TAR (interpolated)": _rate(v, ci.get(f"tar@{far:g}")),
                         "TAR (nearest ROC point, InsightFace)": _rate(r["tar_at_far_nearest"][far])}
                        for far, v in r["tar_at_far"].items()]}
    if "identification" in r:
        title = f"{r['set']} 1:N (open set; a non-mated probe's false alarm is its top score over the threshold)"
        sections[title] = [
            {"gallery": name, "templates": g.get("gallery_templates", ""),
             "mated probes": g.get("mated_probes", ""), "non-mated probes": g.get("nonmated_probes", ""),
             **{f"rank-{k.split('_')[1]}": _rate(v, ci.get(f"{name}/{k}")) for k, v in g.items()
                if k.startswith("rank_")},
             **{f"TPIR@FPIR={f:.0e}": _rate(v, ci.get(f"{name}/tpir@{f:g}"))
                for f, v in g.get("tpir_at_fpir", {}).items()}}
            for name, g in r["identification"].items()]
    return sections


def eval_sections(rows: list[dict], threshold: dict | None, model: str) -> dict[str, str | list[dict]]:
    """The sections of `faceforge eval`'s report.md: summary table, then one detailed table per protocol."""
    sections: dict[str, str | list[dict]] = {"Summary (%, as in the papers)": [paper_row(rows, model)]}
    bins = [r for r in rows if "accuracy" in r]
    if bins:
        sections["Verification sets (InsightFace 10-fold protocol, flip fusion)"] = [
            {"set": r["set"], "pairs": r["pairs"], "accuracy": f"{r['accuracy']:.4f} ± {r['accuracy_std']:.4f}",
             **{f"TAR@{far:.0e}": _rate(v) for far, v in r["tar_at_far"].items()},
             "AUC": f"{r['auc']:.4f}", "XNorm": f"{r['xnorm']:.2f}"} for r in bins]
    for r in (r for r in rows if "tar_at_far_nearest" in r):
        sections.update(_ijb_sections(r))
    if threshold is not None:
        sections["Operating threshold (stored beside the weights for `faceforge verify`)"] = (
            f"cosine > **{threshold['threshold']:.4f}** accepts; chosen at FAR {threshold['target_far']:g} on "
            f"{threshold['set']} ({threshold['pairs']} pairs), where FAR = {threshold['far']:.2e} and "
            f"TAR = {threshold['tar']:.4f}."
            + ("" if threshold.get("measurable", True) else " Too few impostor pairs to measure that FAR: this "
               "threshold is a rough guess; choose it on a larger set.")
        )
    if any(r.get("not_measurable_fars") for r in rows):
        sections["Not measurable"] = (
            f"{NOT_MEASURABLE}: a TAR@FAR with fewer than {MIN_FALSE_ACCEPTS}/FAR impostor pairs behind it (its "
            f"threshold would rest on fewer than {MIN_FALSE_ACCEPTS} impostor pairs) is not reported.")
    return sections
