"""IResNet (r18 ... r200): the "improved" pre-activation ResNet of ArcFace, laid out like insightface arcface_torch.

Attribute names match arcface_torch's `iresnet.py`, so its `model.pt` state dicts load with `load_state_dict`.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from faceforge.registry import BACKBONES
from faceforge.runtime import fp32_only

BN_EPS = 1e-5
# Blocks per stage of each IResNet; backbones.infer reads the architecture of a state dict back from these counts.
DEPTHS = {
    "r18": (2, 2, 2, 2), "r34": (3, 4, 6, 3), "r50": (3, 4, 14, 3), "r100": (3, 13, 30, 3), "r200": (6, 26, 60, 6),
}


def frozen_scale_bn1d(num_features: int) -> nn.BatchNorm1d:
    """Embedding BatchNorm1d with its scale fixed at 1 (only the shift learns), like arcface_torch's `features`."""
    bn = nn.BatchNorm1d(num_features, eps=BN_EPS)
    bn.weight.requires_grad_(False)
    return bn


class IBasicBlock(nn.Module):
    """BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, added to the input or to its 1x1-conv + BN projection.

    `stride_first` moves the stride to the first conv (as torchvision's BasicBlock does): half the FLOPs and activation
    memory of a downsampling block, for the CPU `tiny` network; InsightFace's IResNet strides the second conv.
    """

    def __init__(self, in_channels: int, channels: int, stride: int = 1, stride_first: bool = False) -> None:
        super().__init__()
        stride1, stride2 = (stride, 1) if stride_first else (1, stride)
        self.bn1 = nn.BatchNorm2d(in_channels, eps=BN_EPS)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels, eps=BN_EPS)
        self.prelu = nn.PReLU(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=stride2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels, eps=BN_EPS)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(channels, eps=BN_EPS),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


def make_stage(in_channels: int, channels: int, depth: int, stride: int = 2) -> nn.Sequential:
    """`depth` IBasicBlocks; the first changes width and resolution."""
    blocks = [IBasicBlock(in_channels, channels, stride)]
    blocks += [IBasicBlock(channels, channels) for _ in range(depth - 1)]
    return nn.Sequential(*blocks)


class IResNet(nn.Module):
    """Stem conv3x3 + BN + PReLU, four stride-2 stages (64/128/256/512), BN2d -> flatten -> dropout -> FC -> BN1d."""

    def __init__(self, depths: Sequence[int], embedding_size: int = 512, dropout: float = 0.0) -> None:
        super().__init__()
        if len(depths) != 4:
            raise ValueError(f"IResNet needs 4 stage depths, got {list(depths)}")
        self.embedding_size = embedding_size
        widths = (64, 128, 256, 512)
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0], eps=BN_EPS)
        self.prelu = nn.PReLU(widths[0])
        self.layer1 = make_stage(widths[0], widths[0], depths[0])
        self.layer2 = make_stage(widths[0], widths[1], depths[1])
        self.layer3 = make_stage(widths[1], widths[2], depths[2])
        self.layer4 = make_stage(widths[2], widths[3], depths[3])
        self.bn2 = nn.BatchNorm2d(widths[3], eps=BN_EPS)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(widths[3] * 7 * 7, embedding_size)
        self.features = frozen_scale_bn1d(embedding_size)
        for m in self.modules():
            # arcface_torch's init: its published recipes (lr 0.1, wd 5e-4) were tuned with these weight scales.
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.1)
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        with fp32_only(x.device):  # the embedding layers in full fp32, as arcface_torch runs them
            return self.features(self.fc(x.float()))


@BACKBONES.register("r18")
def iresnet18(embedding_size: int = 512, dropout: float = 0.0) -> IResNet:
    """IResNet-18: 24.0 M parameters, 2.6 G multiply-adds."""
    return IResNet(DEPTHS["r18"], embedding_size, dropout)


@BACKBONES.register("r34")
def iresnet34(embedding_size: int = 512, dropout: float = 0.0) -> IResNet:
    """IResNet-34: 34.1 M parameters, 4.5 G multiply-adds."""
    return IResNet(DEPTHS["r34"], embedding_size, dropout)


@BACKBONES.register("r50")
def iresnet50(embedding_size: int = 512, dropout: float = 0.0) -> IResNet:
    """IResNet-50, the usual MS1MV3 baseline: 43.6 M parameters, 6.3 G multiply-adds."""
    return IResNet(DEPTHS["r50"], embedding_size, dropout)


@BACKBONES.register("r100")
def iresnet100(embedding_size: int = 512, dropout: float = 0.0) -> IResNet:
    """IResNet-100, the usual large-scale benchmark: 65.2 M parameters, 12.1 G multiply-adds."""
    return IResNet(DEPTHS["r100"], embedding_size, dropout)


@BACKBONES.register("r200")
def iresnet200(embedding_size: int = 512, dropout: float = 0.0) -> IResNet:
    """IResNet-200: 118.8 M parameters, 23.4 G multiply-adds."""
    return IResNet(DEPTHS["r200"], embedding_size, dropout)
