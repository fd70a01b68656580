"""Compare training objectives at equal budget (docs/benchmark-protocol.md): configs x seeds, one run at a time.

    python benchmarks/compare.py configs/synthface_arcface.yaml configs/synthface_unpg_arcface.yaml --seeds 0 1 2 \
        --ijb /tmp/synthijb

Each run goes to runs/cmp-<config stem>-s<seed> and is reused when its summary.json exists (--rerun to redo).
Prints one JSON line per run and per config, writes a markdown table and a PNG of the mean held-out ROC curves.
With --ijb, every run is also scored there by `faceforge eval --bootstrap` (one bootstrap seed for all, so all
runs share the subject resamples) and a second table gives each metric's mean, seed spread and the 95% interval
of its difference to the first config, with the verdict rule of the README's benchmarking section.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from faceforge.config import load_config
from faceforge.engine.datasets import synthface_dir, validation_bins
from faceforge.eval.bootstrap import difference_interval
from faceforge.eval.report import NOT_MEASURABLE, plot_roc
from faceforge.eval.verification import VerificationSet
from faceforge.models import load_backbone

FARS = ("0.001", "0.01")
IJB_METRICS = {"tar@1e-05": "TAR@1e-5", "tar@0.0001": "TAR@1e-4", "tar@0.001": "TAR@1e-3",
               "mean/rank_1": "1:N rank-1", "mean/tpir@0.01": "TPIR@FPIR 1e-2"}  # bootstrap key: column name


def run_one(config: Path, seed: int, runs: Path, overrides: list[str], rerun: bool, threads: int) -> dict:
    """Train one (config, seed) in a child process; its summary plus wall time and peak RSS."""
    run_dir = runs / f"cmp-{config.stem}-s{seed}"
    summary_path = run_dir / "summary.json"
    if rerun or not summary_path.is_file():
        cmd = [sys.executable, "-m", "faceforge", "train", str(config), f"train.seed={seed}",
               f"train.run_name={run_dir.name}", f"train.out_dir={runs}", "train.progress_bar=false", *overrides]
        child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        _, status, usage = os.wait4(child.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"compare: {' '.join(cmd)} failed")
        (run_dir / "peak_rss_mb.txt").write_text(f"{usage.ru_maxrss / 1024:.0f}\n")
    summary = json.loads(summary_path.read_text())
    rss = run_dir / "peak_rss_mb.txt"
    heldout = summary["eval"]["heldout"]
    images = summary["steps"] * load_config(run_dir / "config.yaml").train.batch_size
    return {
        "config": config.stem, "seed": seed, "run_dir": str(run_dir), "accuracy": heldout["accuracy"],
        **{f"tar@{far}": heldout["tar_at_far"][far] for far in FARS},
        "train_seconds": summary["train_seconds"], "img_s": images / summary["train_seconds"],
        "peak_rss_mb": float(rss.read_text()) if rss.is_file() else None,
    }


def ijb_eval(run_dir: Path, ijb: Path, resamples: int, seed: int, threads: int) -> dict:
    """Score a run on an IJB folder with `faceforge eval --bootstrap` (reused when done with the same resamples):
    its metrics, their bootstrap replicates (keys of IJB_METRICS) and the eval's wall time."""
    out = run_dir / f"eval-{ijb.name}"
    results = out / "results.json"
    done = results.is_file() and json.loads(results.read_text())["rows"][0].get("bootstrap") == {
        "resamples": resamples, "seed": seed, "unit": "subject"}
    if not done:
        cmd = [sys.executable, "-m", "faceforge", "eval", str(run_dir), "--ijb", str(ijb), "--out", str(out),
               "--bootstrap", str(resamples), "--bootstrap-seed", str(seed), "--no-progress"]
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        (out / "eval_seconds.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
    row = json.loads(results.read_text())["rows"][0]
    with np.load(out / f"bootstrap_{row['set']}.npz") as npz:
        replicates = {key: npz[key] for key in IJB_METRICS if key in npz}
    seconds = out / "eval_seconds.txt"
    return {"metrics": ijb_metrics(row), "replicates": replicates,
            "eval_seconds": float(seconds.read_text()) if seconds.is_file() else None}


def ijb_metrics(row: dict) -> dict[str, float | None]:
    """The IJB_METRICS of one results.json row (JSON keys: FARs as strings), None where not measurable."""
    mean = row.get("identification", {}).get("mean", {})
    return {"tar@1e-05": row["tar_at_far"].get("1e-05"), "tar@0.0001": row["tar_at_far"].get("0.0001"),
            "tar@0.001": row["tar_at_far"].get("0.001"), "mean/rank_1": mean.get("rank_1"),
            "mean/tpir@0.01": mean.get("tpir_at_fpir", {}).get("0.01")}


def verdict(delta: float, interval: list[float], spreads: list[float]) -> str:
    """"measurable" when the difference lies outside both the seed spread (the larger of the two configs' seed
    std) and its bootstrap interval excludes 0; else "no measurable difference"."""
    outside_interval = interval[0] > 0 or interval[1] < 0
    return "measurable" if outside_interval and abs(delta) > max(spreads) else "no measurable difference"


def _spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def ijb_table(rows: list[dict]) -> str:
    """Markdown, one line per config and metric: mean and seed std over seeds, then against the first config the
    difference of the means, its 95% subject-bootstrap interval and the verdict."""
    lines = ["| config | metric | mean | seed std | Δ to first | 95% interval of Δ | verdict |",
             "|---|---|---|---|---|---|---|"]
    names = list(dict.fromkeys(r["config"] for r in rows))
    runs = {name: [r["ijb"] for r in rows if r["config"] == name] for name in names}
    for name in names:
        for key, label in IJB_METRICS.items():
            values = [run["metrics"][key] for run in runs[name]]
            if any(v is None for v in values):
                lines.append(f"| {name} | {label} | {NOT_MEASURABLE} | | | | |")
                continue
            cells = [f"{statistics.mean(values):.4f}", f"{_spread(values):.4f}"]
            base = [run["metrics"][key] for run in runs[names[0]]]
            if name != names[0] and None not in base:
                delta = statistics.mean(values) - statistics.mean(base)
                interval = difference_interval([run["replicates"][key] for run in runs[name]],
                                               [run["replicates"][key] for run in runs[names[0]]])
                alone = " (one seed: no spread)" if min(len(values), len(base)) < 2 else ""
                cells += [f"{delta:+.4f}", f"[{interval[0]:+.4f}, {interval[1]:+.4f}]",
                          verdict(delta, interval, [_spread(values), _spread(base)]) + alone]
            else:
                cells += ["", "", ""]
            lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def heldout_roc(run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The held-out ROC of a finished run's final weights."""
    cfg = load_config(run_dir / "config.yaml")
    root = synthface_dir(cfg.synthface) / "train" if cfg.data.root == "synthface" else Path(cfg.data.root)
    model = load_backbone(run_dir)
    return VerificationSet.load(validation_bins(cfg, root)[0]).evaluate(model)[1]


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.4f}"


def table(rows: list[dict]) -> str:
    """Markdown: mean ± sample std over seeds per config, per-seed accuracies in brackets."""
    lines = ["| config | held-out accuracy | TAR@FAR=1e-3 | TAR@FAR=1e-2 | train s | img/s | peak RSS MB |",
             "|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["config"] for r in rows):
        rs = [r for r in rows if r["config"] == name]
        seeds = ", ".join(f"{r['accuracy']:.4f}" for r in rs)
        rss = [r["peak_rss_mb"] for r in rs if r["peak_rss_mb"] is not None]
        rss_cell = f"{max(rss):.0f}" if rss else "–"
        lines.append(
            f"| {name} | {mean_std([r['accuracy'] for r in rs])} ({seeds}) | {mean_std([r['tar@0.001'] for r in rs])} "
            f"| {mean_std([r['tar@0.01'] for r in rs])} | {min(r['train_seconds'] for r in rs):.0f}–"
            f"{max(r['train_seconds'] for r in rs):.0f} | {statistics.mean(r['img_s'] for r in rs):.0f} | {rss_cell} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", type=Path)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--runs", type=Path, default=Path("runs"))
    parser.add_argument("--out", type=Path, default=Path("runs/compare"), help="table .md and ROC .png prefix")
    parser.add_argument("--rerun", action="store_true", help="train again even when a run has a summary")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per run; 1 keeps runs fast when other jobs share the cores")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every run (repeatable)")
    parser.add_argument("--ijb", type=Path, help="also score every run on this IJB folder (SynthFace-IJB: "
                                                 "faceforge synth DIR --ijb), with subject-bootstrap intervals")
    parser.add_argument("--bootstrap", type=int, default=200, help="--ijb: bootstrap resamples")
    parser.add_argument("--bootstrap-seed", type=int, default=0, help="--ijb: seed shared by all runs")
    args = parser.parse_args()
    overrides = args.overrides
    rows = []
    for config in args.configs:
        for seed in args.seeds:
            rows.append(run_one(config, seed, args.runs, overrides, args.rerun, args.threads))
            if args.ijb:
                rows[-1]["ijb"] = ijb_eval(Path(rows[-1]["run_dir"]), args.ijb, args.bootstrap,
                                           args.bootstrap_seed, args.threads)
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "ijb"}), flush=True)
    curves = {}
    for name in dict.fromkeys(r["config"] for r in rows):
        fpr_grid = np.logspace(-4, 0, 200)
        tprs = [np.interp(fpr_grid, *heldout_roc(Path(r["run_dir"]))) for r in rows if r["config"] == name]
        curves[name] = (fpr_grid, np.mean(tprs, axis=0))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot_roc(curves, args.out.with_suffix(".png"), "held-out ROC, mean over seeds")
    md = table(rows) + (f"\n\n{args.ijb}, 95% subject-bootstrap intervals ({args.bootstrap} resamples):\n\n"
                        + ijb_table(rows) if args.ijb else "")
    args.out.with_suffix(".md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
