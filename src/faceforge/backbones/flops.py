"""Forward FLOP count of a backbone, in the convention of arcface_torch's model zoo x 2 (a multiply-add is 2 FLOPs)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_flops(model: nn.Module, image_size: int = 112) -> int:
    """FLOPs of one eval-mode forward pass on a 3 x image_size x image_size image.

    Runs on the model's own device and dtype, so a model built under `torch.device("meta")` is counted without
    allocating or computing anything. Only matmuls and convolutions count (norms and activations are ignored).
    """
    param = next(model.parameters())
    image = torch.zeros(1, 3, image_size, image_size, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(image)
    finally:
        model.train(was_training)
    return counter.get_total_flops()
