"""Tiny learnable data and a tiny trained CNN for the baseline defenses' tests."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tscpurify.models import create_model
from tscpurify.training import TrainSettings, train_classifier

CLASSES = 4
SIZE = 12


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and the machine is shared with a long
    benchmark: run single-threaded and restore the setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def band_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """1×12×12 images in [0, 1]; class c lights up rows 3c..3c+2, plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % CLASSES
    images = torch.rand(n, 1, SIZE, SIZE, generator=g) * 0.3
    band = SIZE // CLASSES
    for c in range(CLASSES):
        images[labels == c, :, c * band:(c + 1) * band, 1:-3] += 0.6
    return images.clamp(0, 1), labels


@pytest.fixture(scope="session")
def band_data() -> TensorDataset:
    return TensorDataset(*band_images(160, seed=0))


@pytest.fixture
def loader(band_data) -> DataLoader:
    return DataLoader(band_data, batch_size=32, shuffle=True,
                      generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def _trained_cnn(band_data) -> nn.Module:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = create_model("cnn", num_classes=CLASSES, width=4, image_size=SIZE)
    data = DataLoader(band_data, batch_size=32, shuffle=True,
                      generator=torch.Generator().manual_seed(2))
    train_classifier(model, data, TrainSettings(epochs=6, lr=0.05, augment=False),
                     progress=False)
    torch.set_num_threads(before)
    return model.eval()


@pytest.fixture
def trained_cnn(_trained_cnn) -> nn.Module:
    """A fresh copy per test of a width-4 CNN trained on the band images (high accuracy)."""
    return copy.deepcopy(_trained_cnn)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture
def adam_calls(monkeypatch) -> list[dict]:
    """The keyword arguments of every torch.optim.Adam built while the test runs (the
    optimiser still works): to hold a defense to its reference's optimiser."""
    made: list[dict] = []
    real = torch.optim.Adam

    def recording(params, **kwargs):
        made.append(kwargs)
        return real(params, **kwargs)

    monkeypatch.setattr(torch.optim, "Adam", recording)
    return made
