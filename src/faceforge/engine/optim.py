"""Optimizers with weight-decay groups, and learning-rate schedules as functions of training progress."""

from __future__ import annotations

import math

import torch
from torch import nn

from faceforge.config import OptimConfig, ScheduleConfig


def param_groups(backbone: nn.Module, head: nn.Module, weight_decay: float) -> list[dict]:
    """Backbone and head parameters with weight decay; the head's `no_weight_decay()` names without."""
    skip = set(head.no_weight_decay()) if hasattr(head, "no_weight_decay") else set()
    decay = [p for p in backbone.parameters() if p.requires_grad]
    no_decay = []
    for name, p in head.named_parameters():
        if p.requires_grad:
            (no_decay if name in skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(cfg: OptimConfig, backbone: nn.Module, head: nn.Module) -> torch.optim.Optimizer:
    """SGD (momentum, optional Nesterov) or AdamW over backbone + head; fused kernels on CUDA unless `cfg.fused`
    says otherwise."""
    groups = param_groups(backbone, head, cfg.weight_decay)
    fused = next(backbone.parameters()).is_cuda if cfg.fused is None else cfg.fused
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, fused=fused or None)
    sgd = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, fused=fused or None)
    if fused and cfg.momentum > 0:
        # A fused step skipped on the device (found_inf) before any real one leaves an uninitialised momentum
        # buffer behind; zeros are exact instead: with no dampening, 0·momentum + grad is the first step's buffer.
        for group in sgd.param_groups:
            for p in group["params"]:
                sgd.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return sgd


def lr_factor(cfg: ScheduleConfig, progress: float, base_lr: float) -> float:
    """Multiplier of the base lr at `progress` in [0, 1]: linear warm-up, then polynomial or cosine decay."""
    progress = min(max(progress, 0.0), 1.0)
    if cfg.warmup > 0 and progress < cfg.warmup:
        return progress / cfg.warmup
    rest = (progress - cfg.warmup) / max(1.0 - cfg.warmup, 1e-12)
    floor = cfg.min_lr / base_lr if base_lr > 0 else 0.0
    if cfg.name == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * rest))
    else:
        shape = (1.0 - rest) ** cfg.power
    return floor + (1.0 - floor) * shape


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
