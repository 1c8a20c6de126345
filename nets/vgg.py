"""VGG with batch norm (Simonyan & Zisserman 2015, arXiv:1409.1556 Table 1) as in CRD.

Follows RepDistiller's ``models/vgg.py`` (``vgg8_bn``, ``vgg11_bn``, ``vgg13_bn``): five blocks of
3x3 conv (with bias) + BN + ReLU, 2x2 max pooling after the first three blocks, a fourth pool only
for inputs of side >= 64 (CRD pools there when ``h == 64``), global average pooling and a single
linear classifier on 512 features. The stem accepts ``in_channels``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["VGG", "VGG_SPECS"]

# name -> channel widths of the five blocks (CRD's configs 'S', 'A' and 'B').
VGG_SPECS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
}


def _make_block(widths: tuple[int, ...], in_channels: int) -> nn.Sequential:
    """Conv-BN-ReLU per width, without the last ReLU (the forward pass applies it)."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [
            nn.Conv2d(in_channels, width, kernel_size=3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        ]
        in_channels = width
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    """VGG-BN for small images (CRD's ``VGG`` with ``batch_norm=True``).

    Args:
        widths: channel widths of each conv in each of the five blocks.
        num_classes: number of output logits C.
        in_channels: channels of the input images (1 or 3).
        image_size: expected input side; a fourth max pool is added when it is >= 64.
    """

    def __init__(
        self,
        widths: tuple[tuple[int, ...], ...],
        num_classes: int,
        in_channels: int = 3,
        image_size: int = 32,
    ) -> None:
        super().__init__()
        if len(widths) != 5:
            raise ValueError(f"VGG needs five blocks, got {len(widths)}")
        blocks = []
        for block_widths in widths:
            blocks.append(_make_block(block_widths, in_channels))
            in_channels = block_widths[-1]
        self.block0, self.block1, self.block2, self.block3, self.block4 = blocks
        self.relu = nn.ReLU(inplace=True)
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3: nn.Module = nn.MaxPool2d(2, 2) if image_size >= 64 else nn.Identity()
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_channels, num_classes)

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                assert module.bias is not None
                nn.init.zeros_(module.bias)
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
        x = self.pool0(self.relu(self.block0(x)))
        x = self.pool1(self.relu(self.block1(x)))
        x = self.pool2(self.relu(self.block2(x)))
        x = self.pool3(self.relu(self.block3(x)))
        x = self.pool4(self.relu(self.block4(x)))
        return self.classifier(torch.flatten(x, 1))


def build_vgg(name: str, num_classes: int, in_channels: int = 3, image_size: int = 32) -> VGG:
    """Build the CRD VGG-BN called ``name`` (a key of ``VGG_SPECS``)."""
    return VGG(VGG_SPECS[name], num_classes, in_channels, image_size)
