"""SimCLRAugment: identity and flip oracles, range, seeding, and settings checks."""

from __future__ import annotations

import pytest
import torch

from tscpurify.data.views import SimCLRAugment
from tscpurify.errors import SettingsError

IDENTITY = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=0.0, jitter=0.0)


@pytest.fixture
def x() -> torch.Tensor:
    return torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def test_full_crop_without_flip_or_jitter_is_the_identity(x):
    assert torch.allclose(SimCLRAugment(**IDENTITY)(x), x, atol=1e-5)


def test_a_certain_flip_mirrors_every_image(x):
    flipped = SimCLRAugment(**{**IDENTITY, "flip": 1.0})(x)
    assert torch.allclose(flipped, x.flip(-1), atol=1e-5)


def test_views_stay_in_range_differ_and_repeat_with_a_seeded_generator(x):
    augment = SimCLRAugment(noise_std=0.05)
    a = augment(x, generator=torch.Generator().manual_seed(1))
    b = augment(x, generator=torch.Generator().manual_seed(1))
    c = augment(x, generator=torch.Generator().manual_seed(2))
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)
    assert not torch.allclose(a, c) and not torch.allclose(a, x)


def test_a_quarter_area_crop_zooms_in_twofold():
    # On a horizontal ramp, a crop of half the width stretched back to 28 columns steps half
    # as far per output pixel. The outermost output columns are left out: a crop touching the
    # image's edge samples up to half a pixel beyond the outer pixel centre, where border
    # padding holds the value (with the crop position drawn at random, that happened in about
    # one run in six).
    x = torch.linspace(0, 1, 28).expand(4, 1, 28, 28).contiguous()
    zoomed = SimCLRAugment(**{**IDENTITY, "scale": (0.25, 0.25)})(x)
    inner = (..., slice(1, -1))
    assert torch.allclose(zoomed.diff(dim=-1)[inner], x.diff(dim=-1)[inner] / 2, atol=1e-5)


@pytest.mark.parametrize("bad", [dict(scale=(0.0, 1.0)), dict(scale=(0.5, 1.2)),
                                 dict(ratio=(2.0, 1.0)), dict(flip=1.5), dict(jitter=-0.1),
                                 dict(brightness=1.0), dict(noise_std=-1.0)])
def test_out_of_range_settings_are_refused(bad):
    with pytest.raises(SettingsError):
        SimCLRAugment(**bad)


def test_images_must_be_a_batch():
    with pytest.raises(SettingsError, match="N, C, H, W"):
        SimCLRAugment()(torch.rand(1, 28, 28))
