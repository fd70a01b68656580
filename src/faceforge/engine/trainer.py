"""The training loop: data -> backbone -> head (+ regularizers) -> optimizer; one process, or K under torchrun."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from faceforge.config import Config, dump_config, load_config
from faceforge.data.loader import Batch, BatchPlan, TrainLoader, prefetch_to_device, to_model_input
from faceforge import fileio
from faceforge.engine import checkpoint as ckpt
from faceforge.engine.datasets import open_training_set, validation_bins
from faceforge.engine.optim import lr_factor, set_lr
from faceforge.engine.parallel import init_from_env
from faceforge.engine.step import build_parts, optimisation_step
from faceforge.engine.run_log import RunLog, SilentRunLog
from faceforge.errors import ConfigError, DataError, FaceforgeError
from faceforge.eval.verification import VerificationSet
from faceforge.runtime import pick_device


class TrainingAborted(FaceforgeError):
    """Training cannot go on (e.g. the loss stayed non-finite); the message says why and where."""


@dataclass
class RunState:
    """Counters that a checkpoint must carry so a resumed run continues exactly where it stopped."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    elapsed: float = 0.0
    bad_in_a_row: int = 0
    skipped_steps: int = 0
    skipped_records: int = 0


class Trainer:
    """Builds every part from a Config and runs the loop; `Trainer.resume(run_dir)` continues a run."""

    def __init__(self, cfg: Config, run_dir: Path | None = None, resuming: bool = False) -> None:
        self.cfg = cfg
        t = cfg.train
        self.par = init_from_env(t.dist_timeout_s)
        self.device = pick_device(t.device, self.par.local_rank)
        torch.manual_seed(t.seed)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

        self.dataset, data_root = open_training_set(cfg)
        self.num_classes = self._num_classes(data_root)
        if self.par.active and cfg.data.on_corrupt == "skip":
            raise ConfigError("data.on_corrupt=skip would give the processes unequal batches; use raise with torchrun")
        self.parts = build_parts(cfg, self.num_classes, self.device, self.par)
        self.backbone, self.head, self.optimizer = self.parts.backbone, self.parts.head, self.parts.optimizer
        if t.init_from and not resuming:
            self._init_from(t.init_from)
        self.plan = BatchPlan(len(self.dataset), t.batch_size, t.seed, self.par.rank, self.par.world_size)
        self.loader = TrainLoader(
            self.dataset,
            self.plan,
            num_workers=cfg.data.num_workers,
            in_memory=cfg.data.in_memory,
            pin_memory=self.device.type == "cuda",
            progress=t.progress_bar and self.par.is_main,
        )
        bins = validation_bins(cfg, data_root)
        self.val_sets = [VerificationSet.load(p) for p in bins] if self.par.is_main else []
        self.total_steps = t.max_steps or t.epochs * len(self.plan)
        self.state = RunState()
        run_dir = self._shared(run_dir or RunLog.new_dir(cfg))
        self.log = RunLog(run_dir, fresh=not resuming) if self.par.is_main else SilentRunLog(run_dir)
        if not resuming:
            self.log.write_text("config.yaml", dump_config(cfg))

    def _shared(self, value):
        """Rank 0's value on every rank (e.g. the run folder, whose name has a timestamp)."""
        if not self.par.active:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.par.group)
        return box[0]

    def _num_classes(self, data_root: Path) -> int:
        found = self.dataset.num_classes
        asked = self.cfg.head.get("num_classes")
        if asked is None:
            return found
        if not isinstance(asked, int) or asked < found:
            raise ConfigError(f"head.num_classes={asked!r} is smaller than the {found} classes in {data_root}")
        return asked

    def _init_from(self, path: str) -> None:
        """Fine-tune from any weights faceforge.models loads (checkpoint, .safetensors, arcface_torch .pt / .pth):
        the backbone must be the configured architecture; head centres are taken only if their shapes match."""
        from faceforge.models import backbone_state, check_backbone

        state = fileio.load_weights(path)
        params = backbone_state(state)
        check_backbone(self.cfg.backbone, params, f"init_from {path}")
        fileio.load_into(self.backbone, params, f"init_from {path} (backbone)")
        head_state = ckpt.shard_head_state(self.head, fileio.split_state(state, "head"))
        own = self.head.state_dict()
        if head_state and all(k in own and own[k].shape == v.shape for k, v in head_state.items()):
            fileio.load_into(self.head, head_state, f"init_from {path} (head)")

    @classmethod
    def resume(cls, run_dir: str | Path, overrides: list[str] | None = None) -> "Trainer":
        """Rebuild a run from its config.yaml and its newest checkpoint."""
        run_dir = Path(run_dir)
        weights, state_path = fileio.latest_checkpoint(run_dir)
        cfg = load_config(run_dir / "config.yaml", overrides or [])
        trainer = cls(cfg, run_dir=run_dir, resuming=True)
        state = fileio.load_weights(weights)
        fileio.load_into(trainer.backbone, fileio.split_state(state, "backbone"), f"{weights} (backbone)")
        head_state = ckpt.shard_head_state(trainer.head, fileio.split_state(state, "head"))
        fileio.load_into(trainer.head, head_state, f"{weights} (head)")
        saved = ckpt.load_trainer_state(state_path)
        ckpt.load_optimizer_state(trainer.optimizer, trainer.backbone, trainer.head, saved["optimizer"])
        trainer.parts.scaler.load_state_dict(saved["scaler"])
        torch.set_rng_state(saved["rng"])
        trainer.state = RunState(**saved["run"])
        trainer.log.truncate_after(trainer.state.step)
        if overrides:
            trainer.log.write_text("config.yaml", dump_config(cfg))
        return trainer

    def progress(self) -> float:
        """Fraction of training done: elapsed time over the budget when one is set, else steps over total."""
        t = self.cfg.train
        by_step = self.state.step / max(self.total_steps, 1)
        if t.time_budget_s <= 0:
            return by_step
        by_time = self.state.elapsed / t.time_budget_s
        return max(by_time, by_step) if t.max_steps > 0 else by_time

    def done(self) -> bool:
        return self.progress() >= 1.0

    @classmethod
    def start(cls, cfg: Config) -> "Trainer":
        """A new run, or under a torchrun restart (--max-restarts) the same run resumed from its last checkpoint.

        Restarted workers find their run folder by name: train.run_name, else one derived from torchrun's run id.
        """
        restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        run_id = os.environ.get("TORCHELASTIC_RUN_ID")
        if run_id and not cfg.train.run_name:
            cfg.train.run_name = f"{cfg.backbone['name']}-{cfg.head['name']}-{run_id}"
        run_dir = Path(cfg.train.out_dir) / cfg.train.run_name
        if restarts > 0 and (run_dir / "checkpoints" / fileio.LATEST).is_file():
            return cls.resume(run_dir)
        return cls(cfg, run_dir=run_dir if run_id else None)

    def save(self) -> Path:
        """A checkpoint every rank takes part in (sharded centres are gathered); rank 0 writes it."""
        trainer_state = {
            "optimizer": ckpt.optimizer_state(self.optimizer, self.backbone, self.head, self.par),
            "scaler": self.parts.scaler.state_dict(),
            "rng": torch.get_rng_state(),
            "run": asdict(self.state),
        }
        return ckpt.save_checkpoint(
            self.log.dir / "checkpoints", self.state.step, self.backbone, self.head, trainer_state, self.par
        )

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float] | None:
        """One optimisation step; returns its metrics, or None when the loss was not finite and the step skipped."""
        cfg = self.cfg
        progress = self.progress()
        lr = cfg.optim.lr * lr_factor(cfg.schedule, progress, cfg.optim.lr)
        set_lr(self.optimizer, lr)
        epochs_done = self.state.epoch + self.state.batch_in_epoch / max(len(self.plan), 1)
        self.head.set_progress(progress, epochs_done)
        flip_gen = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + self.state.step)
        x = to_model_input(images, self.device, cfg.data.flip, flip_gen, self.parts.channels_last)
        y = labels.to(self.device, non_blocking=True)
        metrics = optimisation_step(self.parts, x, y)
        return None if metrics is None else {**metrics, "lr": lr}

    def _checked(self, batches: Iterator[Batch]) -> Iterator[Batch]:
        """Batches whose labels fit the head, checked on the CPU before any device copy."""
        for batch, (images, labels, skipped) in enumerate(batches, start=self.state.batch_in_epoch):
            if labels.numel() and int(labels.max()) >= self.num_classes:
                raise DataError(
                    f"epoch {self.state.epoch} batch {batch}: label {int(labels.max())} >= "
                    f"head.num_classes={self.num_classes}"
                )
            yield images, labels, skipped

    def fit(self, until_step: int | None = None) -> dict:
        """Train until done (or until `until_step`, leaving a checkpoint), evaluate, write the report.

        Under torchrun a collective that fails or outlasts train.dist_timeout_s (another rank died) ends the run
        with a one-line error instead of a hang.
        """
        if not self.par.active:
            return self._fit(until_step)
        try:
            return self._fit(until_step)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise TrainingAborted(
                f"rank {self.par.rank}/{self.par.world_size}: lost the other processes at step {self.state.step} "
                f"(a collective failed or waited over train.dist_timeout_s={self.cfg.train.dist_timeout_s:g}s): "
                f"{first}"
            ) from None

    def _fit(self, until_step: int | None) -> dict:
        t = self.cfg.train
        bar = tqdm(total=self.total_steps if not t.time_budget_s else None, initial=self.state.step,
                   disable=not (t.progress_bar and self.par.is_main), desc="train", dynamic_ncols=True)
        window_start, window_images = time.perf_counter(), 0
        while not self.done() and (until_step is None or self.state.step < until_step):
            last = time.perf_counter()
            batches = self._checked(self.loader.epoch(self.state.epoch, self.state.batch_in_epoch))
            for images, labels, skipped in prefetch_to_device(batches, self.device):
                metrics = self.train_step(images, labels)
                s = self.state
                s.step += 1
                s.batch_in_epoch += 1
                s.skipped_records += skipped
                s.elapsed += time.perf_counter() - last
                if self.par.active and t.time_budget_s > 0:
                    s.elapsed = self._slowest(s.elapsed)
                window_images += len(labels)
                if metrics is None:
                    s.skipped_steps += 1
                    s.bad_in_a_row += 1
                    if s.bad_in_a_row >= t.max_bad_steps:
                        raise TrainingAborted(
                            f"loss was not finite for {s.bad_in_a_row} steps in a row (step {s.step}); "
                            "lower optim.lr or use precision=fp32"
                        )
                    last = time.perf_counter()
                    continue
                s.bad_in_a_row = 0
                bar.update(1)
                if s.step % t.log_every == 0 or self.done():
                    now = time.perf_counter()
                    metrics["img_s"] = window_images / max(now - window_start, 1e-9)
                    window_start, window_images = now, 0
                    self.log.scalars(s.step, {"epoch": s.epoch, **metrics})
                    bar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.3g}",
                                    img_s=f"{metrics['img_s']:.0f}")
                if t.checkpoint_every and s.step % t.checkpoint_every == 0:
                    self.save()
                if t.eval_every and s.step % t.eval_every == 0:
                    self.evaluate()
                if self.done() or (until_step is not None and s.step >= until_step):
                    break
                last = time.perf_counter()
            else:
                self._end_epoch(bar)
        bar.close()
        self.save()
        if until_step is not None and not self.done():
            return {"run_dir": str(self.log.dir), "step": self.state.step}
        results = self.evaluate()
        summary = {
            "run_dir": str(self.log.dir),
            "steps": self.state.step,
            "train_seconds": round(self.state.elapsed, 1),
            "skipped_steps": self.state.skipped_steps,
            "skipped_records": self.state.skipped_records,
            "eval": results,
        }
        self.log.finish(summary)
        return summary

    def _slowest(self, seconds: float) -> float:
        """The largest value over ranks, so that every rank agrees when a time budget is spent."""
        value = torch.tensor(seconds, dtype=torch.float64)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.par.group)
        return float(value)

    def _end_epoch(self, bar: tqdm) -> None:
        """Report corrupt records skipped so far (data.on_corrupt=skip), then move to the next epoch."""
        s = self.state
        if s.skipped_records:
            self.log.event("data", s.step, {"epoch_end": {"epoch": s.epoch, "skipped_records": s.skipped_records}})
            bar.write(f"epoch {s.epoch}: {s.skipped_records} corrupt records skipped so far (data.on_corrupt=skip)")
        s.epoch += 1
        s.batch_in_epoch = 0

    def evaluate(self) -> dict[str, dict]:
        """Verification accuracy on each validation set, logged as an `eval` event."""
        results = {}
        for vs in self.val_sets:
            metrics, roc = vs.evaluate(self.backbone, device=self.device)
            results[vs.name] = metrics
            self.log.roc_curves[vs.name] = roc
        if results:
            self.log.event("eval", self.state.step, results)
        return results

