"""Shared fixtures: a tiny learnable .rec training set and .bin pair set, built once per test session."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from faceforge.config import config_from_dict
from faceforge.data.binsets import write_bin
from faceforge.data.images import encode_jpeg
from faceforge.data.recordio import write_insightface_set

CLASSES, PER_CLASS = 8, 6

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # one thread per xdist worker: two workers on two cores, no oversubscription


def pytest_configure(config):
    """Register the `cuda` marker: tests that need a GPU, skipped without one (`pytest -m cuda` runs only them)."""
    config.addinivalue_line("markers", "cuda: needs a CUDA device; skipped without one (run with `pytest -m cuda`)")


def _image(rng: np.random.Generator, colour: np.ndarray) -> bytes:
    """A noisy image whose mean colour depends on the class: something a tiny net can learn in a few steps."""
    noise = rng.normal(0, 25, (112, 112, 3))
    return encode_jpeg(np.clip(colour + noise, 0, 255).astype(np.uint8), quality=90)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny_data")
    rng = np.random.default_rng(0)
    colours = rng.uniform(40, 215, (CLASSES, 3))
    write_insightface_set(root, [(_image(rng, colours[c]), c) for c in range(CLASSES) for _ in range(PER_CLASS)], CLASSES)
    images, issame = [], []
    for i in range(20):
        a = i % CLASSES
        b = a if i % 2 == 0 else (a + 1) % CLASSES
        images += [_image(rng, colours[a]), _image(rng, colours[b])]
        issame.append(a == b)
    write_bin(root / "val.bin", images, issame)
    return root


@pytest.fixture
def tiny_config(tiny_data, tmp_path):
    """A Config that trains the tiny backbone for a few steps on tiny_data, writing under tmp_path."""

    def make(**sections):
        raw = {
            "backbone": {"name": "tiny", "embedding_size": 16, "stem": 8, "widths": [8, 16, 16]},
            "head": {"name": "arcface", "s": 16.0, "m": 0.2},
            "data": {"root": str(tiny_data), "val_bins": [str(tiny_data / "val.bin")], "num_workers": 0},
            "optim": {"lr": 0.05},
            "train": {"batch_size": 8, "max_steps": 6, "log_every": 1, "progress_bar": False,
                      "out_dir": str(tmp_path / "runs"), "run_name": "run"},
        }
        for section, values in sections.items():
            if isinstance(raw.get(section), dict) and isinstance(values, dict):
                raw[section] = {**raw[section], **values}
            else:
                raw[section] = values
        return config_from_dict(raw)

    return make
