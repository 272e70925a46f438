"""A small DenseNet (Huang et al. 2017, "Densely Connected Convolutional Networks").

Inside a dense block every layer (BN → ReLU → 3×3 conv with `growth` output channels) reads
the concatenation of the block's input and of all earlier layers' outputs, and its own output
is concatenated on. Between blocks a transition (BN → ReLU → 1×1 conv halving the channels,
the paper's compression 0.5 → 2×2 average pooling) shrinks the map. No bottleneck 1×1 convs
inside the blocks: the basic DenseNet, small enough for 28×28 / 32×32 images on a CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .normalize import default_normalize
from .registered import MODELS


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv(F.relu(self.bn(x)))], dim=1)


def transition(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, cout, 1, bias=False),
                         nn.AvgPool2d(2))


class DenseNet(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, width: int, growth: int,
                 blocks: Sequence[int], mean: Sequence[float] | None,
                 std: Sequence[float] | None) -> None:
        super().__init__()
        self.normalize = default_normalize(in_channels, mean, std)
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        stages: list[nn.Module] = []
        channels = width
        for i, layers in enumerate(blocks):
            if i > 0:
                stages.append(transition(channels, channels // 2))
                channels //= 2
            for _ in range(layers):
                stages.append(DenseLayer(channels, growth))
                channels += growth
        self.features = nn.Sequential(*stages)
        self.norm = nn.BatchNorm2d(channels)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.stem(self.normalize(x)))
        return self.head(F.relu(self.norm(x)).mean((2, 3)))


@MODELS.register("densenet")
def densenet(num_classes: int = 10, in_channels: int = 1, width: int = 16, growth: int = 8,
             blocks: Sequence[int] = (4, 4, 4), mean: Sequence[float] | None = None,
             std: Sequence[float] | None = None) -> DenseNet:
    """A `width`-channel 3×3 stem, then dense blocks of `blocks[i]` layers that add `growth`
    channels each, with transitions between them; BN → ReLU → global average pool → Linear.
    Pools globally, so any image size works."""
    return DenseNet(num_classes, in_channels, width, growth, tuple(blocks), mean, std)
