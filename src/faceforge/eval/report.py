"""Run reports: training-curve and ROC plots (matplotlib Agg, no pyplot state) and a markdown report.md."""

import json
import os
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

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


def write_report(run_dir: str | Path, sections: dict[str, str | list[dict]]) -> Path:
    """Write `run_dir/report.md`: one `##` section per entry, a table for a list of dicts, a string verbatim.

    Images belong in strings as relative links (see `image_link`). The file is replaced atomically.
    """
    run_dir = Path(run_dir)
    parts = [f"# Report: {run_dir.resolve().name}"]
    for title, body in sections.items():
        parts.append(f"## {title}\n\n{body if isinstance(body, str) else _table(body)}")
    text = "\n\n".join(parts) + "\n"
    out = run_dir / "report.md"
    atomic_write(out, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return out
