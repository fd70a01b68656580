"""The optimisation step (backbone -> head + regularizers -> backward -> optimizer), shared by trainer and benchmark."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from faceforge.backbones import build_backbone
from faceforge.config import Config
from faceforge.engine.optim import build_optimizer
from faceforge.heads import Head, build_head
from faceforge.registry import REGULARIZERS
from faceforge.runtime import autocast_dtype


@dataclass
class StepParts:
    """Everything one step touches; built once from a Config."""

    backbone: nn.Module
    head: Head
    regularizers: nn.ModuleList
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    grad_clip: float


def build_parts(cfg: Config, num_classes: int, device: torch.device) -> StepParts:
    """Backbone, head, regularizers, optimizer and grad scaler on `device`, as the config asks."""
    t = cfg.train
    amp_dtype = autocast_dtype(t.precision, device)
    channels_last = t.channels_last == "true" or (t.channels_last == "auto" and device.type == "cuda")
    backbone = build_backbone(**cfg.backbone).to(device)
    if channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    head_params = {k: v for k, v in cfg.head.items() if k not in ("name", "num_classes")}
    head = build_head(cfg.head["name"], backbone.embedding_size, num_classes, **head_params).to(device)
    regularizers = nn.ModuleList(
        REGULARIZERS.build(r["name"], **{k: v for k, v in r.items() if k != "name"}) for r in cfg.regularizers
    ).to(device)
    for reg in regularizers:
        reg.bind(head)
    return StepParts(
        backbone=backbone,
        head=head,
        regularizers=regularizers,
        optimizer=build_optimizer(cfg.optim, backbone, head),
        scaler=torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
        device=device,
        amp_dtype=amp_dtype,
        channels_last=channels_last,
        grad_clip=cfg.optim.grad_clip,
    )


def optimisation_step(parts: StepParts, x: torch.Tensor, y: torch.Tensor) -> dict[str, float] | None:
    """Forward (backbone under autocast, head and losses in fp32), backward, clip, update.

    Returns the step's metrics, or None when the loss was not finite (the weights are then left untouched).
    Loss = mean(sample_weights * per_sample_loss) + sum of regularizer losses.
    """
    p = parts
    p.backbone.train()
    p.head.train()
    inputs = x
    for reg in p.regularizers:
        inputs = reg.perturb(inputs, y)
    with torch.autocast(p.device.type, dtype=p.amp_dtype or torch.float32, enabled=p.amp_dtype is not None):
        embeddings = p.backbone(inputs)
    out = p.head(embeddings.float(), y)
    metrics, weights, reg_loss = dict(out.metrics), None, 0.0
    batch = {"images": x, "inputs": inputs, "labels": y}
    for reg in p.regularizers:
        r = reg(batch, embeddings, out)
        reg_loss = reg_loss + r.loss
        metrics.update(r.metrics)
        if r.sample_weights is not None:
            weights = r.sample_weights if weights is None else weights * r.sample_weights
    head_loss = out.loss if weights is None else (weights * out.per_sample_loss).mean()
    loss = head_loss + reg_loss

    p.optimizer.zero_grad(set_to_none=True)
    loss_value = loss.item()
    if not math.isfinite(loss_value):
        return None
    p.scaler.scale(loss).backward()
    if p.grad_clip > 0:
        p.scaler.unscale_(p.optimizer)
        torch.nn.utils.clip_grad_norm_(p.backbone.parameters(), p.grad_clip)
    p.scaler.step(p.optimizer)
    p.scaler.update()
    return {"loss": loss_value, **metrics}
