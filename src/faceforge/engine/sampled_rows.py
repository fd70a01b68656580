"""The update of a sampled step's class rows: the optimizer's own rule (SGD with momentum, Nesterov and weight
decay; AdamW) applied to the S rows a sampling head used, in torch's own state format, so that nothing of the
[N, D] centres or of their optimizer state outside those rows is read, copied or written.

The head computed on a detached leaf block of the rows (heads/base.py CentreHead.step_centres), so the class
parameter got no gradient and the optimizer's own step skipped it; this module then reads the block's gradient,
gathers the rows' weights and state (index_select), updates them and writes them back (index_copy_).

Semantics are those of a whole-matrix optimizer step whose unsampled rows then get their weights and state back:
- SGD: `momentum_buffer` of a row never sampled is 0 (with no dampening 0·momentum + g is torch's first buffer);
- AdamW: `step` is one scalar per parameter, as torch keeps it, and it counts every step taken, sampled rows or
  not; a row's bias correction is 1 − β^step at that count, also for a row sampled for the first time late
  (its moments then hold one update but are corrected as if they held `step`): exactly what the whole-matrix
  step followed by the restore of the unsampled rows' `exp_avg` / `exp_avg_sq` did.
A skipped step leaves the rows, their state and `step` as they were. When the step knows it on the host
(`skipped` a bool: a non-fused optimizer read the flag anyway) nothing is done or written for it; a 0-dim device
bool (fused optimizers, fp16) is decided on the device (torch.where), with no host read.
"""

from __future__ import annotations

import torch

from faceforge.heads.centres import SampledBlock


def _group_of(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> dict:
    """The param group that holds `param` (its lr is the one the schedule set, its weight decay the head's)."""
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return group
    raise ValueError("a sampled class parameter is not in the optimizer")


def _write_rows(full: torch.Tensor, index: torch.Tensor, old: torch.Tensor, new: torch.Tensor,
                skipped: torch.Tensor | None) -> None:
    """full[index] = new, or (`skipped` on the device) the old rows again on a skipped step; None: not skipped.
    `new` is a scratch copy and is overwritten: the choice is made into it, so that no third [S, D] tensor is
    allocated."""
    full.index_copy_(0, index, new if skipped is None else torch.where(skipped, old, new, out=new))


def _sgd_rows(optimizer: torch.optim.SGD, param: torch.Tensor, sampled: SampledBlock, grad: torch.Tensor,
              skipped: torch.Tensor | None) -> None:
    """torch.optim.SGD's update (weight decay, momentum, Nesterov; no dampening) on the sampled rows.

    `grad` is the block's own gradient, spent after this step, so it is worked on in place (it becomes the
    update): on the CPU each fresh [S, D] tensor costs about a pass over it (its pages are faulted in), so this
    allocates only the gathered momentum rows, where the plain formula would allocate six."""
    group = _group_of(optimizer, param)
    if group["dampening"] != 0 or group["maximize"]:
        raise NotImplementedError("sampled class rows: SGD with dampening or maximize")
    rows = sampled.block.detach()  # the rows as the head read them: nothing has changed them since
    if group["weight_decay"] != 0:
        grad.add_(rows, alpha=group["weight_decay"])
    momentum = group["momentum"]
    if momentum != 0:
        state = optimizer.state[param]
        if state.get("momentum_buffer") is None:
            state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        full = state["momentum_buffer"]
        buf = full.index_select(0, sampled.index)
        if group["nesterov"]:
            new_buf = torch.add(grad, buf, alpha=momentum, out=buf if skipped is None else None)
            grad.add_(new_buf, alpha=momentum)
        else:
            new_buf = grad.add_(buf, alpha=momentum)  # the update itself
        _write_rows(full, sampled.index, buf, new_buf, skipped)
        # Written back, the momentum copy is scratch for the new rows (a step skipped on the device keeps the
        # old rows whatever is computed into it).
        scratch = buf if new_buf is grad else new_buf
    else:
        scratch = grad
    _write_rows(param.data, sampled.index, rows, torch.add(rows, grad, alpha=-group["lr"], out=scratch), skipped)


def _adamw_step(state: dict, param: torch.Tensor) -> torch.Tensor:
    """AdamW's per-parameter step count, on the parameter's device (a loaded checkpoint may hold it on the CPU)."""
    step = state.get("step")
    if step is None:
        step = torch.zeros((), dtype=torch.float32, device=param.device)
    state["step"] = step.to(param.device)
    return state["step"]


def _adamw_rows(optimizer: torch.optim.AdamW, param: torch.Tensor, sampled: SampledBlock, grad: torch.Tensor,
                skipped: torch.Tensor | None) -> None:
    """torch.optim.AdamW's update (decoupled weight decay, bias correction at the parameter's step count) on the
    sampled rows; see the module docstring for what `step` means for rows sampled at different times. The
    moments' new rows are computed into fresh copies and the update into `grad` (spent after this step)."""
    group = _group_of(optimizer, param)
    if group["amsgrad"] or group["maximize"]:
        raise NotImplementedError("sampled class rows: AdamW with amsgrad or maximize")
    beta1, beta2 = group["betas"]
    lr = group["lr"]
    state = optimizer.state[param]
    for key in ("exp_avg", "exp_avg_sq"):
        if key not in state:
            state[key] = torch.zeros_like(param, memory_format=torch.preserve_format)
    step = _adamw_step(state, param)
    rows = sampled.block.detach()
    avg, avg_sq = (state[k].index_select(0, sampled.index) for k in ("exp_avg", "exp_avg_sq"))
    keep_old = skipped is not None  # only a step skipped on the device needs the old moments again
    new_avg = torch.lerp(avg, grad, 1 - beta1, out=None if keep_old else avg)
    new_avg_sq = torch.mul(avg_sq, beta2, out=None if keep_old else avg_sq).addcmul_(grad, grad, value=1 - beta2)
    count = (step + 1).double()  # float64 as torch's host-side bias correction
    correction1 = (1 - beta1 ** count).to(rows.dtype)
    correction2_sqrt = (1 - beta2 ** count).sqrt().to(rows.dtype)
    update = torch.sqrt(new_avg_sq, out=grad).div_(correction2_sqrt).add_(group["eps"])  # the denominator
    update = torch.div(new_avg, update, out=update).mul_(lr / correction1)
    new_rows = update.neg_().add_(rows, alpha=1 - lr * group["weight_decay"])
    _write_rows(state["exp_avg"], sampled.index, avg, new_avg, skipped)
    _write_rows(state["exp_avg_sq"], sampled.index, avg_sq, new_avg_sq, skipped)
    _write_rows(param.data, sampled.index, rows, new_rows, skipped)
    step.add_(1 if skipped is None else (~skipped).to(step.dtype))


def update_sampled_rows(optimizer: torch.optim.Optimizer, params: dict[str, torch.Tensor],
                        blocks: dict[str, SampledBlock], skipped: torch.Tensor | bool,
                        inv_scale: torch.Tensor | None = None) -> None:
    """Apply the optimizer's update to each sampled block's rows of `params[name]` unless `skipped` (a host bool
    or a 0-dim device bool, see the module docstring).
    `inv_scale`: the GradScaler's 1/scale under fp16, whose unscale_ only sees the optimizer's
    parameters; a block whose unscaled gradient is not finite then skips the step too, as the scaler would."""
    for name, sampled in blocks.items():
        grad = sampled.block.grad
        sampled.block.grad = None  # the rows' gradient is spent here; the block is freed at the next sample
        if grad is None or skipped is True:  # the loss did not depend on the rows, or nothing is updated
            continue
        on_device = None if skipped is False else skipped
        if inv_scale is not None:
            grad = grad * inv_scale.to(grad.dtype)
            on_device = ~torch.isfinite(grad).all() if on_device is None else on_device | ~torch.isfinite(grad).all()
        param = params[name]
        if isinstance(optimizer, torch.optim.AdamW):
            _adamw_rows(optimizer, param, sampled, grad, on_device)
        elif isinstance(optimizer, torch.optim.SGD):
            _sgd_rows(optimizer, param, sampled, grad, on_device)
        else:
            raise NotImplementedError(f"sampled class rows under {type(optimizer).__name__}")
