"""ShuffleNetV2 for CIFAR (Ma et al. 2018, arXiv:1807.11164 §3, Fig. 3c/3d) as in CRD.

Follows RepDistiller's ``models/ShuffleNetv2.py`` (``ShuffleV2``, net size 1): a 1x1 stem to 24
channels at full resolution, three stages of one stride-2 down-sampling unit followed by 3/7/3
basic units (channel split 1/2, 1x1-dw3x3-1x1 on one half, concat, channel shuffle), a 1x1 conv
to 1024 channels, global average pooling and a linear classifier. The stem accepts
``in_channels``; the fixed 4x4 average pool is adaptive.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["ShuffleNetV2", "channel_shuffle"]

# net size 1 in CRD: stage widths (116, 232, 464), final width 1024; blocks per stage.
_OUT_CHANNELS = (116, 232, 464, 1024)
_NUM_BLOCKS = (3, 7, 3)


def channel_shuffle(x: Tensor, groups: int = 2) -> Tensor:
    """Interleave the channels of ``groups`` groups (ShuffleNet, arXiv:1707.01083 §3.1).

    Args:
        x: (B, C, H, W) with C divisible by ``groups``.
    Returns:
        (B, C, H, W); output channel ``i * groups + g`` is input channel ``g * C/groups + i``.
    """
    batch, channels, height, width = x.shape
    x = x.view(batch, groups, channels // groups, height, width).transpose(1, 2)
    return x.reshape(batch, channels, height, width)


def _conv_bn(
    in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False
        ),
        nn.BatchNorm2d(out_channels),
    )


class ShuffleUnit(nn.Module):
    """Basic unit: split channels in half, transform one half, concat, shuffle (Fig. 3c).

    Args:
        channels: input and output channels (even).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(
            _conv_bn(half, half, 1),
            nn.ReLU(inplace=True),
            _conv_bn(half, half, 3, groups=half),
            _conv_bn(half, half, 1),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Map (B, channels, H, W) to the same shape."""
        half = x.shape[1] // 2
        kept, transformed = x[:, :half], x[:, half:]
        return channel_shuffle(torch.cat([kept, self.branch(transformed)], 1))


class DownUnit(nn.Module):
    """Spatial down-sampling unit: two stride-2 branches, concat, shuffle (Fig. 3d).

    Args:
        in_channels: channels of the input.
        out_channels: channels of the output (even).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        self.left = nn.Sequential(
            _conv_bn(in_channels, in_channels, 3, stride=2, groups=in_channels),
            _conv_bn(in_channels, mid, 1),
            nn.ReLU(inplace=True),
        )
        self.right = nn.Sequential(
            _conv_bn(in_channels, mid, 1),
            nn.ReLU(inplace=True),
            _conv_bn(mid, mid, 3, stride=2, groups=mid),
            _conv_bn(mid, mid, 1),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Map (B, in_channels, H, W) to (B, out_channels, ceil(H/2), ceil(W/2))."""
        return channel_shuffle(torch.cat([self.left(x), self.right(x)], 1))


class ShuffleNetV2(nn.Module):
    """CIFAR ShuffleNetV2 1x (CRD's ``ShuffleV2``).

    Args:
        num_classes: number of output logits C.
        in_channels: channels of the input images (1 or 3).
    """

    def __init__(self, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = _conv_bn(in_channels, 24, 1)
        channels = 24
        stages = []
        for out_channels, num_blocks in zip(_OUT_CHANNELS[:3], _NUM_BLOCKS, strict=True):
            units: list[nn.Module] = [DownUnit(channels, out_channels)]
            units += [ShuffleUnit(out_channels) for _ in range(num_blocks)]
            stages.append(nn.Sequential(*units))
            channels = out_channels
        self.layer1, self.layer2, self.layer3 = stages
        self.conv2 = _conv_bn(channels, _OUT_CHANNELS[3], 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(_OUT_CHANNELS[3], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Classify a batch.

        Args:
            x: (B, in_channels, H, W) float32 images.
        Returns:
            (B, C) float32 logits.
        """
        x = F.relu(self.conv1(x))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.relu(self.conv2(x))
        return self.linear(torch.flatten(self.avgpool(x), 1))
