"""A small Vision Transformer for 28×28 / 32×32 images.

The design of Dosovitskiy et al. 2021 ("An Image is Worth 16x16 Words"): the image is cut into
patches, each embedded by one linear map (a strided conv), a learned class token is prepended,
a learned position embedding added, and `depth` pre-LayerNorm transformer blocks follow; the
head reads the class token after a final LayerNorm. Patches of 4 pixels instead of 16, as
small-image ViTs use, so a 28×28 image gives 7×7 = 49 tokens (+1 for the class token).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .normalize import default_normalize
from .registered import MODELS


class Block(nn.Module):
    """x + attention(LayerNorm(x)), then x + MLP(LayerNorm(x)); the MLP is
    Linear(dim → mlp_ratio·dim) → GELU → Linear(→ dim)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(),
                                 nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, image_size: int, patch: int,
                 dim: int, depth: int, heads: int, mlp_ratio: int,
                 mean: Sequence[float] | None, std: Sequence[float] | None) -> None:
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size {image_size} is not a multiple of patch {patch}")
        if dim % heads:
            raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
        tokens = (image_size // patch) ** 2
        self.normalize = default_normalize(in_channels, mean, std)
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, tokens + 1, dim))
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(self.normalize(x)).flatten(2).transpose(1, 2)  # (batch, tokens, dim)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


@MODELS.register("vit")
def vit(num_classes: int = 10, in_channels: int = 1, image_size: int = 28, patch: int = 4,
        dim: int = 64, depth: int = 4, heads: int = 4, mlp_ratio: int = 4,
        mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> ViT:
    """ViT with `depth` blocks of width `dim`, `heads` attention heads and an MLP of
    `mlp_ratio`·dim hidden units; `patch` must divide `image_size`. The defaults (patch 4,
    dim 64, 4 heads, 4 blocks: about 0.2M parameters) are issue #20's small ViT."""
    return ViT(num_classes, in_channels, image_size, patch, dim, depth, heads, mlp_ratio,
               mean, std)
