"""`faceforge demo`: SynthFace, two baselines, a short ArcFace training run and its held-out accuracy."""

from __future__ import annotations

import json
import time
from importlib import resources

import torch

from faceforge.backbones import build_backbone
from faceforge.config import Config, load_config
from faceforge.engine.datasets import ensure_synthface
from faceforge.engine.trainer import Trainer
from faceforge.errors import ConfigError


def demo_config(overrides: list[str] | None = None) -> Config:
    """The packaged demo recipe with the user's overrides applied."""
    with resources.as_file(resources.files("faceforge") / "configs" / "demo.yaml") as path:
        return load_config(path, overrides or [])


def run_demo(overrides: list[str] | None = None) -> dict:
    """Print the results table, then one JSON line (the last output line) that scripts can read."""
    cfg = demo_config(overrides)
    started = time.perf_counter()
    data_dir = ensure_synthface(cfg.synthface, cfg.train.progress_bar)
    print(f"SynthFace ready in {data_dir} ({time.perf_counter() - started:.1f} s)")
    trainer = Trainer(cfg)  # decodes heldout.bin once: the baselines below reuse its validation set
    heldout = next((vs for vs in trainer.val_sets if vs.name == "heldout"), None)
    if heldout is None:
        raise ConfigError("the demo scores SynthFace's heldout.bin: keep it in data.val_bins (or leave them empty)")
    pixel, pixel_roc = heldout.evaluate_pixels()
    with torch.random.fork_rng():  # the baseline's initialisation must not move the training run's RNG
        torch.manual_seed(cfg.train.seed)
        random_init, random_roc = heldout.evaluate(build_backbone(**cfg.backbone))
    trainer.log.add_roc("raw-pixel cosine", pixel_roc)
    trainer.log.add_roc("random-init network", random_roc)
    summary = trainer.fit()
    trained = summary["eval"][heldout.name]
    rows = [
        ("raw-pixel cosine", pixel),
        ("random-init network", random_init),
        (f"trained {summary['train_seconds']:.0f} s", trained),
    ]
    print(f"\nHeld-out SynthFace verification ({heldout.num_pairs} pairs, 10-fold, identities unseen in training)")
    print(f"{'model':<24}{'accuracy':>16}{'TAR@FAR=1e-3':>14}{'TAR@FAR=1e-2':>14}{'AUC':>8}")
    for name, m in rows:
        acc = f"{m['accuracy']:.4f} ± {m['accuracy_std']:.4f}"
        print(f"{name:<24}{acc:>16}{m['tar_at_far'][1e-3]:>14.4f}{m['tar_at_far'][1e-2]:>14.4f}{m['auc']:>8.4f}")
    print(f"run folder: {summary['run_dir']} (report.md, curves.png, roc.png, checkpoints/)")
    result = {
        "heldout_accuracy": round(trained["accuracy"], 4),
        "heldout_tar_at_far_1e-3": round(trained["tar_at_far"][1e-3], 4),
        "pixel_baseline_accuracy": round(pixel["accuracy"], 4),
        "random_init_accuracy": round(random_init["accuracy"], 4),
        "train_seconds": summary["train_seconds"],
        "steps": summary["steps"],
        "run_dir": summary["run_dir"],
    }
    print(json.dumps(result))
    return result
