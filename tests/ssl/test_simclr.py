"""pretrain_simclr lowers the SimCLR loss on tiny data, measured on fixed views."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DataLoader

from tscpurify.curve.contrastive import simclr_loss
from tscpurify.data.views import SimCLRAugment
from tscpurify.errors import SettingsError
from tscpurify.models import create_model
from tscpurify.ssl import SimCLRSettings, pretrain_simclr

from ..conftest import band_data


def fixed_view_loss(model: torch.nn.Module, loader: DataLoader) -> float:
    """The SimCLR loss with the same augmentation draws on every call (batch statistics)."""
    augment, generator = SimCLRAugment(), torch.Generator().manual_seed(5)
    loss = simclr_loss(lambda x: augment(x, generator=generator))
    model = copy.deepcopy(model).train()
    with torch.no_grad():
        return sum(float(loss(model, batch)) for batch in loader) / len(loader)


def test_pretraining_lowers_the_loss():
    data = band_data(64, 0)
    images = data.tensor_dataset(labels=False)
    fixed = DataLoader(images, batch_size=32)
    torch.manual_seed(0)
    model = create_model("simclr", width=4)
    before = fixed_view_loss(model, fixed)
    history = pretrain_simclr(model, DataLoader(images, batch_size=32, shuffle=True), epochs=12,
                              lr=1e-2, progress=False)
    assert len(history) == 12 and not model.training
    assert fixed_view_loss(model, fixed) < before - 0.1


def test_settings_are_checked():
    with pytest.raises(SettingsError, match="optimizer"):
        SimCLRSettings(optimizer="lars")
    with pytest.raises(SettingsError, match="pretrain_simclr"):
        pretrain_simclr(create_model("simclr", width=4), [], epoch=1)
