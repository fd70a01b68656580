"""The training loop: data -> backbone -> head (+ regularizers) -> optimizer; one process, or K under torchrun."""

from __future__ import annotations

import os
import sys
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
from faceforge.engine import checkpoint_files as files
from faceforge.engine.datasets import open_training_set, validation_bins
from faceforge.engine.failures import TrainingAborted, torchrun_error
from faceforge.engine.optim import lr_factor, set_lr
from faceforge.engine.parallel import init_from_env
from faceforge.engine.step import StepResult, build_parts, train_step
from faceforge.engine.run_log import RunLog, SilentRunLog
from faceforge.engine.stop import StopOnSignal, TrainingInterrupted
from faceforge.engine.validate import check_components
from faceforge.errors import ConfigError, DataError, FaceforgeError

__all__ = ["RunState", "Trainer", "TrainingAborted", "TrainingInterrupted"]
from faceforge.eval.verification import VerificationSet
from faceforge.distributed import all_reduce_scalars
from faceforge.runtime import configure_cuda, pick_device, to_host


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

    def __init__(self, cfg: Config, run_dir: Path | None = None) -> None:
        """A new run: the parts `cfg` describes, train.init_from's weights to fine-tune from, a fresh run folder."""
        self._build(cfg)
        if cfg.train.init_from:
            self._init_from(cfg.train.init_from)
        self._open_log(run_dir or RunLog.new_dir(cfg), fresh=True)

    def _build(self, cfg: Config) -> None:
        """What a new and a resumed run share: process group, device, data, model parts, loader, counters."""
        self.cfg, t = cfg, cfg.train
        self.par = init_from_env(t.dist_timeout_s)
        self.device = pick_device(t.device, self.par.local_rank)
        check_components(cfg)  # user errors in the component tables, before any data is opened or generated
        torch.manual_seed(t.seed)
        configure_cuda(self.device, t.tf32)
        self.dataset, data_root = open_training_set(cfg)
        self.num_classes = self._num_classes(data_root)
        if self.par.active and cfg.data.on_corrupt == "skip":
            raise ConfigError("data.on_corrupt=skip would give the processes unequal batches; use raise with torchrun")
        self.parts = build_parts(cfg, self.num_classes, self.device, self.par)
        self.backbone, self.head, self.optimizer = self.parts.backbone, self.parts.head, self.parts.optimizer
        self.plan = BatchPlan(len(self.dataset), t.batch_size, t.seed, self.par.rank, self.par.world_size)
        self.loader = TrainLoader(self.dataset, self.plan, num_workers=cfg.data.num_workers,
                                  in_memory=cfg.data.in_memory, pin_memory=self.device.type == "cuda",
                                  progress=t.progress_bar and self.par.is_main)
        bins = validation_bins(cfg, data_root)
        self.val_sets = [VerificationSet.load(p) for p in bins] if self.par.is_main else []
        self.total_steps = t.max_steps or t.epochs * len(self.plan)
        self.state = RunState()
        # Skipped steps and the current run of them, counted on the device and read when the loss is (log steps).
        self._skips = torch.zeros((), dtype=torch.int64, device=self.device)
        self._bad_run = torch.zeros((), dtype=torch.int64, device=self.device)
        self.saved_step: int | None = None  # the step of the newest checkpoint of this run
        self._flip_gen = torch.Generator(self.device)  # re-seeded every step (see train_step)

    def _open_log(self, run_dir: Path, fresh: bool) -> None:
        """The run folder (rank 0's name on every rank); a fresh one gets the resolved config."""
        run_dir = self._shared(run_dir)
        self.log = RunLog(run_dir, fresh=fresh) if self.par.is_main else SilentRunLog(run_dir)
        if fresh:
            self.log.write_text("config.yaml", dump_config(self.cfg))

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
    def resume(cls, run_dir: str | Path, overrides: list[str] | None = None, step: int | None = None) -> "Trainer":
        """Rebuild a run from its config.yaml and a checkpoint: `step`'s, else the newest intact one.

        Checkpoints passed over (damaged) or after `step` are dropped, and so are the metrics logged after it.
        """
        run_dir = Path(run_dir)
        files.read_index(run_dir / "checkpoints")  # one line when there is no checkpoint, before building anything
        cfg = load_config(run_dir / "config.yaml", overrides or [])
        trainer = cls.__new__(cls)  # not __init__: a resumed run takes its weights from the checkpoint
        trainer._build(cfg)
        trainer._open_log(run_dir, fresh=False)
        step = trainer._choose_checkpoint(step)
        trainer.state = RunState(**ckpt.load_checkpoint(run_dir / "checkpoints", step, trainer.parts))
        trainer.saved_step = step
        trainer.log.truncate_after(trainer.state.step)
        if overrides:
            trainer.log.write_text("config.yaml", dump_config(cfg))
        return trainer

    def _choose_checkpoint(self, step: int | None) -> int:
        """Rank 0 verifies the checkpoints, picks one (one warning line for those passed over) and drops the later
        ones; every rank gets its step, or its error."""
        picked: tuple[dict, list[str]] | FaceforgeError | None = None
        ckpt_dir = self.log.dir / "checkpoints"
        if self.par.is_main:
            try:
                picked = files.choose(ckpt_dir, step)
                files.rewind(ckpt_dir, picked[0]["step"])
            except FaceforgeError as exc:
                picked = exc
        picked = self._shared(picked)
        if isinstance(picked, FaceforgeError):
            raise picked
        entry, passed_over = picked
        if passed_over and self.par.is_main:
            print(f"faceforge: warning: {'; '.join(passed_over)}; resuming from step {entry['step']}", file=sys.stderr)
        return entry["step"]

    def progress(self) -> float:
        """Fraction of training done, what the lr schedule and margin ramps follow: steps over total; with a time
        budget, elapsed time over it, or (when max_steps is also set) whichever of the two is further along."""
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
        """A checkpoint every rank takes part in (sharded centres gathered, every rank's RNG); rank 0 writes it and
        keeps the newest train.keep_checkpoints. Once per step: a second call at the same step writes nothing."""
        self._read_counters()
        step = self.state.step
        if self.saved_step != step:
            trainer_state = {
                "optimizer": ckpt.optimizer_state(self.optimizer, self.backbone, self.head, self.par),
                "scaler": self.parts.scaler.state_dict(),
                "rng": ckpt.rng_state(self.device, self.par),
                "run": asdict(self.state),
            }
            ckpt.save_checkpoint(self.log.dir / "checkpoints", step, self.backbone, self.head, trainer_state,
                                 self.par, keep=self.cfg.train.keep_checkpoints)
            self.saved_step = step
        return self.log.dir / "checkpoints" / files.weights_name(step)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> StepResult:
        """One optimisation step at the schedule's lr, its result left on the device (see `_log_step`)."""
        cfg = self.cfg
        progress = self.progress()
        lr = cfg.optim.lr * lr_factor(cfg.schedule, progress, cfg.optim.lr)
        set_lr(self.optimizer, lr)
        epochs_done = self.state.epoch + self.state.batch_in_epoch / max(len(self.plan), 1)
        self.head.set_progress(progress, epochs_done)
        # The flip draws are seeded by (seed, step), so a resumed run mirrors the same images; drawn on the device.
        # 1_000_003 (a prime above any step count) keeps one seed's steps apart from the next seed's.
        self._flip_gen.manual_seed(cfg.train.seed * 1_000_003 + self.state.step)
        x = to_model_input(images, self.device, cfg.data.flip, self._flip_gen, self.parts.channels_last)
        y = labels.to(self.device, non_blocking=True)
        result = train_step(self.parts, x, y)
        result.metrics["lr"] = lr
        self._skips += result.skipped
        self._bad_run = (self._bad_run + 1) * result.skipped
        return result

    def _read_counters(self, result: StepResult | None = None) -> dict[str, float] | None:
        """Bring the skip counters (and a step's result) to the host in one transfer; abort on a long bad run."""
        loss = [] if result is None else [result.loss, result.skipped, *result.metrics.values()]
        skips, bad, *values = to_host([self._skips, self._bad_run, *loss])
        s = self.state
        s.skipped_steps, s.bad_in_a_row = s.skipped_steps + int(skips), int(bad)
        self._skips.zero_()
        if s.bad_in_a_row >= self.cfg.train.max_bad_steps:
            raise TrainingAborted(
                f"loss was not finite for {s.bad_in_a_row} steps in a row (step {s.step}); "
                "lower optim.lr or use precision=fp32"
            )
        if result is None or values[1]:
            return None
        return {"loss": values[0], **dict(zip(result.metrics, values[2:]))}

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
        except Exception as exc:
            raise torchrun_error(exc, self.par.rank, self.par.world_size, self.state.step,
                                 self.cfg.train.dist_timeout_s) from exc

    def _stop(self, until_step: int | None) -> bool:
        return self.done() or (until_step is not None and self.state.step >= until_step)

    def _fit(self, until_step: int | None) -> dict:
        with StopOnSignal(self.par, self.cfg.train.log_every) as stop:
            return self._fit_until(until_step, stop)

    def _fit_until(self, until_step: int | None, stop: StopOnSignal) -> dict:
        """The loop; on SIGTERM/SIGINT it ends after the step under way, writes a checkpoint and raises
        TrainingInterrupted."""
        t = self.cfg.train
        bar = tqdm(total=self.total_steps if not t.time_budget_s else None, initial=self.state.step,
                   disable=not (t.progress_bar and self.par.is_main), desc="train", dynamic_ncols=True)
        self._window = (time.perf_counter(), 0)
        self._bad_run.fill_(self.state.bad_in_a_row)  # a resumed run continues its count
        while not stop.agreed and not self._stop(until_step):
            batches = self._checked(self.loader.epoch(self.state.epoch, self.state.batch_in_epoch))
            clock = time.perf_counter()  # a step's time includes waiting for its batch
            for images, labels, skipped in prefetch_to_device(batches, self.device):
                if stop.poll(self.state.step):
                    break
                result = self.train_step(images, labels)
                now = time.perf_counter()
                self._advance(len(labels), skipped, now - clock)
                clock = now
                s = self.state
                if s.step % t.log_every == 0 or self.done():
                    self._log_step(result, bar)
                if t.checkpoint_every and s.step % t.checkpoint_every == 0:
                    self.save()
                if t.eval_every and s.step % t.eval_every == 0:
                    self.evaluate()
                bar.update(1)
                if self._stop(until_step):
                    break
            if not stop.agreed and not self._stop(until_step):
                self._end_epoch(bar)
        bar.close()
        return self._finish(until_step, stop)

    def _finish(self, until_step: int | None, stop: StopOnSignal) -> dict:
        """A checkpoint; then, for a run that is done, the final evaluation, report and summary."""
        self.save()
        if stop.agreed:
            raise TrainingInterrupted(stop.agreed, self.state.step, self.log.dir)
        if until_step is not None and not self.done():
            return {"run_dir": str(self.log.dir), "step": self.state.step}
        s = self.state
        summary = {"run_dir": str(self.log.dir), "steps": s.step, "train_seconds": round(s.elapsed, 1),
                   "skipped_steps": s.skipped_steps, "skipped_records": s.skipped_records, "eval": self.evaluate()}
        self.log.finish(summary)
        return summary

    def _advance(self, images: int, skipped_records: int, seconds: float) -> None:
        """Count a finished step: its images, the corrupt records its batch skipped and its wall time."""
        s = self.state
        s.step += 1
        s.batch_in_epoch += 1
        s.skipped_records += skipped_records
        s.elapsed += seconds
        if self.par.active and self.cfg.train.time_budget_s > 0:
            s.elapsed = self._slowest(s.elapsed)  # a host sync every step, only for a time budget under torchrun
        self._window = (self._window[0], self._window[1] + images)

    def _log_step(self, result: StepResult, bar: tqdm) -> None:
        """The one host read of a logged step: its loss and metrics (and the skip counters) to the run log."""
        metrics = self._read_counters(result)
        if metrics is None:  # this step was skipped
            return
        start, images = self._window
        now = time.perf_counter()
        metrics["img_s"] = images / max(now - start, 1e-9)
        self._window = (now, 0)
        self.log.scalars(self.state.step, {"epoch": self.state.epoch, **metrics})
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.3g}", img_s=f"{metrics['img_s']:.0f}")

    def _slowest(self, seconds: float) -> float:
        """The largest value over ranks, so that every rank agrees when a time budget is spent."""
        return float(all_reduce_scalars([seconds], dist.ReduceOp.MAX, self.par.group, self.par.device)[0])

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
            metrics, roc = vs.evaluate(self.backbone, device=self.device, precision=self.cfg.train.precision)
            results[vs.name] = metrics
            self.log.add_roc(vs.name, roc)
        if results:
            self.log.event("eval", self.state.step, results)
        return results

