"""The small VGG-style CNN used for quick experiments on 28×28 / 32×32 images, with BatchNorm
or (as `gn_cnn`) GroupNorm."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .normalize import default_normalize
from .registered import MODELS

NORMS = ("batch", "group")


def conv_norm_relu(cin: int, cout: int, norm: str = "batch", groups: int = 4) -> list[nn.Module]:
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)  # first: it draws the random init
    return [conv, nn.BatchNorm2d(cout) if norm == "batch" else nn.GroupNorm(groups, cout),
            nn.ReLU()]


@MODELS.register("cnn")
def cnn(num_classes: int = 10, in_channels: int = 1, width: int = 16, image_size: int = 28,
        mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
        norm: str = "batch", groups: int = 4) -> nn.Sequential:
    """Two stages of two 3×3 conv-norm-ReLU (width, 2·width), each followed by 2×2 max-pooling,
    then Linear(→ 4·width) + ReLU and the classifier. `norm` "group" puts GroupNorm(`groups`)
    where BatchNorm is (`groups` must divide `width`)."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    if norm == "group" and width % groups:
        raise ValueError(f"groups {groups} must divide width {width}")
    w = width
    spatial = image_size // 4

    def block(cin: int, cout: int) -> list[nn.Module]:
        return conv_norm_relu(cin, cout, norm, groups)

    return nn.Sequential(
        default_normalize(in_channels, mean, std),
        *block(in_channels, w), *block(w, w), nn.MaxPool2d(2),
        *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * w * spatial * spatial, 4 * w), nn.ReLU(),
        nn.Linear(4 * w, num_classes),
    )


@MODELS.register("gn_cnn")
def gn_cnn(num_classes: int = 10, in_channels: int = 1, width: int = 16, image_size: int = 28,
           groups: int = 4, mean: Sequence[float] | None = None,
           std: Sequence[float] | None = None) -> nn.Sequential:
    """`cnn` with GroupNorm (Wu & He 2018, "Group Normalization") in place of BatchNorm: no
    batch statistics, so it behaves the same in training and evaluation."""
    return cnn(num_classes, in_channels, width, image_size, mean, std, norm="group",
               groups=groups)
