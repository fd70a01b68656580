"""`faceforge bench train`: images/s of the real training step, on device-resident synthetic batches or a .rec."""

from __future__ import annotations

import platform
import resource
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from faceforge.config import config_from_dict
from faceforge.data.loader import BatchPlan, TrainLoader, prefetch_to_device, to_model_input
from faceforge.data.record_dataset import RecordDataset
from faceforge.engine.step import build_parts, optimisation_step
from faceforge.runtime import pick_device


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_train(
    backbone: str = "r50",
    head: str = "arcface",
    num_classes: int = 93431,
    batch: int = 128,
    dtype: str = "auto",
    compile: bool = False,
    device: str = "auto",
    embedding_size: int = 512,
    warmup: int = 10,
    steps: int = 40,
    data: str | None = None,
    workers: int = 8,
) -> dict:
    """Time `steps` optimisation steps after `warmup` ones (device synchronised at both ends); one result row."""
    dev = pick_device(device)
    cfg = config_from_dict({
        "backbone": {"name": backbone, "embedding_size": embedding_size},
        "head": {"name": head},
        "train": {"precision": dtype, "batch_size": batch, "device": str(dev)},
    })
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    parts = build_parts(cfg, num_classes, dev)
    if compile:
        parts.model = torch.compile(parts.model)
    batches = (
        _from_records(Path(data), batch, dev, parts.channels_last, workers)
        if data
        else _synthetic(batch, num_classes, dev, parts.channels_last)
    )
    for _ in range(warmup):
        optimisation_step(parts, *next(batches))
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    start = time.perf_counter()
    for _ in range(steps):
        optimisation_step(parts, *next(batches))
    _sync(dev)
    seconds = time.perf_counter() - start
    peak_gb = (
        torch.cuda.max_memory_allocated(dev) / 2**30
        if dev.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
    )
    return {
        "bench": "train",
        "backbone": backbone,
        "head": head,
        "num_classes": num_classes,
        "batch": batch,
        "precision": dtype,
        "amp_dtype": str(parts.amp_dtype).replace("torch.", "") if parts.amp_dtype else "fp32",
        "channels_last": parts.channels_last,
        "compile": compile,
        "data": data or "synthetic-on-device",
        "steps": steps,
        "img_s": round(batch * steps / seconds, 1),
        "ms_step": round(1000 * seconds / steps, 2),
        "peak_memory_gb": round(peak_gb, 2),
        "peak_memory_kind": "cuda max_memory_allocated" if dev.type == "cuda" else "process max RSS",
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
    }
