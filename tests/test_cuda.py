"""CUDA-only checks, run by benchmarks/gpu_check.sh as `pytest -m cuda` and skipped without a GPU: reduced precision
agrees with fp32 for every head, the prefetching copy delivers the plain path's batches, a compiled step equals the
eager one, fused AdamW resumes, a one-process torchrun with NCCL trains, checkpoints and resumes, and the
fused head losses give the CPU's values and gradients.

Sizes are small (tiny backbone, 32 classes, batch 32) so the whole file runs in well under two minutes."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml

from faceforge.config import config_from_dict
from faceforge.data.loader import BatchPlan, TrainLoader, prefetch_to_device
from faceforge.data.record_dataset import RecordDataset
from faceforge.engine.step import StepParts, build_parts, optimisation_step
from faceforge.tokenizer.codebook import Codebook, save_codes

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEVICE = "cuda"
CLASSES, BATCH, EMBEDDING = 32, 32, 16
TINY = {"name": "tiny", "embedding_size": EMBEDDING, "stem": 8, "widths": [8, 16, 16]}
HEADS = {
    "arcface": ({"name": "arcface"}, []),
    "cosface": ({"name": "cosface"}, []),
    "sphereface2": ({"name": "sphereface2"}, []),
    "arcface+unpg": ({"name": "arcface", "unpg": {"k": 1.5}}, []),
    "gif": ({"name": "gif", "head_dim": 16}, []),  # codes: written per test (see _gif_codes)
    "arcface+topofr": ({"name": "arcface"}, [{"name": "topofr", "alpha": 0.1, "xi": 0.2}]),
}
# Relative tolerance of the one-step loss and gradient norm against fp32, per autocast dtype. The backbone runs in
# the reduced type, the head and losses in fp32, so the error starts as the backbone's rounding: a unit roundoff of
# 2^-8 = 3.9e-3 (bf16) or 2^-11 = 4.9e-4 (fp16) per operation, partly averaging out over the tiny net's layers.
# Measured with CPU autocast at these sizes: the smooth heads (ArcFace, CosFace, SphereFace2, GIF) within 1.7e-3
# (bf16) and 1.8e-4 (fp16) on both; UNPG and TopoFR up to 9e-3 (gradient, bf16) and 4.5e-3 (fp16) because a rounding
# can flip their discrete choices (the negatives the Tukey fence keeps, the persistence pairs). The bounds leave
# 3-10x for the GPU's other kernels; a head computed in the reduced type or a wrongly scaled gradient exceeds them.
TOLERANCE = {"bf16": {"loss": 1e-2, "grad": 3e-2}, "fp16": {"loss": 5e-3, "grad": 2e-2}}


@pytest.fixture
def no_tf32():
    """fp32 convolutions and matmuls in full fp32 (no TF32) for the duration of a test that compares fp32 runs."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _gif_codes(tmp_path) -> str:
    """Codes file for CLASSES identities: distinct 3-token codes over v = 4, random unit code vectors."""
    keys = torch.randperm(4**3, generator=torch.Generator().manual_seed(0))[:CLASSES]
    codes = torch.stack([keys // 16, keys // 4 % 4, keys % 4], dim=1)
    path = tmp_path / "codes.safetensors"
    save_codes(path, Codebook(codes, torch.randn(CLASSES, EMBEDDING, generator=torch.Generator().manual_seed(1)), 4))
    return str(path)


def _config(head_name: str, precision: str, tmp_path):
    head, regularizers = HEADS[head_name]
    if head["name"] == "gif":
        head = {**head, "codes": _gif_codes(tmp_path)}
    # grad_clip far above any norm here: the fp16 gradients are unscaled (clipping calls unscale_) but not clipped.
    return config_from_dict({
        "backbone": TINY, "head": head, "regularizers": regularizers, "optim": {"grad_clip": 1e9},
        "train": {"precision": precision, "device": DEVICE, "channels_last": True},
    })


def _batch(device: torch.device, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(BATCH, 3, 112, 112, generator=g) * 2 - 1).to(device)
    y = torch.randint(0, CLASSES, (BATCH,), generator=g).to(device)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format), y


def _grad_norm(parts: StepParts) -> float:
    """L2 norm of every backbone and head gradient, summed in float64."""
    grads = [p.grad.double().flatten() for m in (parts.backbone, parts.head) for p in m.parameters() if p.grad is not None]
    return float(torch.cat(grads).norm())


def _first_step(cfg) -> tuple[float, float]:
    """(loss, gradient norm) of the first step that the grad scaler does not skip, from the same seeded init.

    fp16's scaler starts at 2^16 and skips the steps whose scaled gradients overflow, halving its scale each time;
    a skipped step leaves the weights as they were, so the retried step sees the same weights, batch and (reseeded)
    random draws (TopoFR's perturbation and SDE signs)."""
    torch.manual_seed(0)
    parts = build_parts(cfg, CLASSES, torch.device(DEVICE))  # compiles the backbone under train.compile
    x, y = _batch(parts.device, parts.channels_last)
    for _ in range(24):
        torch.manual_seed(1)
        scale = parts.scaler.get_scale() if parts.scaler.is_enabled() else 1.0
        metrics = optimisation_step(parts, x, y)
        if parts.scaler.is_enabled() and parts.scaler.get_scale() < scale:
            continue  # skipped for overflowing gradients: the same weights again, at half the scale
        assert metrics is not None, "non-finite loss on the first step"
        return float(metrics["loss"]), _grad_norm(parts)
    raise AssertionError("the grad scaler skipped every step")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("head", list(HEADS))
def test_reduced_precision_step_agrees_with_fp32(head, precision, tmp_path, no_tf32):
    loss32, grad32 = _first_step(_config(head, "fp32", tmp_path))
    loss, grad = _first_step(_config(head, precision, tmp_path))
    tol = TOLERANCE[precision]
    assert math.isfinite(loss) and math.isfinite(grad)
    assert abs(loss - loss32) <= tol["loss"] * abs(loss32), (loss, loss32)
    assert abs(grad - grad32) <= tol["grad"] * grad32, (grad, grad32)


def test_prefetch_to_device_delivers_the_plain_batches(tiny_data):
    """The side-stream copy of pinned batches equals a plain copy, batch for batch, while the GPU is kept busy."""
    device = torch.device("cuda")
    dataset = RecordDataset(tiny_data)
    loader = TrainLoader(dataset, BatchPlan(len(dataset), 8, seed=0), num_workers=2, pin_memory=True, progress=False)
    plain = [(images.clone(), labels.clone(), skipped) for images, labels, skipped in loader.epoch(0)]
    busy = torch.randn(2048, 2048, device=device)
    fetched = []
    for images, labels, skipped in prefetch_to_device(loader.epoch(0), device):
        assert images.device.type == "cuda" and labels.device.type == "cuda"
        busy = (busy @ busy).tanh_()  # main-stream work queued before the batch is read
        fetched.append((images.cpu(), labels.cpu(), skipped))
    assert len(fetched) == len(plain) > 1
    for (a, la, sa), (b, lb, sb) in zip(plain, fetched):
        assert torch.equal(a, b) and torch.equal(la, lb) and sa == sb



def test_in_memory_batches_are_pinned_and_equal_the_records(tiny_data):
    """data.in_memory on CUDA gathers each batch into page-locked memory (so its copy overlaps the step); the
    batches are the records', in the plan's order."""
    dataset = RecordDataset(tiny_data)
    plan = BatchPlan(len(dataset), 8, seed=0)
    pinned = TrainLoader(dataset, plan, num_workers=0, in_memory=True, pin_memory=True, progress=False)
    plain = TrainLoader(dataset, plan, num_workers=0, progress=False)
    got = list(pinned.epoch(0))
    assert got and all(images.is_pinned() for images, _, _ in got)
    for (a, la, _), (b, lb, _) in zip(got, plain.epoch(0)):
        assert torch.equal(a, b) and torch.equal(la, lb)

def _adamw_run(tiny_config, name: str, cut: int | None):
    """Six fp32 AdamW steps on CUDA, uninterrupted or stopped after `cut` steps and resumed from the checkpoint."""
    from faceforge.engine.trainer import Trainer

    cfg = tiny_config(optim={"name": "adamw", "lr": 1e-3, "weight_decay": 0.05},
                      train={"device": "cuda", "precision": "fp32", "max_steps": 6, "run_name": name})
    trainer = Trainer(cfg)
    assert trainer.optimizer.defaults.get("fused"), "AdamW on CUDA should use the fused kernel"
    if cut is not None:
        trainer.fit(until_step=cut)
        trainer = Trainer.resume(trainer.log.dir)
        assert trainer.state.step == cut
    trainer.fit()
    return trainer


@pytest.fixture
def deterministic_cudnn():
    """cuDNN restricted to deterministic algorithms (chosen once per process and cached): runs repeat their sums."""
    saved = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    yield
    torch.backends.cudnn.deterministic = saved


def test_fused_adamw_resume_matches_uninterrupted(tiny_config, no_tf32, deterministic_cudnn):
    """Six fused AdamW steps, cut after three and resumed, against six in one go: same per-step losses (rtol 1e-5),
    weights within 1e-5 absolute (they move ~1e-3 a step, so a lost or misplaced optimizer state, e.g. the step
    count, shows everywhere), moments within 1e-3 relative, and the `step` tensors on the parameters' device.
    Entries whose gradient RMS is below 1e-6 are left out: there the gradient is rounding noise (fc.bias feeds a
    BatchNorm, which cancels it) and Adam turns noise into steps of +-lr."""
    full = _adamw_run(tiny_config, "full", None)
    resumed = _adamw_run(tiny_config, "cut", 3)
    losses = [_losses(t.log.dir) for t in (full, resumed)]
    assert [s for s, _ in losses[1]] == [s for s, _ in losses[0]] == list(range(1, 7))
    for (_, a), (_, b) in zip(*losses):
        assert abs(a - b) <= 1e-5 * abs(a), losses
    for p_full, p_resumed in zip(_params(full.optimizer), _params(resumed.optimizer)):
        saved, state = full.optimizer.state[p_full], resumed.optimizer.state[p_resumed]
        assert state["step"].device == p_resumed.device  # where fused AdamW reads it
        assert float(state["step"]) == float(saved["step"]) == 6
        signal = saved["exp_avg_sq"].sqrt() > 1e-6
        torch.testing.assert_close(p_resumed.detach()[signal], p_full.detach()[signal], rtol=1e-4, atol=1e-5)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(state[key][signal], saved[key][signal], rtol=1e-3, atol=1e-12)


def _losses(run_dir) -> list[tuple[int, float]]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in lines if "event" not in r]


def _params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _summary(run: subprocess.CompletedProcess) -> dict:
    """The JSON summary `faceforge train` prints last (NCCL_DEBUG lines may follow it)."""
    return json.loads([line for line in run.stdout.splitlines() if line.startswith("{")][-1])


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
               "-m", "faceforge", "train", *args]
    env = {**os.environ, "NCCL_DEBUG": "INFO"}
    return subprocess.run(command, capture_output=True, text=True, timeout=90, env=env)


def test_one_process_torchrun_with_nccl_trains_checkpoints_and_resumes(tiny_config, tmp_path):
    cfg = tiny_config(data={"val_bins": []}, train={"device": "cuda", "max_steps": 5, "run_name": "torchrun"})
    path = tmp_path / "torchrun.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    first = _torchrun(str(path))
    assert first.returncode == 0, first.stderr[-3000:]
    summary = _summary(first)
    assert summary["steps"] == 5
    again = _torchrun("--resume", summary["run_dir"], "train.max_steps=7")
    assert again.returncode == 0, again.stderr[-3000:]
    assert _summary(again)["steps"] == 7
    # Under torchrun the process must have joined a NCCL group, even alone: else no collective ran on the GPU.
    assert "NCCL INFO" in first.stdout + first.stderr, "no NCCL communicator was set up under torchrun"


# Compiled vs eager, one step from the same init (last in the file: compiling takes the longest). fp32 without TF32: only the order of fp32 sums differs (fused
# kernels), a relative error of about 1e-6 here; bounds 1e-4 (loss) and 1e-3 (gradient norm). bf16: inductor may
# round fused intermediates differently, so the reduced-precision bounds above apply.
COMPILE_TOLERANCE = {"fp32": {"loss": 1e-4, "grad": 1e-3}, "bf16": TOLERANCE["bf16"]}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_compiled_step_equals_eager(precision, tmp_path, no_tf32):
    cfg = _config("arcface", precision, tmp_path)
    loss_e, grad_e = _first_step(cfg)
    cfg.train.compile = True
    loss_c, grad_c = _first_step(cfg)
    tol = COMPILE_TOLERANCE[precision]
    assert abs(loss_c - loss_e) <= tol["loss"] * abs(loss_e), (loss_c, loss_e)
    assert abs(grad_c - grad_e) <= tol["grad"] * grad_e, (grad_c, grad_e)


@pytest.mark.parametrize("name,params", [("arcface", {}), ("softmax", {}), ("cosface", {"unpg": {"k": 1.5}}),
                                         ("sphereface2", {}), ("sphereface2", {"variant": "A"})])
def test_fused_losses_on_the_gpu_equal_the_cpu(name, params):
    """The fused margin softmax and SphereFace2 loss (one [B, C] buffer, gradients written by hand) give the CPU's
    loss and gradients on CUDA, in float64 so that only summation order differs (~1e-16 relative)."""
    from faceforge.heads import build_head

    results = []
    for device in ("cpu", DEVICE):
        torch.manual_seed(0)
        head = build_head(name, EMBEDDING, 300, **params).double().to(device)
        emb = torch.randn(BATCH, EMBEDDING, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        emb = emb.to(device).requires_grad_()
        labels = torch.randint(0, 300, (BATCH,), generator=torch.Generator().manual_seed(2)).to(device)
        out = head(emb, labels)
        out.loss.backward()
        grads = [emb.grad, *(p.grad for p in head.parameters())]
        results.append([out.loss.detach().cpu(), *(g.detach().cpu() for g in grads)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
