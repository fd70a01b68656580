"""`faceforge bench train`: images/s of the real training step, on device-resident synthetic batches or a .rec;
`faceforge bench head-step`: ms per step and peak memory of the trainer's head path alone (with --memory, the
peak of live tensors one step holds next to what engine/head_memory.py plans for it)."""

from __future__ import annotations

import platform
import resource
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from faceforge.config import Config, TrainConfig
from faceforge.data.loader import BatchPlan, TrainLoader, prefetch_to_device, to_model_input
from faceforge.data.record_dataset import RecordDataset
from faceforge.engine.head_memory import (
    GIF_VOCABULARY, head_step_parts, plan_head_memory, track_step, with_random_codes,
)
from faceforge.engine.step import StepParts, build_parts, train_step
from faceforge.engine.validate import check_components
from faceforge.errors import ConfigError
from faceforge.runtime import configure_cuda, pick_device, synchronize
from faceforge.tokenizer.codebook import codes_identities

LOG_EVERY = TrainConfig.log_every


def _synthetic(batch: int, num_classes: int, device: torch.device, channels_last: bool) -> Iterator[tuple]:
    """Four random batches already on the device, rotated: measures the step without any data loading."""
    g = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    pool = [
        (
            (torch.rand(batch, 3, 112, 112, generator=g) * 2 - 1).to(device).contiguous(memory_format=fmt),
            torch.randint(0, num_classes, (batch,), generator=g).to(device),
        )
        for _ in range(4)
    ]
    while True:
        yield from pool


def _from_records(root: Path, batch: int, device: torch.device, channels_last: bool, workers: int) -> Iterator[tuple]:
    """Batches through the real loader (decode, workers, prefetch, flip, scaling), epoch after epoch."""
    dataset = RecordDataset(root)
    loader = TrainLoader(dataset, BatchPlan(len(dataset), batch, seed=0), num_workers=workers,
                         pin_memory=device.type == "cuda")
    epoch = 0
    while True:
        for images, labels, _ in prefetch_to_device(loader.epoch(epoch), device):
            yield to_model_input(images, device, True, None, channels_last), labels.to(device)
        epoch += 1


DEFAULT_CLASSES = 93431  # MS1MV3's identities: the size a bench row has when neither flag, config nor codes say


def _head_size(cfg: Config) -> tuple[int, str]:
    """The head's class count and what decided it: head.num_classes (what --num-classes sets), else a GIF head's
    codes file (its identities), else DEFAULT_CLASSES."""
    asked = cfg.head.get("num_classes")
    if asked is not None:
        if isinstance(asked, bool) or not isinstance(asked, int) or asked < 1:
            raise ConfigError(f"head.num_classes must be a positive integer, got {asked!r}")
        return asked, "head.num_classes"
    if cfg.head["name"] == "gif" and isinstance(cfg.head.get("codes"), str):
        return codes_identities(cfg.head["codes"]), "head.codes"
    return DEFAULT_CLASSES, "default"


def _sample_rate(head: nn.Module) -> float | None:
    """The PartialFC rate the built head samples its classes at (UNPG: its base head's); None if it never samples."""
    return getattr(getattr(head, "base", head), "sample_rate", None)


def _peak_memory_gb(dev: torch.device) -> float:
    """CUDA's max allocated since the reset, else the process's max RSS."""
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def bench_train(cfg: Config, warmup: int, steps: int, data: str | None = None) -> dict:
    """Time `steps` optimisation steps after `warmup` ones (device synchronised at both ends); one result row.

    Everything the trainer takes comes from `cfg` and goes through the trainer's own `build_parts` and
    `optimisation_step`: backbone, head and its parameters (GIF codes, sample_rate, UNPG), regularizers, optimizer,
    precision, channels_last and train.compile. Batches are synthetic on the device, or read from the .rec folder
    `data` through the real loader with data.num_workers workers.
    """
    if warmup < 0 or steps < 1:
        raise ConfigError(f"bench train needs --warmup >= 0 and --steps >= 1, got {warmup} and {steps}")
    dev = pick_device(cfg.train.device)
    check_components(cfg)
    num_classes, size_from = _head_size(cfg)
    configure_cuda(dev, cfg.train.tf32)
    torch.manual_seed(cfg.train.seed)
    parts = build_parts(cfg, num_classes, dev)  # compiles the backbone under train.compile
    batch = cfg.train.batch_size
    batches = (
        _from_records(Path(data), batch, dev, parts.channels_last, cfg.data.num_workers)
        if data
        else _synthetic(batch, num_classes, dev, parts.channels_last)
    )
    seconds = _timed_steps(parts, batches, warmup, steps)
    return {
        "bench": "train",
        "backbone": cfg.backbone["name"],
        "head": cfg.head["name"],
        "head_params": {k: v for k, v in cfg.head.items() if k != "name"},
        "sample_rate": _sample_rate(parts.head),
        "regularizers": cfg.regularizers,
        "num_classes": parts.head.num_classes,
        "num_classes_from": size_from,
        "batch": batch,
        "precision": cfg.train.precision,
        "amp_dtype": str(parts.amp_dtype).replace("torch.", "") if parts.amp_dtype else "fp32",
        "channels_last": parts.channels_last,
        "compile": cfg.train.compile,
        "optimizer": cfg.optim.name,
        "data": data or "synthetic-on-device",
        "steps": steps,
        "img_s": round(batch * steps / seconds, 1),
        "ms_step": round(1000 * seconds / steps, 2),
        "peak_memory_gb": round(_peak_memory_gb(dev), 2),
        "peak_memory_kind": "cuda max_memory_allocated" if dev.type == "cuda" else "process max RSS",
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
    }


def _timed_steps(parts: StepParts, batches: Iterator[tuple], warmup: int, steps: int) -> float:
    """Seconds that `steps` optimisation steps take after `warmup` untimed ones (the device synchronised at both
    ends; CUDA peak memory counted over the timed ones). The one place bench calls the step: as the trainer does,
    the step's result is read on the host every LOG_EVERY steps (train.log_every's default), not every step."""
    start = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            synchronize(parts.device)
            if parts.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(parts.device)
            start = time.perf_counter()
        result = train_step(parts, *next(batches))
        if (i + 1) % LOG_EVERY == 0:
            result.read()
    synchronize(parts.device)
    return time.perf_counter() - start


def _random_labels(batch: int, num_classes: int, device: torch.device) -> Iterator[tuple]:
    """Four batches of placeholder images and random labels, rotated (the labels decide PartialFC's sample)."""
    g = torch.Generator().manual_seed(0)
    pool = [(torch.zeros(batch, 1, device=device), torch.randint(0, num_classes, (batch,), generator=g).to(device))
            for _ in range(4)]
    while True:
        yield from pool


def _build_params(head: str, num_classes: int, embedding_size: int, sample_rate: float, head_params: dict) -> dict:
    """What the head is built with: GIF's random distinct codes and code vectors (vocabulary head_params' v,
    default GIF_VOCABULARY) made in memory (no code vectors when gamma is 0), else the PartialFC rate."""
    if head != "gif":
        return {**head_params, "sample_rate": sample_rate}
    if sample_rate != 1.0:
        raise ConfigError(f"bench head-step --sample-rate {sample_rate}: gif has no class centres to sample")
    return with_random_codes({**head_params, "v": head_params.get("v", GIF_VOCABULARY)}, num_classes, embedding_size)


def _memory_row(parts: StepParts, batches: Iterator[tuple], head: str, num_classes: int, sample_rate: float,
                batch: int, embedding_size: int, optimizer: str, head_params: dict) -> dict:
    """One more train_step under the live-tensor tracker next to the plan of the same step at world size 1 (on
    CUDA also the allocator's peak over that step: all it holds, what the tracker follows and the rest)."""
    cuda = parts.device.type == "cuda"
    if cuda:
        synchronize(parts.device)
        torch.cuda.reset_peak_memory_stats(parts.device)
    tracked = track_step(parts, *next(batches)).peak
    allocator = {"allocator_peak_gib": round(_peak_memory_gb(parts.device), 4)} if cuda else {}
    plan = plan_head_memory(num_classes, 1, batch, embedding_size, optimizer, sample_rate, head,
                            head_params=head_params, device=str(parts.device))
    return {"tracked_peak_gib": round(tracked / 2**30, 4), **allocator, "planned_gib": plan["total_gib"],
            "planned_over_tracked": round(plan["total_bytes"] / tracked, 4)}


def bench_head_step(head: str, num_classes: int, sample_rate: float, batch: int, embedding_size: int,
                    steps: int, device: str, optimizer: str, warmup: int, head_params: dict | None = None,
                    memory: bool = False) -> dict:
    """Time `steps` train_steps (after `warmup`) whose backbone is a learnable [batch, D] block: the trainer's
    build_parts and train_step, so the head's forward and backward and the sampled-row update are the trainer's
    own; one row. `head_params`: the head's other parameters ({"unpg": {"k": 1.5}}; GIF: {"v": 16, "joint":
    True}). `memory`: then one more step under the live-tensor tracker, its peak next to the plan's."""
    if warmup < 0 or steps < 1:
        raise ConfigError(f"bench head-step needs --warmup >= 0 and --steps >= 1, got {warmup} and {steps}")
    head_params = head_params or {}
    dev = pick_device(device)
    torch.manual_seed(TrainConfig.seed)
    parts = head_step_parts(head, num_classes, batch, embedding_size, optimizer, dev,
                            _build_params(head, num_classes, embedding_size, sample_rate, head_params))
    batches = _random_labels(batch, num_classes, dev)
    seconds = _timed_steps(parts, batches, warmup, steps)
    peak_gb = _peak_memory_gb(dev)  # the timed steps' own, before the tracked step and the plan's probe
    measured = _memory_row(parts, batches, head, num_classes, sample_rate, batch, embedding_size, optimizer,
                           head_params) if memory else {}
    return {
        "bench": "head-step", "head": head, "head_params": head_params, "num_classes": num_classes,
        "sample_rate": _sample_rate(parts.head), "batch": batch, "embedding_size": embedding_size,
        "optimizer": optimizer, "steps": steps,
        "ms_per_step": round(1000 * seconds / steps, 2),
        "peak_memory_gb": round(peak_gb, 3),
        "peak_memory_kind": "cuda max_memory_allocated" if dev.type == "cuda" else "process max RSS",
        **measured,
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
    }
