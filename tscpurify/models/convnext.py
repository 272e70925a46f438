"""A small ConvNeXt (Liu et al. 2022, "A ConvNet for the 2020s").

Each block: a depthwise 7×7 conv, LayerNorm over channels (channels last), an inverted MLP
(Linear dim → 4·dim, GELU, Linear back), a learned per-channel layer scale, and a residual.
Stages are joined by LayerNorm + a 2×2 stride-2 conv; the stem is a 2×2 stride-2 "patchify"
conv + LayerNorm (the paper's is 4×4 for 224-pixel images), so a 28×28 image gives 14×14,
7×7 and 3×3 maps. The head is global average pooling → LayerNorm → Linear. No stochastic depth.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .normalize import default_normalize
from .registered import MODELS


class ChannelNorm(nn.Module):
    """LayerNorm over the channels of an (N, C, H, W) map: permuted to channels last and back."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int, kernel: int, layer_scale: float) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.dwconv(x).permute(0, 2, 3, 1))  # (N, H, W, C)
        h = self.gamma * self.pwconv2(F.gelu(self.pwconv1(h)))
        return x + h.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, width: int, depths: Sequence[int],
                 kernel: int, layer_scale: float, mean: Sequence[float] | None,
                 std: Sequence[float] | None) -> None:
        super().__init__()
        self.normalize = default_normalize(in_channels, mean, std)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 2, stride=2), ChannelNorm(width))
        stages: list[nn.Module] = []
        dim = width
        for i, depth in enumerate(depths):
            if i > 0:
                stages += [ChannelNorm(dim), nn.Conv2d(dim, 2 * dim, 2, stride=2)]
                dim *= 2
            stages += [ConvNeXtBlock(dim, kernel, layer_scale) for _ in range(depth)]
        self.stages = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(self.normalize(x)))
        return self.head(self.norm(x.mean((2, 3))))


@MODELS.register("convnext")
def convnext(num_classes: int = 10, in_channels: int = 1, width: int = 16,
             depths: Sequence[int] = (2, 2, 2), kernel: int = 7, layer_scale: float = 1e-6,
             mean: Sequence[float] | None = None,
             std: Sequence[float] | None = None) -> ConvNeXt:
    """Stages of `depths[i]` blocks at width·2^i channels; `kernel` is the depthwise conv's
    size, `layer_scale` the initial layer-scale value (the paper's 1e-6). Pools globally, so
    any image size of at least 2^len(depths) pixels works."""
    return ConvNeXt(num_classes, in_channels, width, tuple(depths), kernel, layer_scale,
                    mean, std)
