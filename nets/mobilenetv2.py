"""MobileNetV2 for CIFAR (Sandler et al. 2018, arXiv:1801.04381 Table 2) as in CRD.

Follows RepDistiller's ``models/mobilenetv2.py`` and its ``mobile_half`` constructor, which is the
"MobileNetV2" of the CRD tables: expansion 6, width multiplier 0.5, a stride-2 3x3 stem, the
ImageNet stage table (t, c, n, s) with the second stage's stride reduced from 2 to 1 (total
stride 16), a 1x1 conv to 1280 channels, global average pooling and a linear classifier.
As in CRD, the t=1 block keeps its (1x) pointwise expansion conv. The stem accepts
``in_channels``; the fixed average pool is adaptive.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["InvertedResidual", "MobileNetV2"]

# (expansion t, output channels c, repeats n, first stride s); t=None means "use expand_ratio".
_STAGES: tuple[tuple[int | None, int, int, int], ...] = (
    (1, 16, 1, 1),
    (None, 24, 2, 1),
    (None, 32, 3, 2),
    (None, 64, 4, 2),
    (None, 96, 3, 1),
    (None, 160, 3, 2),
    (None, 320, 1, 1),
)


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    """Pointwise expand, 3x3 depthwise, linear pointwise project; residual when shapes match.

    Args:
        in_channels: channels of the input.
        out_channels: channels of the output.
        stride: stride of the depthwise conv.
        expand_ratio: hidden width as a multiple of ``in_channels``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        self.use_residual = stride == 1 and in_channels == out_channels
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Map (B, in_channels, H, W) to (B, out_channels, ceil(H/stride), ceil(W/stride))."""
        y = self.conv(x)
        return x + y if self.use_residual else y


class MobileNetV2(nn.Module):
    """CIFAR MobileNetV2 (CRD's ``MobileNetV2``; ``mobile_half`` is the default widths).

    Args:
        num_classes: number of output logits C.
        in_channels: channels of the input images (1 or 3).
        expand_ratio: expansion t of every stage but the first.
        width_mult: channel multiplier of the stem and the stages.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        expand_ratio: int = 6,
        width_mult: float = 0.5,
    ) -> None:
        super().__init__()
        channels = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(in_channels, channels, 3, stride=2)
        stages = []
        for t, c, n, s in _STAGES:
            out_channels = int(c * width_mult)
            blocks = []
            for stride in [s] + [1] * (n - 1):
                blocks.append(InvertedResidual(channels, out_channels, stride, t or expand_ratio))
                channels = out_channels
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.last_channels = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(channels, self.last_channels, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(self.last_channels, num_classes)

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                nn.init.normal_(module.weight, 0.0, (2.0 / fan_out) ** 0.5)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Classify a batch.

        Args:
            x: (B, in_channels, H, W) float32 images.
        Returns:
            (B, C) float32 logits.
        """
        x = self.conv2(self.blocks(self.conv1(x)))
        return self.classifier(torch.flatten(self.avgpool(x), 1))
