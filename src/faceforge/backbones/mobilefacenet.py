"""MobileFaceNet (`mbf`, `mbf_large`) as in insightface arcface_torch, itself adapted from cavaface.

The module tree (and so every state-dict key) matches arcface_torch's `mobilefacenet.py`, so its checkpoints load.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from faceforge.registry import BACKBONES
from faceforge.runtime import fp32_only

# name -> (bottleneck counts per level, trunk width scale); backbones.infer reads these back from a state dict.
LAYOUTS = {"mbf": ((1, 4, 6, 2), 2), "mbf_large": ((2, 8, 12, 4), 4)}


class ConvBlock(nn.Module):
    """Conv -> BN -> PReLU."""

    def __init__(self, in_c: int, out_c: int, kernel: int = 1, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_c, out_c, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_c),
            nn.PReLU(out_c),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class LinearBlock(nn.Module):
    """Unpadded conv -> BN, no activation: a bottleneck's projection, or GDC's 7x7 global depthwise conv."""

    def __init__(self, in_c: int, out_c: int, kernel: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_c, out_c, kernel, groups=groups, bias=False),
            nn.BatchNorm2d(out_c),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class DepthWise(nn.Module):
    """Inverted bottleneck: 1x1 expand to `hidden`, depthwise 3x3 (stride), 1x1 project; optional identity shortcut."""

    def __init__(self, in_c: int, out_c: int, hidden: int, stride: int = 1, residual: bool = False) -> None:
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBlock(in_c, hidden),
            ConvBlock(hidden, hidden, kernel=3, stride=stride, groups=hidden),
            LinearBlock(hidden, out_c),
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.layers(x)
        return out + x if self.residual else out


class Residual(nn.Module):
    """`depth` stride-1 residual bottlenecks of constant width."""

    def __init__(self, channels: int, depth: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(*(DepthWise(channels, channels, hidden, residual=True) for _ in range(depth)))

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class GDC(nn.Module):
    """Global depthwise 7x7 conv + BN -> flatten -> dropout -> Linear (no bias) -> BN1d: the embedding head."""

    def __init__(self, embedding_size: int, dropout: float, channels: int = 512) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            LinearBlock(channels, channels, kernel=7, groups=channels),
            # flatten and dropout share one slot: they hold no weights and the key indices stay those of arcface_torch
            nn.Sequential(nn.Flatten(), nn.Dropout(dropout)),
            nn.Linear(channels, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size),  # scale and shift both train, as in arcface_torch (IResNet: shift only)
        )

    def forward(self, x: Tensor) -> Tensor:
        with fp32_only(x.device):
            return self.layers(x.float())


class MobileFaceNet(nn.Module):
    """MobileFaceNet: stride-2 stem, four resolution levels of inverted bottlenecks (56->7 px), 1x1 to 512, GDC head.

    `blocks` are the bottleneck counts per level and `scale` multiplies the trunk widths (64 and 128); the expansion
    widths stay fixed at arcface_torch's values, which is why `mbf_large` has bottlenecks narrower than its trunk.
    `channels_last` runs the activations NHWC: on CPU the NCHW backward of the 64-group conv takes a slow path
    (about 60x slower than NHWC); the weights stay NCHW so state dicts are unchanged.
    """

    def __init__(
        self,
        blocks: Sequence[int] = (1, 4, 6, 2),
        scale: int = 2,
        embedding_size: int = 512,
        dropout: float = 0.0,
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        if len(blocks) != 4:
            raise ValueError(f"MobileFaceNet needs 4 block counts, got {list(blocks)}")
        self.embedding_size = embedding_size
        self.channels_last = channels_last
        c1, c2 = 64 * scale, 128 * scale
        if blocks[0] == 1:
            # arcface_torch's mbf uses a grouped (64 groups), not depthwise, 3x3 conv here
            first: nn.Module = ConvBlock(c1, c1, kernel=3, groups=64)
        else:
            first = Residual(c1, blocks[0], hidden=128)
        self.layers = nn.Sequential(
            ConvBlock(3, c1, kernel=3, stride=2),
            first,
            DepthWise(c1, c1, hidden=128, stride=2),
            Residual(c1, blocks[1], hidden=128),
            DepthWise(c1, c2, hidden=256, stride=2),
            Residual(c2, blocks[2], hidden=256),
            DepthWise(c2, c2, hidden=512, stride=2),
            Residual(c2, blocks[3], hidden=256),
        )
        self.conv_sep = ConvBlock(c2, 512)
        self.features = GDC(embedding_size, dropout)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.features(self.conv_sep(self.layers(x)))


@BACKBONES.register("mbf")
def mobilefacenet(embedding_size: int = 512, dropout: float = 0.0, channels_last: bool = True) -> MobileFaceNet:
    """arcface_torch `mbf`: blocks (1, 4, 6, 2), scale 2; 2.06 M parameters, 0.44 G multiply-adds."""
    return MobileFaceNet(*LAYOUTS["mbf"], embedding_size, dropout, channels_last)


@BACKBONES.register("mbf_large")
def mobilefacenet_large(embedding_size: int = 512, dropout: float = 0.0, channels_last: bool = True) -> MobileFaceNet:
    """arcface_torch `mbf_large`: blocks (2, 8, 12, 4), scale 4; 6.3 M parameters, 1.8 G multiply-adds."""
    return MobileFaceNet(*LAYOUTS["mbf_large"], embedding_size, dropout, channels_last)
