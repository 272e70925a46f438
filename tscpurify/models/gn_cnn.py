"""The small CNN of cnn.py with GroupNorm (Wu & He 2018, "Group Normalization") in place of
BatchNorm: no batch statistics, so it behaves the same in training and evaluation."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .normalize import default_normalize
from .registered import MODELS


def conv_gn_relu(cin: int, cout: int, groups: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(groups, cout), nn.ReLU()]


@MODELS.register("gn_cnn")
def gn_cnn(num_classes: int = 10, in_channels: int = 1, width: int = 16, image_size: int = 28,
           groups: int = 4, mean: Sequence[float] | None = None,
           std: Sequence[float] | None = None) -> nn.Sequential:
    """cnn's layout (two stages of two 3×3 convs at width and 2·width, each stage followed by
    2×2 max-pooling, Linear → 4·width, ReLU, classifier), every conv followed by
    GroupNorm(`groups`) and ReLU; `groups` must divide `width`."""
    if width % groups:
        raise ValueError(f"groups {groups} must divide width {width}")
    w = width
    spatial = image_size // 4
    return nn.Sequential(
        default_normalize(in_channels, mean, std),
        *conv_gn_relu(in_channels, w, groups), *conv_gn_relu(w, w, groups), nn.MaxPool2d(2),
        *conv_gn_relu(w, 2 * w, groups), *conv_gn_relu(2 * w, 2 * w, groups), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * w * spatial * spatial, 4 * w), nn.ReLU(),
        nn.Linear(4 * w, num_classes),
    )
