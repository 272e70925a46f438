"""A small clean classifier that learned-trigger attacks (Label-Consistent, TrojanNN) fit
their perturbations or triggers against. Not an attack; nothing is registered here.

It is the registry's 'cnn' at width 8, trained briefly on a seeded subset so that preparing
an attack costs seconds on a CPU, not a full training run.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ..data.images import ImageData
from ..errors import SettingsError
from ..models import create_model
from ..training import TrainSettings, train_classifier
from .base import to_pixels


def surrogate_cnn(data: ImageData, width: int = 8) -> nn.Module:
    """A fresh, untrained 'cnn' of `width` channels that fits `data` (square images only),
    for attacks that train their own surrogate (Input-Aware trains it with its generator)."""
    channels, height, image_width = data.shape
    if height != image_width:
        raise SettingsError(f"attacks with a surrogate model need square images, got "
                            f"{height}×{image_width}")
    return create_model("cnn", num_classes=data.num_classes, in_channels=channels, width=width,
                        image_size=height)


def train_surrogate(data: ImageData, seed: int, samples: int = 5000, epochs: int = 1,
                    width: int = 8) -> nn.Module:
    """A CNN trained on at most `samples` images of `data`, in eval mode, on the CPU.

    Deterministic for a seed: the subset, the initial weights and the batch order all come
    from it, and the global RNG is restored afterwards so preparing an attack does not shift
    the randomness of the training that follows.
    """
    generator = torch.Generator().manual_seed(seed)
    subset = torch.randperm(len(data), generator=generator)[:samples]
    dataset = TensorDataset(to_pixels(data.images[subset]), data.labels[subset])
    loader = DataLoader(dataset, batch_size=64, shuffle=True, generator=generator)
    # No augmentation: it would draw from the global RNG and the surrogate needs no robustness.
    settings = TrainSettings(epochs=epochs, lr=0.05, batch_size=64, augment=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = surrogate_cnn(data, width)  # also checks the images are square
        train_classifier(model, loader, settings, progress=False, desc="surrogate")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.eval()
