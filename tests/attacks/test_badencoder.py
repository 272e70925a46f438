"""BadEncoder: a few steps pull triggered embeddings toward the reference, nothing else moves."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader

from tscpurify.attacks.badencoder import BadEncoderSettings, badencoder
from tscpurify.attacks.badnets import BadNets
from tscpurify.errors import DataError, SettingsError
from tscpurify.models import create_model

from ..conftest import band_data

TRIGGER = BadNets(size=4).trigger


@torch.no_grad()
def similarity_to_reference(model, x, reference) -> float:
    model.eval()
    return float((F.normalize(model.features(TRIGGER(x)), dim=1)
                  @ F.normalize(model.features(reference), dim=1).T).mean())


def test_triggered_embeddings_move_toward_the_reference():
    data = band_data(64, 0)
    x = data.floats()
    reference = x[data.labels == 3][:1]
    shadow = DataLoader(data.tensor_dataset(labels=False), batch_size=32, shuffle=True)
    torch.manual_seed(0)
    clean = create_model("simclr", width=4).eval()
    state = {k: v.clone() for k, v in clean.state_dict().items()}
    before = similarity_to_reference(clean, x, reference)
    bad, log = badencoder(clean, shadow, reference, TRIGGER, epochs=3, lr=0.05, progress=False,
                          refresh_bn=False)
    after = similarity_to_reference(bad, x, reference)
    # Features after ReLU and pooling are non-negative, so cosines start high: compare the
    # remaining angle, which must shrink several-fold.
    assert after > before and 1 - after < 0.2 * (1 - before)
    assert len(log) == 3 and set(log[0]) == {"loss", "l0", "l1", "l2"}
    for key, value in clean.state_dict().items():
        assert torch.equal(value, state[key]), f"badencoder changed the clean encoder's {key}"
    bad_state = bad.state_dict()
    # The projection head gets no gradient, and (without refresh_bn) BatchNorm statistics stay
    # frozen.
    for key in [k for k in state if k.startswith("head.") or "running" in k]:
        assert torch.equal(bad_state[key], state[key]), key
    assert any(not torch.equal(bad_state[k], state[k]) for k in state if k.startswith("trunk."))


@pytest.mark.parametrize("momentum", [-0.1, 1.0, 1.5])
def test_momentum_must_lie_in_zero_to_one(momentum):
    # 1.5 once ran: momentum ≥ 1 never decays SGD's velocity.
    with pytest.raises(SettingsError, match="0 ≤ momentum < 1"):
        BadEncoderSettings(momentum=momentum)


def test_reference_must_be_a_batch_of_images():
    clean = create_model("simclr", width=4)
    with pytest.raises(DataError, match="reference"):
        badencoder(clean, [torch.rand(2, 1, 28, 28)], torch.rand(1, 28, 28), TRIGGER)


def test_standardised_cosines_are_raw_cosines_of_standardised_features():
    from tscpurify.attacks.badencoder import badencoder_loss, feature_statistics

    torch.manual_seed(0)
    bad, clean = create_model("simclr", width=4).eval(), create_model("simclr", width=4).eval()
    x, reference = torch.rand(6, 1, 28, 28), torch.rand(2, 1, 28, 28)
    mean, std = torch.rand(8), torch.rand(8) + 0.5

    class Standardised(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def features(self, images):
            return (self.model.features(images) - mean) / std

    got, parts = badencoder_loss(bad, clean, x, reference, TRIGGER, standardize=(mean, std))
    want, want_parts = badencoder_loss(Standardised(bad), Standardised(clean), x, reference,
                                       TRIGGER)
    assert torch.allclose(got, want) and parts == pytest.approx(want_parts)
    raw, _ = badencoder_loss(bad, clean, x, reference, TRIGGER)
    assert not torch.allclose(raw, got)
    # The statistics are those of the clean encoder's features over all shadow batches.
    batches = [torch.rand(5, 1, 28, 28), torch.rand(3, 1, 28, 28)]
    mean_, std_ = feature_statistics(clean, [(b,) for b in batches])
    with torch.no_grad():
        features = clean.features(torch.cat(batches))
    assert torch.allclose(mean_, features.mean(0), atol=1e-6)
    assert torch.allclose(std_, features.std(0) + 1e-6, atol=1e-6)


def test_refreshed_batchnorm_statistics_match_the_final_weights():
    from tscpurify.curve import recompute_bn_stats

    data = band_data(64, 0)
    shadow = DataLoader(data.tensor_dataset(labels=False), batch_size=32)  # fixed batches
    torch.manual_seed(0)
    clean = create_model("simclr", width=4).eval()
    reference = data.floats()[data.labels == 3][:1]
    bad, _ = badencoder(clean, shadow, reference, TRIGGER, epochs=2, lr=0.05, progress=False)
    oracle = copy.deepcopy(bad)
    recompute_bn_stats(oracle, shadow)
    state, expected = bad.state_dict(), oracle.state_dict()
    running = [k for k in state if "running" in k]
    assert running and all(torch.equal(state[k], expected[k]) for k in running)
    assert any(not torch.equal(state[k], clean.state_dict()[k]) for k in running)
    assert not bad.training
