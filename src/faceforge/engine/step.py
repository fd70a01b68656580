"""The optimisation step (backbone -> head + regularizers -> backward -> optimizer), shared by trainer and benchmark."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from faceforge.backbones import build_backbone
from faceforge.backbones.base import check_backbone
from faceforge.config import Config
from faceforge import distributed
from faceforge.distributed import all_gather_nograd, all_gather_with_grad
from faceforge.engine.optim import build_optimizer
from faceforge.engine.parallel import (
    Parallel, class_shard, sampled_blocks_over_ranks, sum_replicated_head_grads, wrap_backbone,
)
from faceforge.engine.sampled_rows import update_sampled_rows
from faceforge.heads import Head, build_head
from faceforge.registry import HEADS, REGULARIZERS
from faceforge.runtime import at_least_fp32, autocast_dtype, to_host


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
    backbone is DDP-wrapped (gradients sent in the autocast dtype) and a head with class centres holds this rank's
    shard of them. `train.compile` compiles what the step calls; checkpoints and evaluation use the plain module."""
    par = par or Parallel()
    t = cfg.train
    amp_dtype = autocast_dtype(t.precision, device)
    channels_last = t.channels_last is True or (t.channels_last == "auto" and device.type == "cuda")
    backbone = check_backbone(build_backbone(**cfg.backbone), cfg.backbone["name"]).to(device)
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
    model = wrap_backbone(backbone, par, t.ddp_bucket_mb, t.ddp_static_graph, amp_dtype)
    if t.compile:
        model = torch.compile(model)
    return StepParts(
        backbone=backbone,
        model=model,
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


def _nonfinite(loss: torch.Tensor, grad_norm: torch.Tensor | None, par: Parallel) -> torch.Tensor:
    """0-dim bool on the device: the loss (or the clipped gradient norm) is not finite on some rank, so every
    rank skips this step together. One device-side collective, no host read."""
    bad = ~torch.isfinite(loss.detach())
    if grad_norm is not None:
        bad = bad | ~torch.isfinite(grad_norm)
    if par.active:
        bad = distributed.all_reduce_scalars(bad, dist.ReduceOp.MAX, par.group, par.device)[0] > 0
    return bad.to(loss.device)


def _guarded_step(p: StepParts, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> tuple[torch.Tensor, bool | None]:
    """optimizer.step() unless the step must be skipped; returns whether it was, as a 0-dim device bool, and as a
    host bool where the step had to read it anyway (None: known on the device only).

    fp16: the GradScaler skips on overflowing gradients (a non-finite loss gives non-finite gradients; DDP's
    all-reduce spreads them to every rank), and that skip is counted too. Otherwise a fused optimizer takes the
    flag as `found_inf` and skips on the device; any other optimizer needs the flag on the host (one sync).
    """
    opt = p.optimizer
    if p.scaler.is_enabled():
        found = sum(p.scaler._found_inf_per_device(opt).values())  # filled by unscale_ in train_step
        p.scaler.step(opt)
        return found > 0, None
    bad = _nonfinite(loss, grad_norm, p.par)
    if getattr(opt, "_step_supports_amp_scaling", False):
        opt.grad_scale, opt.found_inf = None, bad.float()
        try:
            opt.step()
        finally:
            del opt.grad_scale, opt.found_inf
        return bad, None
    on_host = bool(bad)
    if not on_host:
        opt.step()
    return bad, on_host


def _step_with_sampled_rows(p: StepParts, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> torch.Tensor:
    """The guarded step of every parameter with a gradient; then, skipped with it, the update of the class rows a
    sampling head used (its class parameters got no gradient, so the optimizer left them alone); a replicated
    head's rows are those of every rank, their gradients summed."""
    blocks = sampled_blocks_over_ranks(p.head, p.par)
    skipped, on_host = _guarded_step(p, loss, grad_norm)
    if blocks:
        # fp16: the scaler's unscale_ saw only the optimizer's parameters; the rows' gradient is still scaled.
        inv_scale = p.scaler._scale.double().reciprocal().float() if p.scaler.is_enabled() else None
        update_sampled_rows(p.optimizer, dict(p.head.named_parameters()), blocks,
                            skipped if on_host is None else on_host, inv_scale)
    return skipped


@dataclass
class StepResult:
    """One step's loss, metrics and whether its update was skipped, still on the device: `read()` brings them
    to the host in one transfer, which the trainer does only on the steps it logs."""

    loss: torch.Tensor
    skipped: torch.Tensor
    metrics: dict[str, float | torch.Tensor]

    def read(self) -> dict[str, float] | None:
        """{'loss': ..., **metrics} as floats, or None when the step was skipped."""
        lazy = [k for k, v in self.metrics.items() if torch.is_tensor(v)]
        loss, skipped, *values = to_host([self.loss, self.skipped, *(self.metrics[k] for k in lazy)])
        if skipped:
            return None
        return {"loss": loss, **self.metrics, **dict(zip(lazy, values))}


def _objective(p: StepParts, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Forward (backbone under autocast, head and losses in fp32): (loss, what to differentiate, metrics).

    Loss = mean(sample_weights * per_sample_loss) + sum of regularizer losses; with K processes the head term is
    over the global batch and each regularizer term is the mean over ranks (see engine/parallel.py).
    """
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
    return loss, objective, metrics


def train_step(p: StepParts, x: torch.Tensor, y: torch.Tensor) -> StepResult:
    """Forward, backward, clip, update, with no host synchronisation of its own (ArcFace, CosFace, softmax with a
    fused optimizer): a step whose loss is not finite on some rank leaves the weights untouched on every rank."""
    p.backbone.train()
    p.head.train()
    loss, objective, metrics = _objective(p, x, y)
    p.optimizer.zero_grad(set_to_none=True)
    p.scaler.scale(objective).backward()
    sum_replicated_head_grads(p.head, p.par)
    grad_norm = None
    if p.grad_clip > 0 or p.scaler.is_enabled():
        p.scaler.unscale_(p.optimizer)
    if p.grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(p.backbone.parameters(), p.grad_clip)
    skipped = _step_with_sampled_rows(p, loss, grad_norm)
    p.scaler.update()
    return StepResult(loss.detach().float(), skipped, metrics)


def optimisation_step(parts: StepParts, x: torch.Tensor, y: torch.Tensor) -> dict[str, float] | None:
    """train_step, read at once: the step's metrics, or None when its loss was not finite and it was skipped."""
    return train_step(parts, x, y).read()
