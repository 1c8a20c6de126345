"""Registry of classification architectures by name.

``build_net(name, num_classes, in_channels, image_size)`` returns a freshly initialised
``torch.nn.Module`` mapping (B, in_channels, H, W) float32 images to (B, num_classes) logits.
Every net ends in adaptive average pooling, so 28x28 grey (Fashion-MNIST), 32x32 RGB (CIFAR) and
64x64 (Tiny ImageNet) inputs all work. Nothing is downloaded; there are no pretrained weights.

The CIFAR architectures reproduce the definitions of the CRD repository (RepDistiller, Tian et al.,
arXiv:1910.10699); with ``num_classes=100`` their parameter counts equal the published ones.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable

from torch import nn

from nets.cifar_resnet import RESNET_SPECS, build_resnet
from nets.mobilenetv2 import MobileNetV2
from nets.shufflenetv2 import ShuffleNetV2
from nets.small import MLP, SMALL_CNN_SPECS, SmallCNN
from nets.vgg import VGG_SPECS, build_vgg
from nets.wrn import WRN_SPECS, build_wrn
from storage.errors import LessonsError

__all__ = ["UnknownArchitectureError", "available_nets", "build_net"]

_VALID_IN_CHANNELS = (1, 3)

# name -> builder(num_classes, in_channels, image_size)
_Builder = Callable[[int, int, int], nn.Module]
_REGISTRY: dict[str, _Builder] = {}


def _register(name: str, builder: _Builder) -> None:
    if name in _REGISTRY:
        raise RuntimeError(f"architecture {name!r} registered twice")
    _REGISTRY[name] = builder


for _name in RESNET_SPECS:
    _register(_name, functools.partial(lambda n, c, k, s: build_resnet(n, c, k), _name))
for _name in WRN_SPECS:
    _register(_name, functools.partial(lambda n, c, k, s: build_wrn(n, c, k), _name))
for _name in VGG_SPECS:
    _register(_name, functools.partial(build_vgg, _name))
for _name, (_widths, _grid) in SMALL_CNN_SPECS.items():
    _register(_name, functools.partial(lambda w, g, c, k, s: SmallCNN(w, g, c, k), _widths, _grid))
_register("mobilenetv2", lambda c, k, s: MobileNetV2(c, k))
_register("shufflenetv2", lambda c, k, s: ShuffleNetV2(c, k))
_register("mlp", lambda c, k, s: MLP(c, k, grid_size=min(s, 32)))


class UnknownArchitectureError(LessonsError, ValueError):
    """Raised by :func:`build_net` for a name that is not registered."""


def available_nets() -> list[str]:
    """Return the registered architecture names, sorted."""
    return sorted(_REGISTRY)


def build_net(name: str, num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """Build a freshly initialised classifier by name.

    Args:
        name: one of :func:`available_nets`.
        num_classes: number of output logits C, >= 1.
        in_channels: channels of the input images, 1 (grey) or 3 (RGB).
        image_size: expected input side. Nets accept other sides; it only chooses VGG's fourth
            max pool (side >= 64, as in CRD) and the MLP's pooled grid (side ``min(image_size,
            32)``).
    Returns:
        A module in training mode mapping (B, in_channels, H, W) float32 to (B, C) float32 logits.
    Raises:
        UnknownArchitectureError: ``name`` is not registered (the message lists the known names
            and suggests the closest one).
        ValueError: ``num_classes < 1``, ``in_channels`` not 1 or 3, or ``image_size < 1``.
    """
    builder = _REGISTRY.get(name)
    if builder is None:
        known = available_nets()
        close = difflib.get_close_matches(name.lower(), known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UnknownArchitectureError(f"unknown architecture {name!r}{hint}; known: {', '.join(known)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    if isinstance(in_channels, bool) or in_channels not in _VALID_IN_CHANNELS:
        raise ValueError(f"in_channels must be 1 or 3, got {in_channels!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be an integer >= 1, got {image_size!r}")
    return builder(num_classes, in_channels, image_size)
