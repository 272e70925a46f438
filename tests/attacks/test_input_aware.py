"""Input-Aware's defining properties: every input gets its own trigger from a sparse mask, the
surrogate trained with the generators obeys a trigger only on its own input, backdoor samples
go to the target while cross-trigger samples keep their labels, and the record alone
rebuilds the generators."""

import json

import pytest
import torch

from tscpurify.attacks import attack_from_record, create_attack, poison_dataset
from tscpurify.attacks.base import to_pixels, to_uint8
from tscpurify.attacks.input_aware import InputAware, stamp
from tscpurify.errors import SettingsError
from tscpurify.evaluation import predict

from .conftest import banded

# A CPU budget of about two seconds: 400 images, a few passes for each generator.
TINY = {"mask_epochs": 3, "epochs": 8, "batch_size": 32}


@pytest.fixture(scope="module")
def prepared(learnable):
    return InputAware(target=1, **TINY).prepare(learnable, seed=0)


def test_each_input_gets_its_own_trigger(prepared, learnable):
    x = to_pixels(learnable.images[:64])
    other = x.roll(1, dims=0)  # every input paired with a different one
    masks, patterns = prepared.mask(x), prepared.pattern(x)
    assert masks.shape == (64, 1, 16, 16) and patterns.shape == x.shape
    assert torch.allclose(prepared.trigger(x), x + masks * (patterns - x))
    # Masks of two inputs mostly cover different pixels: on average the pixels where they
    # differ outnumber those one mask covers. Patterns differ everywhere.
    mask_change = (masks - masks.roll(1, dims=0)).abs().flatten(1).sum(1)
    assert mask_change.mean() > masks.flatten(1).sum(1).mean() and (mask_change > 0.01).all()
    pattern_change = (patterns - patterns.roll(1, dims=0)).abs().flatten(1).mean(1)
    assert (pattern_change > 0.01).all(), "two inputs share a pattern"
    # x1 stamped with x2's trigger is not x1 with its own trigger.
    change = (prepared.trigger(x) - prepared.cross(x, other)).abs().flatten(1).sum(1)
    assert change.mean() > 1 and (change > 0.01).all()


def test_masks_are_sparse_near_the_density(prepared, learnable):
    cover = prepared.mask(to_pixels(learnable.images)).flatten(1).mean(1)
    assert 0.5 * prepared.density < cover.mean() < 1.5 * prepared.density
    assert cover.max() < 4 * prepared.density
    # Nearly binary, as the reference's threshold makes them.
    mask = prepared.mask(to_pixels(learnable.images[:32]))
    assert ((mask < 0.05) | (mask > 0.95)).float().mean() > 0.9


def test_surrogate_obeys_a_trigger_only_on_its_own_input(prepared, learnable):
    x, y = to_pixels(learnable.images), learnable.labels
    victims = y != 1
    model = prepared.surrogate
    assert (predict(model, x) == y).float().mean() > 0.8
    assert (predict(model, prepared.trigger(x[victims])) == 1).float().mean() > 0.8
    crossed = prepared.cross(x[victims], x.roll(1, dims=0)[victims])
    assert (predict(model, crossed) == y[victims]).float().mean() > 0.5


def test_poisoning_counts_labels_and_triggers(prepared, learnable):
    poisoned, indices = poison_dataset(learnable, prepared, seed=0)
    x = to_pixels(learnable.images)
    backdoor = torch.zeros(len(learnable), dtype=torch.bool)
    backdoor[indices] = True
    changed = (poisoned.images != learnable.images).flatten(1).any(1)
    crossed = (changed & ~backdoor).nonzero().flatten()
    assert len(indices) == 40 and len(crossed) == 40  # rate 0.1 of 400, cross_ratio 1
    assert (learnable.labels[indices] != 1).all() and (poisoned.labels[indices] == 1).all()
    assert torch.equal(poisoned.images[indices], to_uint8(prepared.trigger(x[indices])))
    assert torch.equal(poisoned.labels[~backdoor], learnable.labels[~backdoor])
    # Each cross sample carries the trigger of another training image, not its own.
    own = to_uint8(prepared.trigger(x[crossed]))
    assert (poisoned.images[crossed] != own).flatten(1).any(1).all()
    masks, patterns = prepared.mask(x), prepared.pattern(x)
    for i in crossed.tolist():
        stamped = to_uint8(stamp(x[i], masks, patterns))  # x_i with every image's trigger
        match = ((stamped.int() - poisoned.images[i].int()).abs() <= 1).flatten(1).all(1)
        match[i] = False
        assert match.any(), f"cross sample {i} carries no other image's trigger"
    assert len(learnable.labels[crossed].unique()) == learnable.num_classes


def test_all_to_all_sends_each_class_to_the_next(learnable):
    attack = InputAware(all_to_all=True, mask_epochs=1, epochs=1).prepare(learnable, seed=0)
    poisoned, indices = poison_dataset(learnable, attack, seed=0)
    assert torch.equal(poisoned.labels[indices], (learnable.labels[indices] + 1) % 4)


def test_record_rebuilds_the_trigger_exactly(prepared):
    record = json.loads(json.dumps(prepared.record()))
    assert "surrogate" not in record and record["channels"] == 1
    assert len(record["weights"]) < 3000
    rebuilt = attack_from_record(record)
    assert rebuilt == prepared and rebuilt.surrogate is None
    x = torch.rand(16, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(rebuilt.trigger(x), prepared.trigger(x))
    assert rebuilt.prepare(banded(), seed=1) is rebuilt, "a fitted attack is not fitted again"


def test_rgb_32px_images():
    data = banded(n=128, size=32, channels=3)
    attack = InputAware(mask_epochs=1, epochs=1, batch_size=64).prepare(data, seed=0)
    x = to_pixels(data.images[:8])
    out = attack.trigger(x)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out, x)
    assert len(attack.weights) < 3000
    rebuilt = attack_from_record(json.loads(json.dumps(attack.record())))
    assert torch.equal(rebuilt.trigger(x), out)


def test_unfitted_and_mismatched_use_is_refused(prepared):
    x = torch.rand(2, 1, 16, 16)
    for use in (InputAware().trigger, InputAware().mask, InputAware().pattern):
        with pytest.raises(SettingsError, match="prepare"):
            use(x)
    with pytest.raises(SettingsError, match="1-channel"):
        prepared.trigger(torch.rand(2, 3, 16, 16))
    with pytest.raises(SettingsError, match="flat list of 1474 numbers"):
        create_attack("input_aware", channels=1, weights=[0.0] * 10)
    with pytest.raises(SettingsError, match="both channels and weights"):
        create_attack("input_aware", weights=list(prepared.weights))


@pytest.mark.parametrize("kwargs", [{"density": 0}, {"density": 1}, {"cross_ratio": -1},
                                    {"width": 0}, {"epochs": -1}, {"lr": 0}])
def test_bad_settings(kwargs):
    with pytest.raises(SettingsError, match="input_aware needs"):
        create_attack("input_aware", **kwargs)


def test_too_many_cross_samples():
    with pytest.raises(SettingsError, match="cross-trigger samples"):
        poison_dataset(banded(n=100), InputAware(rate=0.4, cross_ratio=2, mask_epochs=1,
                                                 epochs=1), seed=0)
