"""Device and precision choices shared by training, evaluation and benchmarks."""

from __future__ import annotations

import time
from collections.abc import Callable
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
    """The autocast dtype for the backbone, or None for fp32; 'auto' is bf16 on GPU and fp32 on CPU."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


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
