"""The small VGG-style CNN used for quick experiments on 28×28 / 32×32 images."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .normalize import default_normalize
from .registered import MODELS


def conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


@MODELS.register("cnn")
def cnn(num_classes: int = 10, in_channels: int = 1, width: int = 16, image_size: int = 28,
        mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> nn.Sequential:
    """Two stages of two 3×3 conv-BN-ReLU (width, 2·width), each followed by 2×2 max-pooling,
    then Linear(→ 4·width) + ReLU and the classifier."""
    w = width
    spatial = image_size // 4
    return nn.Sequential(
        default_normalize(in_channels, mean, std),
        *conv_bn_relu(in_channels, w), *conv_bn_relu(w, w), nn.MaxPool2d(2),
        *conv_bn_relu(w, 2 * w), *conv_bn_relu(2 * w, 2 * w), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * w * spatial * spatial, 4 * w), nn.ReLU(),
        nn.Linear(4 * w, num_classes),
    )
