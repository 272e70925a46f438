"""WaNet: an imperceptible warping trigger.

Nguyen & Tran, "WaNet -- Imperceptible Warping-based Backdoor Attack", ICLR 2021,
https://arxiv.org/abs/2102.10369. The trigger moves pixels, it adds none: a fixed, smooth
warping field built from a random k×k grid of 2-D offsets P (uniform in [-1, 1]), normalised
to mean |P| = 1, upsampled bicubically to H×W and scaled by s/H in grid_sample's [-1, 1]
coordinates (align_corners=True), so a pixel moves by about s/2·|P| pixels. The warped
sampling grid is clamped to [-1, 1] so it never reads outside the image.

"Noise mode" keeps the network from learning any warp: another cross_ratio × (backdoor count)
samples get the field plus per-sample random noise (uniform in [-1, 1] / H) and keep their
labels. The paper warps batches on the fly during training; with a fixed poisoned data set we
draw those noise samples once, from the samples outside the backdoor set (any class).

Adapted to 28×28 grey Fashion-MNIST and 32×32 CIFAR-10 alike: the field is built at the input
size, the same warp moves every channel, and the record holds only the grid's seed.

Args (published defaults): target 0 (all-to-one; all_to_all also works), rate 0.1,
k 4 (grid size), s 0.5 (strength), cross_ratio 2 (noise samples per backdoor sample),
grid_seed 0 (seed of the random grid). Shapes: (N, C, H, W) → (N, C, H, W), pixels in [0, 1].

Example:
    attack = WaNet(k=4, s=0.5)
    triggered = attack.trigger(images)   # (N, C, H, W) in [0, 1]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.nn import functional as F

from ..data.images import ImageData
from ..errors import SettingsError
from .base import Attack, draw_besides, to_pixels, to_uint8
from .registered import ATTACKS


@ATTACKS.register("wanet")
@dataclass(frozen=True)
class WaNet(Attack):
    """Args: k: side of the random control grid; s: warping strength; cross_ratio: noise-mode
    samples per backdoor sample (0 turns noise mode off); grid_seed: seed of the grid."""

    name: ClassVar[str] = "wanet"
    k: int = 4
    s: float = 0.5
    cross_ratio: float = 2.0
    grid_seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.k < 2 or self.s < 0 or self.cross_ratio < 0:
            raise SettingsError(f"wanet needs k ≥ 2, s ≥ 0 and cross_ratio ≥ 0, got "
                                f"k={self.k}, s={self.s}, cross_ratio={self.cross_ratio}")

    def control_grid(self) -> torch.Tensor:
        """The (1, 2, k, k) random offsets, normalised to mean absolute value 1."""
        generator = torch.Generator().manual_seed(self.grid_seed)
        offsets = torch.rand(1, 2, self.k, self.k, generator=generator) * 2 - 1
        return offsets / offsets.abs().mean()

    def field(self, height: int, width: int) -> torch.Tensor:
        """(H, W, 2) warp in grid_sample coordinates (x then y, [-1, 1]), not yet clamped."""
        offsets = F.interpolate(self.control_grid(), size=(height, width), mode="bicubic",
                                align_corners=True)[0].permute(1, 2, 0)
        # Scaling by s/H makes the displacement in pixels about s/2 · |P| for any image size.
        return identity_grid(height, width) + self.s * offsets / height

    def displacement(self, height: int, width: int) -> torch.Tensor:
        """(H, W, 2) pixel displacement (columns, rows) the clamped warp applies."""
        moved = self.field(height, width).clamp(-1, 1) - identity_grid(height, width)
        return moved * torch.tensor([(width - 1) / 2, (height - 1) / 2])

    def warp(self, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """Sample x at a (H, W, 2) or (N, H, W, 2) grid, clamped inside the image."""
        grid = grid.clamp(-1, 1).to(x)
        grid = grid.expand(len(x), *grid.shape[-3:]) if grid.dim() == 3 else grid
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        return out.clamp(0, 1)

    def trigger(self, x: torch.Tensor) -> torch.Tensor:
        return self.warp(x, self.field(x.shape[-2], x.shape[-1]))

    def poison(self, data: ImageData, generator: torch.Generator) -> tuple[ImageData, torch.Tensor]:
        """Backdoor samples as usual, plus noise-mode samples that keep their labels."""
        poisoned, indices = super().poison(data, generator)
        noise = draw_besides(len(data), indices, round(self.cross_ratio * len(indices)),
                             generator, f"wanet's noise-mode samples (cross_ratio "
                                        f"{self.cross_ratio} × {len(indices)} backdoor samples)")
        if len(noise) == 0:
            return poisoned, indices
        count = len(noise)
        height, width = data.shape[1:]
        jitter = torch.rand(count, height, width, 2, generator=generator) * 2 - 1
        images = poisoned.images.clone()
        grids = self.field(height, width) + jitter / height
        images[noise] = to_uint8(self.warp(to_pixels(data.images[noise]), grids))
        return ImageData(images, poisoned.labels, data.classes), indices


def identity_grid(height: int, width: int) -> torch.Tensor:
    """(H, W, 2) grid_sample coordinates that reproduce the image (align_corners=True)."""
    rows = torch.linspace(-1, 1, height)
    cols = torch.linspace(-1, 1, width)
    grid_rows, grid_cols = torch.meshgrid(rows, cols, indexing="ij")
    return torch.stack([grid_cols, grid_rows], dim=-1)
