"""Wide Residual Networks (Zagoruyko & Komodakis 2016, arXiv:1605.07146 §2) as in CRD.

Follows RepDistiller's ``models/wrn.py``: pre-activation basic blocks, stage widths
16k/32k/64k after a 16-wide stem, ``depth = 6n + 4``, a 1x1 projection shortcut wherever the
width changes, a final BN-ReLU, global average pooling and a linear classifier. Dropout is
off (CRD's default). The stem accepts ``in_channels``; the fixed 8x8 average pool is adaptive.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["WideBasicBlock", "WideResNet", "WRN_SPECS"]

# name -> (depth, widen factor k), as in CRD's wrn_16_1 ... wrn_40_2.
WRN_SPECS: dict[str, tuple[int, int]] = {
    "wrn_16_1": (16, 1),
    "wrn_16_2": (16, 2),
    "wrn_40_1": (40, 1),
    "wrn_40_2": (40, 2),
}


class WideBasicBlock(nn.Module):
    """BN-ReLU-conv3x3 twice, with an identity or 1x1 projection shortcut.

    When the width changes, the shortcut is taken from the pre-activated input, as in the
    reference implementation.

    Args:
        in_planes: channels of the input.
        out_planes: channels of the output.
        stride: stride of the first convolution.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.equal_in_out = in_planes == out_planes and stride == 1
        self.shortcut: nn.Module | None = None
        if not self.equal_in_out:
            self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """Map (B, in_planes, H, W) to (B, out_planes, ceil(H/stride), ceil(W/stride))."""
        activated = self.relu1(self.bn1(x))
        y = self.relu2(self.bn2(self.conv1(activated)))
        y = self.conv2(y)
        if self.shortcut is None:
            return x + y
        return self.shortcut(activated) + y


class WideResNet(nn.Module):
    """WRN-depth-k (CRD's ``WideResNet`` without dropout).

    Args:
        depth: total number of weighted layers; ``(depth - 4) % 6 == 0``.
        widen_factor: width multiplier k.
        num_classes: number of output logits C.
        in_channels: channels of the input images (1 or 3).

    Raises:
        ValueError: depth not of the form 6n + 4.
    """

    def __init__(self, depth: int, widen_factor: int, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n + 4 with n >= 1, got {depth}")
        blocks_per_stage = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = self._make_stage(widths[0], widths[1], blocks_per_stage, stride=1)
        self.block2 = self._make_stage(widths[1], widths[2], blocks_per_stage, stride=2)
        self.block3 = self._make_stage(widths[2], widths[3], blocks_per_stage, stride=2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    @staticmethod
    def _make_stage(in_planes: int, out_planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        layers = [WideBasicBlock(in_planes, out_planes, stride)]
        layers += [WideBasicBlock(out_planes, out_planes, 1) for _ in range(num_blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Classify a batch.

        Args:
            x: (B, in_channels, H, W) float32 images.
        Returns:
            (B, C) float32 logits.
        """
        x = self.conv1(x)
        x = self.block3(self.block2(self.block1(x)))
        x = self.relu(self.bn1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build_wrn(name: str, num_classes: int, in_channels: int = 3) -> WideResNet:
    """Build the CRD WRN called ``name`` (a key of ``WRN_SPECS``)."""
    depth, widen_factor = WRN_SPECS[name]
    return WideResNet(depth, widen_factor, num_classes, in_channels)
