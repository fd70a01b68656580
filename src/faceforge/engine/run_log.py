"""The run folder: resolved config, metrics.jsonl, TensorBoard scalars, checkpoints, plots and report.md."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from faceforge.config import Config
from faceforge.fileio import atomic_write
from faceforge.eval import report


class RunLog:
    """Appends metrics as JSON lines and TensorBoard scalars; writes the plots and report at the end."""

    def __init__(self, run_dir: Path, fresh: bool = True) -> None:
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.dir / "metrics.jsonl"
        if fresh and self.metrics_path.exists():
            raise FileExistsError(f"{self.metrics_path} exists; refusing to overwrite a run")
        self.roc_curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._tb = None

    @staticmethod
    def new_dir(cfg: Config) -> Path:
        """runs/<run_name or backbone-head>-<timestamp>, with a suffix if that already exists."""
        name = cfg.train.run_name or f"{cfg.backbone['name']}-{cfg.head['name']}-{time.strftime('%Y%m%d-%H%M%S')}"
        base = Path(cfg.train.out_dir) / name
        path, n = base, 1
        while path.exists():
            n += 1
            path = base.with_name(f"{base.name}-{n}")
        return path

    @property
    def tensorboard(self):
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter  # imported late: it is slow to load

            self._tb = SummaryWriter(str(self.dir / "tb"))
        return self._tb

    def write_text(self, name: str, text: str) -> None:
        atomic_write(self.dir / name, lambda tmp: Path(tmp).write_text(text))

    def _append(self, record: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record, default=float) + "\n")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self._append({"step": step, **values})
        for key, value in values.items():
            self.tensorboard.add_scalar(f"train/{key}", value, step)

    def event(self, kind: str, step: int, data: dict[str, Any]) -> None:
        self._append({"event": kind, "step": step, **data})
        for name, metrics in data.items():
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(f"{kind}/{name}/{key}", value, step)

    def add_roc(self, name: str, curve: tuple[np.ndarray, np.ndarray]) -> None:
        """A (fpr, tpr) curve for roc.png; the last one given under a name is plotted."""
        self.roc_curves[name] = curve

    def truncate_after(self, step: int) -> None:
        """Drop lines logged after `step` (written past the last checkpoint before an interruption)."""
        if not self.metrics_path.exists():
            return
        kept = [line for line in self.metrics_path.read_text().splitlines() if json.loads(line)["step"] <= step]
        self.write_text(self.metrics_path.name, "".join(line + "\n" for line in kept))

    def finish(self, summary: dict[str, Any]) -> None:
        """Training curve and ROC PNGs, summary.json and report.md."""
        sections: dict[str, Any] = {}
        if self.metrics_path.exists():
            report.plot_training_curves(self.metrics_path, self.dir / "curves.png")
            sections["Training curves"] = report.image_link(self.dir, self.dir / "curves.png", "training curves")
        if self.roc_curves:
            report.plot_roc(self.roc_curves, self.dir / "roc.png", "verification ROC")
            sections["ROC"] = report.image_link(self.dir, self.dir / "roc.png", "ROC")
        sections["Run"] = [{k: v for k, v in summary.items() if k != "eval"}]
        if summary.get("eval"):
            sections["Verification"] = [
                {
                    "set": name,
                    **{k: v for k, v in m.items() if isinstance(v, (int, float))},
                    **{f"TAR@FAR={far:g}": v for far, v in m.get("tar_at_far", {}).items()},
                }
                for name, m in summary["eval"].items()
            ]
        self.write_text("summary.json", json.dumps(summary, indent=2, default=float))
        report.write_report(self.dir, sections)
        if self._tb is not None:
            self._tb.close()


class SilentRunLog(RunLog):
    """What ranks other than 0 hold under torchrun: same folder, writes nothing."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = Path(run_dir)
        self.metrics_path = self.dir / "metrics.jsonl"
        self.roc_curves = {}
        self._tb = None

    def write_text(self, name: str, text: str) -> None:
        pass

    def scalars(self, step: int, values: dict[str, float]) -> None:
        pass

    def event(self, kind: str, step: int, data: dict[str, Any]) -> None:
        pass

    def truncate_after(self, step: int) -> None:
        pass

    def finish(self, summary: dict[str, Any]) -> None:
        pass
