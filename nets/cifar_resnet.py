"""CIFAR ResNets (He et al. 2016, arXiv:1512.03385 §4.2) as defined in the CRD repository.

The definitions follow RepDistiller's ``models/resnet.py`` (Tian et al., "Contrastive
Representation Distillation", arXiv:1910.10699): basic blocks, three stages of ``n`` blocks with
``depth = 6n + 2``, stage widths 16/32/64 for ``resnet{8..110}`` and 64/128/256 after a 32-wide stem
for the ``x4`` variants, 1x1-conv + BN projection shortcuts, and a linear classifier after
global average pooling. The only departures from CRD: the stem accepts ``in_channels`` and the
fixed ``AvgPool2d(8)`` is an adaptive average pool, so any input side >= 1 works; for 32x32
inputs the computation is identical.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["BasicBlock", "CifarResNet", "RESNET_SPECS"]

# name -> (depth, (stem width, stage-1 width, stage-2 width, stage-3 width)), as in CRD.
RESNET_SPECS: dict[str, tuple[int, tuple[int, int, int, int]]] = {
    "resnet8": (8, (16, 16, 32, 64)),
    "resnet14": (14, (16, 16, 32, 64)),
    "resnet20": (20, (16, 16, 32, 64)),
    "resnet32": (32, (16, 16, 32, 64)),
    "resnet44": (44, (16, 16, 32, 64)),
    "resnet56": (56, (16, 16, 32, 64)),
    "resnet110": (110, (16, 16, 32, 64)),
    "resnet8x4": (8, (32, 64, 128, 256)),
    "resnet32x4": (32, (32, 64, 128, 256)),
}


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution, padding 1, no bias (a BatchNorm follows)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity or projection shortcut (post-activation).

    Args:
        in_planes: channels of the input.
        planes: channels of the output.
        stride: stride of the first convolution (1 or 2).
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: Tensor) -> Tensor:
        """Map (B, in_planes, H, W) to (B, planes, ceil(H/stride), ceil(W/stride))."""
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + shortcut)


class CifarResNet(nn.Module):
    """CIFAR ResNet with three stages of basic blocks (CRD's ``ResNet``).

    Args:
        depth: total number of weighted layers; ``(depth - 2) % 6 == 0``.
        widths: (stem, stage 1, stage 2, stage 3) channel widths.
        num_classes: number of output logits C.
        in_channels: channels of the input images (1 or 3).

    Raises:
        ValueError: depth not of the form 6n + 2.
    """

    def __init__(
        self,
        depth: int,
        widths: tuple[int, int, int, int],
        num_classes: int,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1, got {depth}")
        blocks_per_stage = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self._in_planes = widths[0]
        self.layer1 = self._make_layer(widths[1], blocks_per_stage, stride=1)
        self.layer2 = self._make_layer(widths[2], blocks_per_stage, stride=2)
        self.layer3 = self._make_layer(widths[3], blocks_per_stage, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _make_layer(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(self._in_planes, planes, stride)]
        self._in_planes = planes
        layers += [BasicBlock(planes, planes) for _ in range(num_blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Classify a batch.

        Args:
            x: (B, in_channels, H, W) float32 images.
        Returns:
            (B, C) float32 logits.
        """
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build_resnet(name: str, num_classes: int, in_channels: int = 3) -> CifarResNet:
    """Build the CRD ResNet called ``name`` (a key of ``RESNET_SPECS``)."""
    depth, widths = RESNET_SPECS[name]
    return CifarResNet(depth, widths, num_classes, in_channels)
