"""`faceforge eval`: load a backbone from a run folder or weights file and score it on verification .bin sets."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from faceforge.backbones import build_backbone
from faceforge.config import load_config
from faceforge.errors import ConfigError
from faceforge.eval.verification import VerificationSet
from faceforge.runtime import pick_device
from faceforge.fileio import load_into, load_weights, resolve_weights, split_state


def _run_config(weights: Path) -> Path | None:
    """config.yaml of the run a weights file belongs to (run/ or run/checkpoints/x.safetensors)."""
    for folder in (weights.parent, weights.parent.parent):
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
    return None


def load_backbone(weights: str | Path, backbone: str | None = None) -> nn.Module:
    """A backbone with trained weights; its architecture comes from the run's config.yaml or from `backbone`."""
    path = resolve_weights(weights)
    state = load_weights(path)
    params = split_state(state, "backbone") or state
    if backbone:
        cfg_backbone: dict = {"name": backbone}
        width = params.get("features.weight")
        if width is not None:
            cfg_backbone["embedding_size"] = width.shape[0]
    else:
        cfg_path = _run_config(path)
        if cfg_path is None:
            raise ConfigError(f"{path} has no run folder with config.yaml; say which backbone with --backbone")
        cfg_backbone = load_config(cfg_path).backbone
    model = build_backbone(**cfg_backbone)
    load_into(model, params, str(path))
    return model


def evaluate_weights(
    weights: str | Path,
    bins: list[str],
    backbone: str | None = None,
    batch_size: int = 256,
    device: str = "auto",
    flip: bool = True,
) -> list[dict]:
    """One row of verification metrics per .bin set."""
    dev = pick_device(device)
    model = load_backbone(weights, backbone).to(dev)
    rows = []
    for path in bins:
        vs = VerificationSet.load(path)
        metrics, _ = vs.evaluate(model, device=dev, batch_size=batch_size, flip=flip)
        rows.append({"set": vs.name, "pairs": vs.num_pairs, **metrics})
    return rows


def format_table(rows: list[dict]) -> str:
    """A fixed-width table: accuracy ± std (10-fold), TAR at FAR 1e-3 / 1e-2, AUC, mean embedding norm."""
    lines = [f"{'set':<16}{'pairs':>7}{'accuracy':>18}{'TAR@1e-3':>10}{'TAR@1e-2':>10}{'AUC':>8}{'XNorm':>8}"]
    for r in rows:
        acc = f"{r['accuracy']:.4f} ± {r['accuracy_std']:.4f}"
        lines.append(
            f"{r['set']:<16}{r['pairs']:>7}{acc:>18}{r['tar_at_far'][1e-3]:>10.4f}{r['tar_at_far'][1e-2]:>10.4f}"
            f"{r['auc']:>8.4f}{r['xnorm']:>8.2f}"
        )
    return "\n".join(lines)
