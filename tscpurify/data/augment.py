"""Light training augmentation on batches of tensors (no torchvision): random crop with
zero padding and horizontal flip, applied per sample with one vectorised gather."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def random_crop_flip(x: torch.Tensor, padding: int = 2, flip: bool = True,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Shift each image by up to `padding` pixels (zero fill) and mirror half of them."""
    n, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    if flip:
        mirror = (torch.rand(n, generator=generator) < 0.5).to(x.device)[:, None, None, None]
        cols = torch.where(mirror, cols.flip(-1), cols)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channels = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, channels, rows, cols]


def mix_images(x: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """Mixup of the images alone: each image blended with another of the batch, one weight λ ~
    Beta(alpha, alpha) per batch (Zhang et al., ICLR 2018). Without labels to mix, it serves
    a loss whose targets come from the mixed images themselves (a teacher's outputs)."""
    lam = torch.distributions.Beta(alpha, alpha).sample().to(x.device)
    return lam * x + (1 - lam) * x[torch.randperm(len(x)).to(x.device)]
