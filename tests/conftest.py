"""Tiny data written in the real on-disk formats, so loaders are tested as users use them."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

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
