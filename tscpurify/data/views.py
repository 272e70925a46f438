"""SimCLR's view-making augmentations on batches of image tensors, without torchvision.

Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations", ICML 2020,
https://arxiv.org/abs/2002.05709, appendix A: random resized crop + horizontal flip, colour
jitter with probability 0.8. Adapted for small grey images: colour jitter keeps only brightness
and contrast (saturation and hue do not exist in one channel), no blur (the paper drops it for
CIFAR-10 too), and an optional Gaussian pixel noise. Every sample gets its own parameters, and
the crop, scale and flip are one affine warp done by `grid_sample` for the whole batch.

Example:
    augment = SimCLRAugment()
    view_1, view_2 = augment(x), augment(x)     # x: (N, C, H, W) in [0, 1]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from ..errors import SettingsError


@dataclass(frozen=True)
class SimCLRAugment:
    """One random view per image; call it twice for a SimCLR pair.

    Randomness comes from `generator` when given (a CPU generator), else from torch's global
    RNG, which TSC re-seeds at every stage, so purification stays reproducible and resumable.
    """

    scale: tuple[float, float] = field(default=(0.2, 1.0), metadata={
        "help": "range of the crop's area fraction (SimCLR: 0.08–1; 0.2 keeps enough of a "
                "28×28 image to recognise)"})
    ratio: tuple[float, float] = field(default=(3 / 4, 4 / 3), metadata={
        "help": "range of the crop's aspect ratio (as in SimCLR / Inception)"})
    flip: float = field(default=0.5, metadata={"help": "probability of a horizontal flip"})
    jitter: float = field(default=0.8, metadata={
        "help": "probability of brightness/contrast jitter (SimCLR: 0.8)"})
    brightness: float = field(default=0.4, metadata={
        "help": "brightness factor drawn from [1−b, 1+b] (SimCLR's strength-0.5 jitter: 0.4)"})
    contrast: float = field(default=0.4, metadata={
        "help": "contrast factor drawn from [1−c, 1+c], around each image's mean"})
    noise_std: float = field(default=0.0, metadata={
        "help": "std of added Gaussian pixel noise (0 = off)"})

    def __post_init__(self) -> None:
        low, high = self.scale
        if not 0 < low <= high <= 1:
            raise SettingsError(f"crop scale must satisfy 0 < low ≤ high ≤ 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise SettingsError(f"crop ratio must satisfy 0 < low ≤ high, got {self.ratio}")
        for name in ("flip", "jitter"):
            if not 0 <= getattr(self, name) <= 1:
                raise SettingsError(f"{name} is a probability, got {getattr(self, name)}")
        if not (0 <= self.brightness < 1 and 0 <= self.contrast < 1 and self.noise_std >= 0):
            raise SettingsError("brightness and contrast must lie in [0, 1) and noise_std ≥ 0; "
                                f"got {self.brightness}, {self.contrast}, {self.noise_std}")

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(N, C, H, W) pixels in [0, 1] → one augmented view, same shape, in [0, 1]."""
        if x.dim() != 4:
            raise SettingsError(f"SimCLRAugment needs (N, C, H, W) images, got {tuple(x.shape)}")
        n = x.shape[0]

        def uniform(low: float, high: float) -> torch.Tensor:
            # Drawn on the CPU so a CPU generator works for inputs on any device.
            return (torch.rand(n, generator=generator) * (high - low) + low).to(x.device)

        # 1. Crop: area fraction and aspect ratio give the crop's half-extent in [-1, 1] units;
        #    the centre is drawn so the crop stays inside the image (no zero padding leaks in).
        area = uniform(*self.scale)
        log_ratio = uniform(math.log(self.ratio[0]), math.log(self.ratio[1]))
        width = (area * log_ratio.exp()).sqrt().clamp(max=1.0)
        height = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
        cx = uniform(-1, 1) * (1 - width)
        cy = uniform(-1, 1) * (1 - height)
        # 2. Flip: a negative horizontal scale mirrors the crop about its centre.
        sign = torch.where(uniform(0, 1) < self.flip, -1.0, 1.0)
        theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
        theta[:, 0, 0], theta[:, 0, 2] = width * sign, cx
        theta[:, 1, 1], theta[:, 1, 2] = height, cy
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        # 3. Brightness then contrast, on a random subset of the images.
        jitter = (uniform(0, 1) < self.jitter).view(n, 1, 1, 1)
        bright = uniform(1 - self.brightness, 1 + self.brightness).view(n, 1, 1, 1)
        contrast = uniform(1 - self.contrast, 1 + self.contrast).view(n, 1, 1, 1)
        jittered = (out * bright).clamp(0, 1)
        mean = jittered.mean(dim=(1, 2, 3), keepdim=True)
        jittered = ((jittered - mean) * contrast + mean).clamp(0, 1)
        out = torch.where(jitter, jittered, out)
        # 4. Optional pixel noise, drawn on the CPU for the same reason as above.
        if self.noise_std > 0:
            noise = torch.randn(out.shape, generator=generator).to(x.device, x.dtype)
            out = (out + self.noise_std * noise).clamp(0, 1)
        return out
