"""Batch plan (seeded, resumable, rank-aware), loaders from RAM and from workers, and model-input scaling."""

import numpy as np
import pytest
import torch

from faceforge.data.loader import BatchPlan, TrainLoader, to_model_input
from faceforge.data.record_dataset import RecordDataset


def test_batch_plan_is_seeded_resumable_and_splits_ranks():
    plan = BatchPlan(100, 8, seed=3)
    assert len(plan) == 12
    first = plan.batches(0)
    assert first == BatchPlan(100, 8, seed=3).batches(0)
    assert first != plan.batches(1)
    assert plan.batches(0, start=5) == first[5:]
    ranks = [BatchPlan(100, 8, seed=3, rank=r, world_size=2).batches(0) for r in range(2)]
    assert len(ranks[0]) == 6
    seen = [i for r in ranks for b in r for i in b]
    assert len(seen) == len(set(seen)) == 96
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        BatchPlan(10, 8, seed=0, world_size=2)


def test_memory_and_worker_loaders_agree(tiny_data):
    ds = RecordDataset(tiny_data)
    plan = BatchPlan(len(ds), 8, seed=1)
    ram = list(TrainLoader(ds, plan, in_memory=True, progress=False).epoch(0))
    workers = list(TrainLoader(ds, plan, num_workers=2).epoch(0))
    assert len(ram) == len(workers) == len(plan)
    for (a, la, _), (b, lb, _) in zip(ram, workers):
        assert torch.equal(a, b) and torch.equal(la, lb)
        assert a.shape == (8, 112, 112, 3) and a.dtype == torch.uint8


def test_model_input_range_and_flip():
    rows = 8
    images = torch.from_numpy(np.arange(rows * 112 * 112 * 3, dtype=np.int64).reshape(rows, 112, 112, 3) % 251)
    images = images.to(torch.uint8)
    x = to_model_input(images, torch.device("cpu"), flip=False)
    assert x.shape == (rows, 3, 112, 112) and x.min() >= -1 and x.max() <= 1
    assert x[0, 0, 0, 0].item() == pytest.approx(images[0, 0, 0, 0].item() / 127.5 - 1)
    flipped = to_model_input(images, torch.device("cpu"), flip=True, generator=torch.Generator().manual_seed(0))
    mask = torch.rand(rows, generator=torch.Generator().manual_seed(0)) < 0.5  # the draws to_model_input makes
    assert 0 < int(mask.sum()) < rows, "the seed must give both flipped and kept rows"
    for i in range(rows):
        assert not torch.equal(x[i], x[i].flip(2))  # a mirror is visible in every row
        assert torch.equal(flipped[i], x[i].flip(2) if mask[i] else x[i]), f"row {i}: flip mask says {bool(mask[i])}"
