"""BadNets: a visible patch trigger.

Gu, Dolan-Gavitt & Garg, "BadNets: Identifying Vulnerabilities in the Machine Learning Model
Supply Chain", 2017, https://arxiv.org/abs/1708.06733. As in BackdoorBench, a small patch in
the bottom-right corner, 10% poisoning, all-to-one to class 0 (or all-to-all: y → y+1).

Example:
    attack = BadNets(target=0, size=3)
    triggered = attack.trigger(images)   # (N, C, H, W) in [0, 1]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import SettingsError
from .base import Attack
from .registered import ATTACKS

PATTERNS = ("checkerboard", "white")
POSITIONS = ("bottom-right", "bottom-left", "top-right", "top-left")


def corner_box(height: int, width: int, size: int, margin: int,
               position: str = "bottom-right") -> tuple[slice, slice]:
    """Rows and columns of a size×size square `margin` pixels from the corner `position` of
    an H×W image (shared by every attack that stamps a corner patch)."""
    top = margin if position.startswith("top") else height - margin - size
    left = margin if position.endswith("left") else width - margin - size
    return slice(top, top + size), slice(left, left + size)


def check_corner_fits(size: int, margin: int, image_shape: tuple[int, ...],
                      what: str = "patch") -> None:
    """Raise if a size×size square `margin` pixels from a corner does not fit the images."""
    if size + margin > min(image_shape[-2:]):
        raise SettingsError(f"a {size}px {what} with margin {margin} does not fit "
                            f"{image_shape[-2]}×{image_shape[-1]} images")


@ATTACKS.register("badnets")
@dataclass(frozen=True)
class BadNets(Attack):
    """Args: size: patch side in pixels; position: a corner; margin: pixels from the border;
    pattern: 'checkerboard' (black/white) or 'white'."""

    name: ClassVar[str] = "badnets"
    size: int = 3
    position: str = "bottom-right"
    margin: int = 1
    pattern: str = "checkerboard"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pattern not in PATTERNS:
            raise SettingsError(f"badnets pattern must be one of {PATTERNS}, got {self.pattern!r}")
        if self.position not in POSITIONS:
            raise SettingsError(f"badnets position must be one of {POSITIONS}, "
                                f"got {self.position!r}")
        if self.size < 1 or self.margin < 0:
            raise SettingsError(f"badnets size must be ≥ 1 and margin ≥ 0, got {self.size}, "
                                f"{self.margin}")

    def check(self, num_classes: int, image_shape: tuple[int, ...]) -> None:
        super().check(num_classes, image_shape)
        check_corner_fits(self.size, self.margin, image_shape)

    def box(self, height: int, width: int) -> tuple[slice, slice]:
        """Rows and columns the patch covers."""
        return corner_box(height, width, self.size, self.margin, self.position)

    def patch(self) -> torch.Tensor:
        if self.pattern == "white":
            return torch.ones(self.size, self.size)
        grid = torch.arange(self.size)
        return ((grid[:, None] + grid[None, :]) % 2 == 0).float()

    def trigger(self, x: torch.Tensor) -> torch.Tensor:
        rows, cols = self.box(x.shape[-2], x.shape[-1])
        out = x.clone()
        out[..., rows, cols] = self.patch().to(x)
        return out
