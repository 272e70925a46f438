"""Tiny data written in the real on-disk formats, so loaders are tested as users use them."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

# One thread: tiny models gain nothing from two, and spin-waiting threads slow a busy machine 10×.
torch.set_num_threads(1)


def write_idx(path: Path, array: np.ndarray) -> None:
    codes = {np.dtype(np.uint8): 0x08}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(
        f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.tobytes())


def synthetic_images(n: int, classes: int, size: int, channels: int, seed: int):
    """Learnable images: each class lights up its own horizontal band, plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    rng.shuffle(labels)
    images = rng.integers(0, 60, (n, channels, size, size)).astype(np.float32)
    band = size // classes
    for c in range(classes):
        images[labels == c, :, c * band:(c + 1) * band, 1:-4] += 150
    return images.clip(0, 255).astype(np.uint8), labels.astype(np.uint8)


@pytest.fixture(scope="session")
def fmnist_root(tmp_path_factory) -> Path:
    """A Fashion-MNIST-format folder (gzipped IDX) with 600 train / 200 test 28×28 images."""
    root = tmp_path_factory.mktemp("fmnist")
    for prefix, n, seed in (("train", 600, 0), ("t10k", 200, 1)):
        images, labels = synthetic_images(n, 10, 28, 1, seed)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images[:, 0])
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


def band_data(n: int, seed: int):
    """Learnable 28×28 grey ImageData: class c lights up its own horizontal band (plus noise);
    the encoders' tests (ssl, probes, BadEncoder) learn from it."""
    from tscpurify.data import ImageData

    images, labels = synthetic_images(n, 10, 28, 1, seed)
    return ImageData(torch.from_numpy(images), torch.from_numpy(labels).long(),
                     tuple(str(c) for c in range(10)))


@pytest.fixture(scope="session")
def bands():
    """300 training and 200 test band images."""
    return band_data(300, 0), band_data(200, 1)


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fresh norms (weight 1, bias 0, mean 0, var 1), attention biases (0) and ConvNeXt's layer
    scale (1e-6) are constant or nearly silent, so every permutation leaves them unchanged and
    a wrongly permuted axis would stay hidden: random values, seeded. Returns the model, in
    eval mode."""
    g = torch.Generator().manual_seed(seed)

    def fill(t: torch.Tensor, centre: float, spread: float) -> None:
        t.copy_(centre + spread * torch.randn(t.shape, generator=g))

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)):
                fill(m.weight, 1.0, 0.3)
                fill(m.bias, 0.0, 0.3)
            if isinstance(m, nn.BatchNorm2d):
                fill(m.running_mean, 0.0, 0.3)
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
            if isinstance(m, nn.MultiheadAttention):
                fill(m.in_proj_bias, 0.0, 0.3)
                fill(m.out_proj.bias, 0.0, 0.3)
            if hasattr(m, "gamma"):
                fill(m.gamma, 1.0, 0.3)
    return model.eval()
