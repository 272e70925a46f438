"""Blended: the whole image is alpha-blended with a fixed pattern.

Chen, Liu, Li, Lu & Song, "Targeted Backdoor Attacks on Deep Learning Systems Using Data
Poisoning", 2017, https://arxiv.org/abs/1712.05526. The paper blends a Hello-Kitty image at
alpha 0.2; we default to a seeded uniform-noise pattern (no image ships with the package) and
accept a user image. The pattern is re-created from the seed or the image path, so the record
stays a small JSON object.

Example:
    attack = Blended(alpha=0.2, pattern_seed=0)
    triggered = attack.trigger(images)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import DataError, SettingsError
from .base import Attack
from .registered import ATTACKS


@ATTACKS.register("blended")
@dataclass(frozen=True)
class Blended(Attack):
    """Args: alpha: blend ratio in (0, 1]; pattern_seed: seed of the noise pattern;
    image: optional path of a pattern image (resized to the input size), used instead of noise."""

    name: ClassVar[str] = "blended"
    alpha: float = 0.2
    pattern_seed: int = 0
    image: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.alpha <= 1:
            raise SettingsError(f"blend ratio alpha must be in (0, 1], got {self.alpha}")

    def pattern(self, shape: tuple[int, ...]) -> torch.Tensor:
        """The (C, H, W) pattern in [0, 1] for images of this shape."""
        channels, height, width = shape
        if self.image is None:
            generator = torch.Generator().manual_seed(self.pattern_seed)
            return torch.rand(channels, height, width, generator=generator)
        try:
            with Image.open(self.image) as img:
                img = img.convert("L" if channels == 1 else "RGB").resize((width, height))
                array = np.asarray(img, dtype=np.float32) / 255
        except (FileNotFoundError, UnidentifiedImageError, OSError) as err:
            raise DataError(f"cannot read the blend pattern image {self.image}: {err}") from None
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        return torch.from_numpy(array.copy())

    def trigger(self, x: torch.Tensor) -> torch.Tensor:
        pattern = self.pattern(tuple(x.shape[1:])).to(x)
        return (1 - self.alpha) * x + self.alpha * pattern
