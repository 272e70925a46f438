"""CTRL: backdoor a self-supervised encoder by poisoning 1% of its pre-training images with a
frequency-domain trigger.

Li, Pang, Xi, Du, Ji, Yao & Wang, "An Embarrassingly Simple Backdoor Attack on Self-supervised
Learning", ICCV 2023, https://arxiv.org/abs/2210.07346 (code: github.com/meet-cjli/CTRL). The
attacker adds a fixed magnitude to a few DCT coefficients of some target-class images and lets
the victim pre-train SimCLR on the data: augmentations do not separate the trigger from the
target class, so the encoder learns to embed any triggered image near the target class, and a
linear probe trained on clean labelled data sends it there. Pre-training reads no label; the
attacker uses labels only to pick target-class images.

The paper's defaults (CIFAR-10, 32×32 RGB): convert to YCbCr (the code: YUV), take the orthonormal
2-D DCT of each 32×32 window of the two chroma channels on the 0–255 scale, add magnitude 100 to
the coefficients (15, 15) and (31, 31) of every window (a mid and the highest frequency), invert,
clamp; poison ratio 1% of the whole training set, all from the target class; ASR on triggered
non-target test images through a linear probe or kNN.

Adapted here:
- Grey images (Fashion-MNIST) have no chroma: the trigger goes into the one (luminance) channel.
  RGB images get the paper's chroma trigger (BT.601 YCbCr; the conversion is affine, so adding to
  Cb/Cr equals adding a fixed RGB pattern, which is what is done).
- The window defaults to the whole image (the paper's 32 is CIFAR's whole image; 28×28 is not a
  multiple of 32), and the default positions follow the window: (w/2 − 1, w − 1) on the
  diagonal, i.e. (15, 31) at w = 32 as in the paper and (13, 27) for Fashion-MNIST.
- Because the DCT is linear, the trigger is one fixed additive pattern (the inverse DCT of the
  added coefficients), added to the pixels and clamped to [0, 1]; the paper's per-image
  DCT → add → inverse DCT gives the same sum before its clamp. Saved poisoned images are
  rounded to uint8 like every attack's.
- Poisoned images are drawn (seeded) among the target class instead of taking its first ones.
At magnitude 100 on a 28×28 window each coefficient moves a pixel by at most 100·2/28 ≈ 7 grey
levels, so the trigger changes no pixel by more than 15/255 (an L2 norm of 100·√2/255 ≈ 0.55).

Args: target=0, rate=0.01 (share of the whole pre-training set), magnitude=100.0 (0–255 scale,
orthonormal DCT), window=None (the whole image), positions=None ((w/2 − 1, w − 1)). Shapes:
(N, C, H, W) pixels in [0, 1], C = 1 or 3, H and W multiples of the window.

Registered as "ctrl", so a run folder's record rebuilds it like any attack; on a supervised
classifier it is a clean-label poisoning of the target class.

Example:
    attack = CTRL(target=0)
    poisoned, indices = poison_dataset(pretrain_data, attack, seed=0)   # 1%, target class only
    probe_metrics(encoder, train_data, test_data, attack)                # ACC, ASR, RA
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import SettingsError
from .base import Attack, frozen
from .registered import ATTACKS

# BT.601 full-range YCbCr → RGB (as in JPEG): the columns that multiply Cb and Cr. A change δ of
# (Cb, Cr) changes the RGB pixels by CHROMA_TO_RGB @ δ, whatever the pixel.
CHROMA_TO_RGB = torch.tensor([[0.0, 1.402], [-0.344136, -0.714136], [1.772, 0.0]])


def dct_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The orthonormal DCT-II matrix D (n × n): coefficients = D @ x, and x = D.T @ coefficients.

    For an image block X the 2-D coefficients are D @ X @ D.T (norm='ortho', as in the paper's
    code and in scipy).
    """
    k = torch.arange(n, dtype=dtype)[:, None]
    i = torch.arange(n, dtype=dtype)[None, :]
    matrix = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2 / n)
    matrix[0] /= math.sqrt(2)
    return matrix


def block_dct(x: torch.Tensor, window: int) -> torch.Tensor:
    """2-D orthonormal DCT of every window × window block of (..., H, W); same shape."""
    *lead, height, width = x.shape
    d = dct_matrix(window, x.dtype).to(x.device)
    blocks = x.reshape(*lead, height // window, window, width // window, window)
    coefficients = torch.einsum("ki,...aibj,lj->...akbl", d, blocks, d)
    return coefficients.reshape(x.shape)


@ATTACKS.register("ctrl")
@dataclass(frozen=True)
class CTRL(Attack):
    """Args: magnitude: added to each chosen coefficient (0–255 scale, orthonormal DCT);
    window: DCT window side (None = the whole image, which must then be square);
    positions: diagonal coefficient indices (p, p) within every window (None = (w/2 − 1, w − 1)).
    """

    name: ClassVar[str] = "ctrl"
    # Poisons target-class images and changes no label: pre-training reads none anyway.
    clean_label: ClassVar[bool] = True
    rate: float = 0.01
    magnitude: float = 100.0
    window: int | None = None
    positions: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.positions is not None:
            object.__setattr__(self, "positions", frozen(list(self.positions)))
        if self.window is not None and self.window < 2:
            raise SettingsError(f"ctrl window must be ≥ 2 pixels, got {self.window}")
        if self.magnitude <= 0:
            raise SettingsError(f"ctrl magnitude must be > 0, got {self.magnitude}")
        if self.positions is not None and (not self.positions or min(self.positions) < 0):
            raise SettingsError(f"ctrl positions must be non-empty and ≥ 0, got {self.positions}")

    def window_for(self, height: int, width: int) -> int:
        """The DCT window side for (height, width) images; SettingsError if it does not tile."""
        if self.window is None:
            if height != width:
                raise SettingsError(f"ctrl's default window is the whole image, which must be "
                                    f"square; got {height}×{width}: pass window=N that divides "
                                    f"both sides")
            return height
        if height % self.window or width % self.window:
            raise SettingsError(f"ctrl window {self.window} does not tile {height}×{width} "
                                f"images; choose a divisor of both sides")
        return self.window

    def frequencies(self, window: int) -> tuple[int, ...]:
        """The diagonal DCT indices p that get the trigger, as (p, p) in every window."""
        positions = self.positions or (window // 2 - 1, window - 1)
        if max(positions) >= window:
            raise SettingsError(f"ctrl positions {positions} lie outside the {window}×{window} "
                                f"DCT window")
        return tuple(sorted(set(positions)))

    def check(self, num_classes: int, image_shape: tuple[int, ...]) -> None:
        super().check(num_classes, image_shape)
        if image_shape[0] not in (1, 3):
            raise SettingsError(f"ctrl handles grey (1) or RGB (3) images, got "
                                f"{image_shape[0]} channels")
        self.frequencies(self.window_for(*image_shape[-2:]))

    def pattern(self, height: int, width: int) -> torch.Tensor:
        """The additive (height, width) perturbation in [0, 1] pixel units of one channel
        (luminance for grey images, each chroma channel for RGB): the inverse DCT of
        `magnitude`/255 at (p, p) of every window."""
        window = self.window_for(height, width)
        coefficients = torch.zeros(window, window, dtype=torch.float64)
        for p in self.frequencies(window):
            coefficients[p, p] = self.magnitude / 255
        d = dct_matrix(window)
        block = d.T @ coefficients @ d
        return block.repeat(height // window, width // window).float()

    def trigger(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-3] not in (1, 3):
            raise SettingsError(f"ctrl handles grey (1) or RGB (3) images, got {x.shape[-3]} "
                                f"channels")
        delta = self.pattern(*x.shape[-2:]).to(x)
        if x.shape[-3] == 3:
            # The same pattern in Cb and Cr (the paper's channels 1 and 2), seen in RGB.
            delta = CHROMA_TO_RGB.sum(1).to(x)[:, None, None] * delta
        return (x + delta).clamp(0, 1)
