"""VGG with BatchNorm (Simonyan & Zisserman 2015): configurable depth and width, CIFAR-style
head."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .cnn import conv_norm_relu
from .normalize import default_normalize
from .registered import MODELS

# Channels per conv as multiples of `width` / 64; 'M' is 2×2 max-pooling.
CONFIGS: dict[int, list[int | str]] = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
         512, 512, 512, 512, "M"],
}


@MODELS.register("vgg")
def vgg(num_classes: int = 10, in_channels: int = 1, depth: int = 11, width: int = 16,
        mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> nn.Sequential:
    """VGG-`depth` (11, 13, 16, 19) with BN; `width` is the first stage's channels (64 = standard).

    Global average pooling before the single Linear head keeps it valid for 28×28 inputs.
    """
    if depth not in CONFIGS:
        raise ValueError(f"vgg depth must be one of {sorted(CONFIGS)}, got {depth}")
    layers: list[nn.Module] = [default_normalize(in_channels, mean, std)]
    cin = in_channels
    for item in CONFIGS[depth]:
        if item == "M":
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
        else:
            cout = int(item) * width // 64
            layers += conv_norm_relu(cin, cout)
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)
