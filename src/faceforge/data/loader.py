"""Training batches: a seeded batch plan (resumable mid-epoch, rank-aware), worker loading and device-side augmentation."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from faceforge.data.images import to_unit_range
from faceforge.errors import FaceforgeError


class ImageDataset(Protocol):
    """What the loader needs of a dataset: RecordDataset and ImageFolderDataset provide it."""

    def __len__(self) -> int: ...

    def read(self, index: int) -> tuple[np.ndarray, int] | None: ...


class BatchPlan:
    """Index batches of one epoch: a permutation seeded by (seed, epoch), sliced for this rank, last batch dropped."""

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if size < batch_size * world_size:
            raise ValueError(f"{size} images cannot fill one global batch of {batch_size} x {world_size}")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return self.size // (self.batch_size * self.world_size)

    def batches(self, epoch: int, start: int = 0) -> list[list[int]]:
        """This rank's batches of `epoch`, beginning at batch `start` (to resume inside an epoch)."""
        # One permutation per (seed, epoch), from its own generator: a resumed run sees the same order, whatever
        # else drew from the global RNG. 100_003 (a prime) keeps seed s, epoch e apart from seed s+1, epoch e-100_003.
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        per_step = self.batch_size * self.world_size
        out = []
        for b in range(start, len(self)):
            chunk = order[b * per_step : (b + 1) * per_step]
            out.append(chunk[self.rank * self.batch_size : (self.rank + 1) * self.batch_size].tolist())
        return out


class _Reader:
    """Map-style wrapper so DataLoader workers fetch whole batches: indices -> (uint8 NHWC, int64 labels)."""

    def __init__(self, dataset: ImageDataset) -> None:
        self.dataset = dataset

    def __getitem__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, int] | FaceforgeError:
        """A batch, or the user error that stopped it (returned, so the parent re-raises it with its one-line message)."""
        try:
            return self._batch(indices)
        except FaceforgeError as exc:
            return exc

    def _batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        images, labels, skipped = [], [], 0
        for i in indices:
            item = self.dataset.read(i)
            if item is None:
                skipped += 1
                continue
            images.append(torch.from_numpy(np.ascontiguousarray(item[0])))
            labels.append(item[1])
        return torch.stack(images), torch.tensor(labels, dtype=torch.int64), skipped


def load_into_memory(dataset: ImageDataset, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode every image once into a uint8 [N, H, W, 3] tensor (for small sets trained on the CPU)."""
    first = dataset.read(0)
    if first is None:
        raise ValueError("the first record is unreadable; cannot size the in-memory buffer")
    images = torch.empty((len(dataset), *first[0].shape), dtype=torch.uint8)
    labels = torch.empty(len(dataset), dtype=torch.int64)
    for i in tqdm(range(len(dataset)), desc="decode", disable=not progress, leave=False):
        item = dataset.read(i)
        if item is None:
            raise ValueError(f"record {i} is unreadable; in-memory loading needs every record")
        images[i] = torch.from_numpy(item[0])
        labels[i] = item[1]
    return images, labels


def _leave_stop_signals_to_the_parent(worker_id: int) -> None:
    """Workers ignore SIGTERM and SIGINT: the training process stops at a step boundary on them and then ends its
    workers, and a signal sent to the whole process group (a cluster's preemption, Ctrl-C) must not kill them
    under it. A worker whose parent died still exits (DataLoader's watchdog)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class TrainLoader:
    """Yields (uint8 NHWC images, labels, skipped count) batches for an epoch, from RAM or from worker processes."""

    def __init__(
        self,
        dataset: ImageDataset,
        plan: BatchPlan,
        num_workers: int = 4,
        in_memory: bool = False,
        pin_memory: bool = False,
        progress: bool = True,
    ) -> None:
        self.dataset, self.plan = dataset, plan
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.memory = load_into_memory(dataset, progress) if in_memory else None

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        batches = self.plan.batches(epoch, start)
        if self.memory is not None:
            images, labels = self.memory
            for idx in batches:
                index = torch.tensor(idx)
                batch = images.new_empty((len(idx), *images.shape[1:]), pin_memory=self.pin_memory)
                # Gathered into page-locked memory (CUDA's host cache reuses it once its copy is done), so the
                # copy to the GPU overlaps the step.
                yield torch.index_select(images, 0, index, out=batch), labels[index], 0
            return
        loader = DataLoader(
            _Reader(self.dataset),
            sampler=batches,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=4 if self.num_workers > 0 else None,
            generator=torch.Generator().manual_seed(self.plan.seed),  # not the global RNG: resume replays its draws
            worker_init_fn=_leave_stop_signals_to_the_parent,
        )
        for batch in loader:
            if isinstance(batch, FaceforgeError):
                raise batch
            yield batch


Batch = tuple[torch.Tensor, torch.Tensor, int]


def prefetch_to_device(batches: Iterator[Batch], device: torch.device) -> Iterator[Batch]:
    """On CUDA, copy batch k+1 to the GPU on a side stream while batch k trains; elsewhere a pass-through."""
    if device.type != "cuda":
        yield from batches
        return
    side = torch.cuda.Stream(device)

    def stage(batch: Batch | None) -> Batch | None:
        if batch is None:
            return None
        images, labels, skipped = batch
        with torch.cuda.stream(side):
            return images.to(device, non_blocking=True), labels.to(device, non_blocking=True), skipped

    staged = stage(next(batches, None))
    while staged is not None:
        main = torch.cuda.current_stream(device)
        main.wait_stream(side)
        images, labels, skipped = staged
        images.record_stream(main)  # the caching allocator must not reuse this memory before `main` is done
        labels.record_stream(main)
        staged = stage(next(batches, None))
        yield images, labels, skipped


def to_model_input(
    images: torch.Tensor,
    device: torch.device,
    flip: bool,
    generator: torch.Generator | None = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """uint8 NHWC on any device -> float NCHW in [-1, 1] on `device`, randomly mirrored when `flip`.

    The mirror draws are made on `device` (with `generator`, which must live there), so no mask is copied over.
    """
    x = to_unit_range(images.to(device, non_blocking=True).permute(0, 3, 1, 2))
    if flip:
        mask = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return x.contiguous(memory_format=memory_format)
