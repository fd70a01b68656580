"""`tiny`: a narrow IResNet run at 56x56, small enough to train the SynthFace demo on 2 CPU cores in minutes."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from faceforge.backbones.iresnet import BN_EPS, IBasicBlock, frozen_scale_bn1d
from faceforge.registry import BACKBONES
from faceforge.runtime import fp32_only


class TinyResNet(nn.Module):
    """2x average-pool, stride-2 stem conv + BN + PReLU, one stride-2 block per width, then the IResNet head.

    Blocks stride their first conv (about 2x faster on CPU than IResNet's second-conv stride). With `channels_last`
    the activations (not the weights, so state dicts stay plain) run NHWC, which oneDNN trains about 20% faster on CPU.
    """

    def __init__(
        self,
        embedding_size: int = 512,
        dropout: float = 0.0,
        widths: Sequence[int] = (48, 96, 192),
        stem: int = 32,
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        self.embedding_size = embedding_size
        self.channels_last = channels_last
        self.conv1 = nn.Conv2d(3, stem, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem, eps=BN_EPS)
        self.prelu = nn.PReLU(stem)
        channels = [stem, *widths]
        self.layers = nn.Sequential(
            *(IBasicBlock(c_in, c_out, stride=2, stride_first=True) for c_in, c_out in zip(channels, widths))
        )
        side = 112 // 2 // 2
        for _ in widths:
            side = (side + 1) // 2
        self.bn2 = nn.BatchNorm2d(channels[-1], eps=BN_EPS)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels[-1] * side * side, embedding_size)
        self.features = frozen_scale_bn1d(embedding_size)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = F.avg_pool2d(x, 2)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.layers(self.prelu(self.bn1(self.conv1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        with fp32_only(x.device):
            return self.features(self.fc(x.float()))


@BACKBONES.register("tiny")
def tiny(
    embedding_size: int = 512,
    dropout: float = 0.0,
    widths: Sequence[int] = (48, 96, 192),
    stem: int = 32,
    channels_last: bool = True,
) -> TinyResNet:
    """The CPU demo network: about 1.1 M parameters and 46 MFLOPs at embedding_size 128."""
    return TinyResNet(embedding_size, dropout, tuple(widths), stem, channels_last)
