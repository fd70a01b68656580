"""The optimisation step (backbone -> head + regularizers -> backward -> optimizer), shared by trainer and benchmark."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

import faceforge.regularizers  # noqa: F401  (registers the built-in regularizers)
from faceforge.backbones import build_backbone
from faceforge.config import Config
from faceforge.distributed import all_gather_nograd, all_gather_with_grad
from faceforge.engine.optim import build_optimizer
from faceforge.engine.parallel import Parallel, class_shard, sum_replicated_head_grads, wrap_backbone
from faceforge.heads import Head, build_head
from faceforge.heads.base import at_least_fp32
from faceforge.registry import HEADS, REGULARIZERS
from faceforge.runtime import autocast_dtype


@dataclass
class StepParts:
    """Everything one step touches; built once from a Config."""

    backbone: nn.Module  # the plain module (checkpoints, evaluation)
    model: nn.Module  # what the step calls: the backbone, or its DDP wrapper under torchrun
    head: Head
    regularizers: nn.ModuleList
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    grad_clip: float
    par: Parallel

    @property
    def head_sees_global_batch(self) -> bool:
        """Class-sharded heads take the all-gathered batch; replicated ones (and a single process) the local one."""
        return self.par.active and self.head.shard.group is not None


def build_parts(cfg: Config, num_classes: int, device: torch.device, par: Parallel | None = None) -> StepParts:
    """Backbone, head, regularizers, optimizer and grad scaler on `device`, as the config asks; under torchrun the
    backbone is DDP-wrapped and a head with class centres holds this rank's shard of them."""
    par = par or Parallel()
    t = cfg.train
    amp_dtype = autocast_dtype(t.precision, device)
    channels_last = t.channels_last == "true" or (t.channels_last == "auto" and device.type == "cuda")
    backbone = build_backbone(**cfg.backbone).to(device)
    if channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    head_params = {k: v for k, v in cfg.head.items() if k not in ("name", "num_classes")}
    if par.active and HEADS.get(cfg.head["name"]).class_parameters:
        head_params["shard"] = class_shard(num_classes, par)
    head = build_head(cfg.head["name"], backbone.embedding_size, num_classes, **head_params).to(device)
    regularizers = nn.ModuleList(
        REGULARIZERS.build(r["name"], **{k: v for k, v in r.items() if k != "name"}) for r in cfg.regularizers
    ).to(device)
    for reg in regularizers:
        reg.bind(head)
    return StepParts(
        backbone=backbone,
        model=wrap_backbone(backbone, par),
        head=head,
        regularizers=regularizers,
        optimizer=build_optimizer(cfg.optim, backbone, head),
        scaler=torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
        device=device,
        amp_dtype=amp_dtype,
        channels_last=channels_last,
        grad_clip=cfg.optim.grad_clip,
        par=par,
    )


def _all_finite(value: float, par: Parallel) -> bool:
    """Whether the loss is finite on every rank: all skip a step together, or none does."""
    ok = torch.tensor(float(math.isfinite(value)))
    if par.active:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=par.group)
    return bool(ok.item())


def _step_leaving_unsampled_rows(parts: StepParts) -> None:
    """optimizer.step(), then class rows a sampling head did not use get back their weights and optimizer state."""
    rows = parts.head.sampled_class_rows()
    params = dict(parts.head.named_parameters())
    saved = []
    for name, used in rows.items():
        p = params[name]
        rest = torch.ones(p.shape[0], dtype=torch.bool, device=p.device)
        rest[used] = False
        state = parts.optimizer.state.get(p, {})
        old = {k: v[rest].clone() for k, v in state.items() if torch.is_tensor(v) and v.shape == p.shape}
        saved.append((p, rest, p.detach()[rest].clone(), old))
    parts.scaler.step(parts.optimizer)
    for p, rest, weights, old in saved:
        p.data[rest] = weights
        for k, v in parts.optimizer.state.get(p, {}).items():
            if torch.is_tensor(v) and v.shape == p.shape:
                v[rest] = old[k] if k in old else 0.0


def optimisation_step(parts: StepParts, x: torch.Tensor, y: torch.Tensor) -> dict[str, float] | None:
    """Forward (backbone under autocast, head and losses in fp32), backward, clip, update.

    Returns the step's metrics, or None when the loss was not finite (the weights are then left untouched).
    Loss = mean(sample_weights * per_sample_loss) + sum of regularizer losses; with K processes the head term is
    over the global batch and each regularizer term is the mean over ranks (see engine/parallel.py).
    """
    p = parts
    p.backbone.train()
    p.head.train()
    inputs = x
    for reg in p.regularizers:
        inputs = reg.perturb(inputs, y)
    with torch.autocast(p.device.type, dtype=p.amp_dtype or torch.float32, enabled=p.amp_dtype is not None):
        embeddings = p.model(inputs)
    gathered = p.head_sees_global_batch
    group = p.par.group
    head_in = at_least_fp32(embeddings)
    head_in = all_gather_with_grad(head_in, group) if gathered else head_in
    out = p.head(head_in, all_gather_nograd(y, group) if gathered else y)
    metrics, weights, reg_loss = dict(out.metrics), None, 0.0
    batch = {"images": x, "inputs": inputs, "labels": y}
    for reg in p.regularizers:
        r = reg(batch, embeddings, out)
        reg_loss = reg_loss + r.loss
        metrics.update(r.metrics)
        if r.sample_weights is not None:
            w = r.sample_weights
            if gathered and len(w) == len(y):
                w = all_gather_nograd(w, group)
            weights = w if weights is None else weights * w
    head_loss = out.loss if weights is None else (weights * out.per_sample_loss).mean()
    loss = head_loss + reg_loss
    # Gradients are summed over ranks: terms each rank computes on its own rows count 1/K.
    k = p.par.world_size
    objective = loss if k == 1 else (head_loss if gathered else head_loss / k) + reg_loss / k

    p.optimizer.zero_grad(set_to_none=True)
    loss_value = loss.item()
    if not _all_finite(loss_value, p.par):
        return None
    p.scaler.scale(objective).backward()
    sum_replicated_head_grads(p.head, p.par)
    if p.grad_clip > 0:
        p.scaler.unscale_(p.optimizer)
        torch.nn.utils.clip_grad_norm_(p.backbone.parameters(), p.grad_clip)
    _step_leaving_unsampled_rows(p)
    p.scaler.update()
    return {"loss": loss_value, **metrics}
