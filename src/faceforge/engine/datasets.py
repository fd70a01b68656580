"""Resolve the configured training and validation data: a .rec folder, or the embedded SynthFace set."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from faceforge.config import Config, SynthFaceConfig
from faceforge.data.folder import ImageFolderDataset
from faceforge.data.record_dataset import RecordDataset
from faceforge.errors import ConfigError


def synthface_dir(cfg: SynthFaceConfig) -> Path:
    """The cache folder of one SynthFace parameter set (its name encodes every parameter)."""
    tag = "-".join(f"{f.name}{getattr(cfg, f.name)}" for f in dataclasses.fields(cfg) if f.name != "cache_dir")
    return Path(cfg.cache_dir) / tag


def ensure_synthface(
    cfg: SynthFaceConfig, progress: bool = True, out_dir: Path | None = None, workers: int | None = None
) -> Path:
    """Generate the SynthFace set once, into `out_dir` or its cache folder; later calls reuse it."""
    from faceforge.data.synthface import generate

    out = out_dir or synthface_dir(cfg)
    generate(
        out,
        identities=cfg.identities,
        images_per_id=cfg.images_per_id,
        eval_identities=cfg.eval_identities,
        eval_images_per_id=cfg.eval_images_per_id,
        pairs=cfg.pairs,
        seed=cfg.seed,
        nuisance=cfg.nuisance,
        workers=workers or min(os.cpu_count() or 1, 8),
        progress=progress,
    )
    return out


def open_training_set(cfg: Config) -> tuple[RecordDataset | ImageFolderDataset, Path]:
    """The training set and its folder: a packed train.rec/.idx set, else one sub-folder of images per identity."""
    if cfg.data.root == "synthface":
        root = ensure_synthface(cfg.synthface, cfg.train.progress_bar) / "train"
    else:
        root = Path(cfg.data.root)
        if not root.is_dir():
            raise ConfigError(f"data.root={cfg.data.root!r} is not a folder")
    kind = RecordDataset if (root / "train.rec").exists() or (root / "train.idx").exists() else ImageFolderDataset
    return kind(root, resize=cfg.data.resize, on_corrupt=cfg.data.on_corrupt), root


def validation_bins(cfg: Config, train_root: Path) -> list[Path]:
    """data.val_bins, or SynthFace's held-out pairs when training on SynthFace with none given."""
    if cfg.data.val_bins:
        paths = [Path(p) for p in cfg.data.val_bins]
    elif cfg.data.root == "synthface":
        paths = [train_root.parent / "heldout.bin"]
    else:
        paths = []
    for p in paths:
        if not p.is_file():
            raise ConfigError(f"data.val_bins: {p} not found")
    return paths
