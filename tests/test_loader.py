"""Batch plan (seeded, resumable, rank-aware), loaders from RAM and from workers, and model-input scaling."""

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch

from faceforge.config import load_config
from faceforge.data.loader import BatchPlan, TrainLoader, to_model_input
from faceforge.data.record_dataset import RecordDataset
from faceforge.heads import split_wrappers
from faceforge.registry import BACKBONES, HEADS, REGULARIZERS

import faceforge.backbones  # noqa: F401  (registers the backbones)
import faceforge.heads  # noqa: F401
import faceforge.regularizers  # noqa: F401

REPO = Path(__file__).resolve().parents[1]


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
    images = torch.from_numpy(np.arange(2 * 112 * 112 * 3, dtype=np.int64).reshape(2, 112, 112, 3) % 256).to(torch.uint8)
    x = to_model_input(images, torch.device("cpu"), flip=False)
    assert x.shape == (2, 3, 112, 112) and x.min() >= -1 and x.max() <= 1
    assert x[0, 0, 0, 0].item() == pytest.approx(images[0, 0, 0, 0].item() / 127.5 - 1)
    flipped = to_model_input(images, torch.device("cpu"), flip=True, generator=torch.Generator().manual_seed(0))
    for i in range(2):
        assert torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(2))


@pytest.mark.parametrize("path", sorted((REPO / "src/faceforge/configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    cfg = load_config(path)
    tables = [(BACKBONES, cfg.backbone), (HEADS, cfg.head)] + [(REGULARIZERS, r) for r in cfg.regularizers]
    for registry, table in tables:
        params = {k: v for k, v in table.items() if k != "name"}
        if registry is HEADS:
            params, _ = split_wrappers(params)  # checks the wrapper tables (head.unpg) as build_head does
        inspect.signature(registry.get(table["name"])).bind_partial(**params)
