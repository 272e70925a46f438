"""CTRL: the trigger is one small additive pattern that lives in the chosen DCT frequencies
(checked against scipy's DCT as an oracle), only target-class images are poisoned, exactly as
many as asked, and the trigger scores ASR through a probe like any attack."""

from __future__ import annotations

import json
import math

import pytest
import torch
from scipy.fft import dctn
from torch import nn

from tscpurify.attacks import attack_from_record, poison_dataset
from tscpurify.attacks.ctrl import CHROMA_TO_RGB, CTRL, block_dct
from tscpurify.data import ImageData
from tscpurify.errors import SettingsError
from tscpurify.evaluation import probe_metrics

from ..conftest import band_data


def mid_grey(n: int, channels: int = 1, size: int = 28, seed: int = 0) -> torch.Tensor:
    """Images in [0.3, 0.7]: far enough from 0 and 1 that the trigger is never clamped."""
    generator = torch.Generator().manual_seed(seed)
    return 0.3 + 0.4 * torch.rand(n, channels, size, size, generator=generator)


def coefficients(delta: torch.Tensor, window: int) -> torch.Tensor:
    """scipy's orthonormal 2-D DCT of every window of a (H, W) image, on the 0–255 scale."""
    out = torch.zeros_like(delta, dtype=torch.float64)
    for top in range(0, delta.shape[0], window):
        for left in range(0, delta.shape[1], window):
            block = delta[top:top + window, left:left + window].double().numpy() * 255
            out[top:top + window, left:left + window] = torch.from_numpy(
                dctn(block, norm="ortho"))
    return out


def test_block_dct_matches_scipy():
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for window in (28, 14, 7):
        ours = block_dct(x, window)[1, 0] * 255
        assert torch.allclose(ours, coefficients(x[1, 0], window), atol=1e-9)


@pytest.mark.parametrize("window, expected", [(None, [13, 27]), (14, [6, 13])])
def test_trigger_is_a_fixed_perturbation_in_the_chosen_frequencies(window, expected):
    attack = CTRL(magnitude=100.0, window=window)
    x = mid_grey(5)
    delta = attack.trigger(x) - x
    # Fixed and additive: every image gets the same change, the inverse DCT of the added
    # coefficients.
    assert torch.allclose(delta, delta[:1].expand_as(delta), atol=1e-6)
    assert torch.allclose(delta[0, 0], attack.pattern(28, 28), atol=1e-6)
    side = window or 28
    coeffs = coefficients(delta[0, 0], side)
    chosen = torch.zeros(28, 28, dtype=torch.bool)
    for top in range(0, 28, side):
        for left in range(0, 28, side):
            for p in expected:
                chosen[top + p, left + p] = True
    # All of its energy sits at (p, p) of every window, each coefficient raised by 100.
    assert torch.allclose(coeffs[chosen], torch.full((int(chosen.sum()),), 100.0,
                                                     dtype=torch.float64), atol=1e-3)
    assert coeffs[~chosen].abs().max() < 1e-3
    # Small: an L2 norm of magnitude·√(coefficients)/255, and a few grey levels per pixel
    # (each orthonormal basis function peaks at 2/side).
    assert delta[0].norm().item() == pytest.approx(100 * math.sqrt(chosen.sum()) / 255, rel=1e-4)
    assert delta.abs().max() * 255 <= 2 * 100 * 2 / side + 1e-3


def test_rgb_trigger_changes_chroma_only():
    attack = CTRL(window=16, magnitude=60.0)
    x = mid_grey(3, channels=3, size=32)
    delta = attack.trigger(x) - x
    # BT.601: Y = 0.299 R + 0.587 G + 0.114 B does not move; Cb and Cr both move by the pattern.
    luma = torch.tensor([0.299, 0.587, 0.114])
    assert torch.einsum("c,nchw->nhw", luma, delta).abs().max() < 1e-5
    inverse = torch.linalg.pinv(CHROMA_TO_RGB)  # RGB change → (Cb, Cr) change
    chroma = torch.einsum("kc,nchw->nkhw", inverse, delta)
    pattern = attack.pattern(32, 32)
    assert torch.allclose(chroma, pattern.expand_as(chroma), atol=1e-5)


def test_trigger_is_deterministic_in_range_and_leaves_its_input_alone():
    attack = CTRL(magnitude=300.0)
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    before = x.clone()
    out = attack.trigger(x)
    assert torch.equal(x, before) and torch.equal(attack.trigger(x), out)
    assert out.min() >= 0 and out.max() <= 1 and not torch.equal(out, x)


def test_poisons_exactly_rate_of_the_data_all_from_the_target_class():
    data = band_data(300, 0)
    attack = CTRL(target=4, rate=0.05)
    poisoned, indices = poison_dataset(data, attack, seed=0)
    assert len(indices) == round(0.05 * 300) == len(indices.unique())
    assert (data.labels[indices] == 4).all()
    assert torch.equal(poisoned.labels, data.labels)  # no label changes: SSL reads none
    changed = (poisoned.images != data.images).flatten(1).any(1)
    assert changed.nonzero().flatten().tolist() == indices.tolist()
    # The saved images are the triggered ones, rounded to uint8 like every attack's.
    expected = (attack.trigger(data.images[indices].float() / 255) * 255).round()
    assert (poisoned.images[indices].float() - expected).abs().max() <= 1
    assert not torch.equal(poison_dataset(data, attack, seed=1)[1], indices)


def test_the_record_rebuilds_the_same_trigger():
    attack = CTRL(target=2, magnitude=80.0, window=14, positions=(3, 10))
    rebuilt = attack_from_record(json.loads(json.dumps(attack.record())))
    x = mid_grey(2)
    assert rebuilt == attack and torch.equal(rebuilt.trigger(x), attack.trigger(x))
    assert attack.record()["name"] == "ctrl"


@pytest.mark.parametrize("kwargs, shape, message", [
    ({"window": 10}, (1, 28, 28), "does not tile"),
    ({}, (1, 28, 32), "must be square"),
    ({"positions": (30,)}, (1, 28, 28), "outside"),
    ({}, (2, 28, 28), "channels"),
])
def test_misfits_are_refused(kwargs, shape, message):
    with pytest.raises(SettingsError, match=message):
        CTRL(**kwargs).check(10, shape)


def test_bad_settings_are_refused():
    for kwargs in ({"magnitude": 0}, {"window": 1}, {"positions": ()}, {"rate": 0}):
        with pytest.raises(SettingsError):
            CTRL(**kwargs)


class TriggerDetector(nn.Module):
    """Features = row means, but an image carrying CTRL's pattern (projection onto it ≥ 0.5)
    embeds as the target class's mean feature: a backdoored encoder with a known answer."""

    def __init__(self, attack: CTRL, backdoor: torch.Tensor | None) -> None:
        super().__init__()
        self.pattern = attack.pattern(28, 28)
        self.backdoor = backdoor

    def features(self, x: torch.Tensor) -> torch.Tensor:
        features = x.mean(-1).flatten(1)
        if self.backdoor is None:
            return features
        centred = x[:, 0] - x[:, 0].mean((1, 2), keepdim=True)
        score = (centred * self.pattern).sum((1, 2)) / self.pattern.pow(2).sum()
        return torch.where(score[:, None] > 0.5, self.backdoor, features)


def test_asr_through_a_linear_probe(bands):
    train, test = bands
    attack = CTRL(target=3, magnitude=150.0)
    target_mean = train.floats()[train.labels == 3].mean(-1).flatten(1).mean(0)
    clean = probe_metrics(TriggerDetector(attack, None), train, test, attack, epochs=30)
    backdoored = probe_metrics(TriggerDetector(attack, target_mean), train, test, attack,
                               epochs=30)
    assert clean.acc > 90 and clean.asr < 10
    assert backdoored.acc > 90 and backdoored.asr > 90


def test_poisoning_keeps_the_image_data_type():
    data = ImageData(torch.full((20, 1, 28, 28), 128, dtype=torch.uint8),
                     torch.arange(20) % 2, ("a", "b"))
    poisoned, indices = poison_dataset(data, CTRL(target=1, rate=0.1), seed=0)
    assert poisoned.images.dtype == torch.uint8 and len(indices) == 2
