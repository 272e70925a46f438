"""SIG: a clean-label backdoor with a sinusoidal signal.

Barni, Kallas & Tondi, "A New Backdoor Attack in CNNs by Training Set Corruption Without
Label Poisoning", ICIP 2019, https://arxiv.org/abs/1902.11237. Only samples of the target
class are poisoned and no label changes: each gets the horizontal sinusoid
v(i, j) = delta · sin(2π · j · f / W) added (j the column, W the width), then clipped to
[0, 1]. The network learns the signal as a feature of the target class, so adding it to an
input of any other class at test time sends that input to the target.

Adapted to 28×28 grey Fashion-MNIST and 32×32 CIFAR-10 alike: the same signal goes on every
channel and the period follows the image width. Our rate is, as for every attack here, a
share of the whole training set (the paper counts the poisoned share within the target class),
and it is capped at the target class's size: 0.1 poisons every target-class sample of a
balanced 10-class set; a larger rate (or a smaller class) poisons the whole class, with a
logged warning.

Args (published defaults): target 0, rate 0.1 (of the data set), delta 20/255 (amplitude in
[0, 1] pixels), f 6 (periods across the width). Shapes: (N, C, H, W) → (N, C, H, W).

Example:
    attack = SIG(delta=20 / 255, f=6)
    triggered = attack.trigger(images)   # (N, C, H, W) in [0, 1]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import SettingsError
from .base import Attack
from .registered import ATTACKS


@ATTACKS.register("sig")
@dataclass(frozen=True)
class SIG(Attack):
    """Args: delta: amplitude of the sinusoid in [0, 1] pixel units; f: its frequency in
    periods per image width."""

    name: ClassVar[str] = "sig"
    clean_label: ClassVar[bool] = True
    delta: float = 20 / 255
    f: float = 6

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.delta <= 1 or self.f <= 0:
            raise SettingsError(f"sig needs delta in (0, 1] and f > 0, got delta={self.delta}, "
                                f"f={self.f}")

    def check(self, num_classes: int, image_shape: tuple[int, ...]) -> None:
        super().check(num_classes, image_shape)
        width = image_shape[-1]
        # When 2f/W is a whole number, every column j falls on a zero of sin(2π·j·f/W).
        if (2 * self.f / width).is_integer():
            raise SettingsError(f"sig with f={self.f} on {width}-pixel-wide images samples the "
                                f"sinusoid only at its zeros; choose another f")

    def signal(self, width: int) -> torch.Tensor:
        """The (W,) sinusoid added to every row of every channel."""
        columns = torch.arange(width, dtype=torch.float64)
        return (self.delta * torch.sin(2 * math.pi * columns * self.f / width)).float()

    def trigger(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.signal(x.shape[-1]).to(x)).clamp(0, 1)
