"""Device and precision choices shared by training, evaluation and benchmarks."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from faceforge.errors import ConfigError


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """'auto' is this process's GPU (`local_rank` under torchrun) when there is one, else the CPU; asking for CUDA
    without one is a ConfigError."""
    if name in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if name == "auto":
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but no CUDA device is available")
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for the backbone, or None for fp32. 'auto' is fp32 on the CPU and, on a GPU, bf16 where
    it runs natively (Ampere and later), else fp16 (trained with a GradScaler)."""
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def configure_cuda(device: torch.device, tf32: bool) -> None:
    """cuDNN autotuning, and TF32 for the fp32 matmuls and convolutions outside the heads (see `fp32_only`)."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32


@contextmanager
def fp32_only(device: torch.device) -> Iterator[None]:
    """Full fp32 inside: autocast off, and on CUDA no TF32 for matmuls, so logits, losses and metrics keep every
    bit of fp32 whatever the backbone runs in (a TF32 cosine is off by ~1e-3, at s = 64 a 0.06 logit error).
    The one spelling of "autocast off": heads, regularizers and the backbones' embedding layers use it."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False
        if torch.amp.is_autocast_available(device.type):
            with torch.autocast(device_type=device.type, enabled=False):
                yield
        else:
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 tensors widened to fp32; fp32/fp64 kept (so float64 gradient checks stay exact)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def to_host(values: list[torch.Tensor | float]) -> list[float]:
    """Numbers (0-dim tensors on any device, or floats) as Python floats, through one device-to-host transfer:
    the one place a training step's results meet the host."""
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if not tensors:
        return [float(v) for v in values]
    device = tensors[0].device
    read = iter(torch.stack([t.detach().to(device, torch.float64).reshape(()) for t in tensors]).tolist())
    return [next(read) if isinstance(v, torch.Tensor) else float(v) for v in values]


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op off CUDA): timings must end when the work does."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """fn(*args, **kwargs) and the seconds it took, the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    synchronize(device)
    return out, time.perf_counter() - start
