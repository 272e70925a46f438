import json

import pytest
import torch

from tscpurify.attacks import ATTACKS, attack_from_record, create_attack, poison_dataset
from tscpurify.attacks.badnets import BadNets
from tscpurify.data import ImageData
from tscpurify.errors import SettingsError

# 16 px, not 12: a 12-pixel width samples SIG's default f=6 sinusoid only at its zeros.
SIZE = 16


def tiny_data(n=200, classes=4, size=SIZE) -> ImageData:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, size, size), generator=generator, dtype=torch.uint8)
    return ImageData(images, torch.arange(n) % classes, tuple("abcd"[:classes]))


@pytest.mark.parametrize("name", ATTACKS.names())
def test_contract(name):
    # Every attack is used after `prepare` (self for most; TrojanNN learns its trigger there).
    data = tiny_data()
    attack = create_attack(name).prepare(data, seed=0)
    assert create_attack(name).prepare(data, seed=0) == attack, "prepare must be seeded"
    assert attack.prepare(data, seed=1) is attack, "a prepared attack is not fitted again"
    x = torch.rand(8, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    out = attack.trigger(x)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out, x), "the trigger must change the input"
    assert torch.equal(attack.trigger(x), out), "the trigger must be deterministic"
    assert x.equal(torch.rand(8, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))), \
        "the trigger must not modify its input"
    rebuilt = attack_from_record(json.loads(json.dumps(attack.record())))
    assert rebuilt == attack and torch.equal(rebuilt.trigger(x), out)


@pytest.mark.parametrize("name", ATTACKS.names())
def test_poison_rate_is_exact_and_avoids_target(name):
    data = tiny_data()
    attack = create_attack(name, rate=0.13, target=2)
    poisoned, indices = poison_dataset(data, attack, seed=0)
    assert len(indices) == round(0.13 * 200) == len(indices.unique())
    if attack.clean_label:
        # Clean-label attacks legitimately differ: they poison target-class samples and
        # change no label at all (test-time inputs of other classes are still the victims).
        assert (data.labels[indices] == 2).all()
        assert torch.equal(poisoned.labels, data.labels)
    else:
        assert (data.labels[indices] != 2).all()
        assert (poisoned.labels[indices] == 2).all()
    untouched = torch.ones(200, dtype=torch.bool)
    untouched[indices] = False
    assert torch.equal(poisoned.labels[untouched], data.labels[untouched])
    assert not torch.equal(poisoned.images[indices], data.images[indices])
    # Only WaNet's noise mode alters samples outside the backdoor set (cross_ratio per
    # backdoor sample, labels kept, checked above); every other attack leaves them as they were.
    changed = (poisoned.images != data.images).flatten(1).any(1)
    extra = round(getattr(attack, "cross_ratio", 0) * len(indices))
    assert (changed & untouched).sum() == extra


def test_badnets_patch_is_where_it_says():
    attack = BadNets(size=3, margin=1, position="bottom-right", pattern="white")
    x = torch.zeros(2, 1, 10, 10)
    out = attack.trigger(x)
    changed = (out != x)[0, 0].nonzero().tolist()
    assert changed == [[r, c] for r in (6, 7, 8) for c in (6, 7, 8)]
    top_left = BadNets(size=2, margin=0, position="top-left", pattern="white").trigger(x)
    assert (top_left[0, 0] != 0).nonzero().tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    checker = BadNets(size=3, margin=0).trigger(x)[0, 0, 7:, 7:]
    assert checker.tolist() == [[1, 0, 1], [0, 1, 0], [1, 0, 1]]


def test_all_to_all_relabels_to_next_class():
    attack = create_attack("badnets", all_to_all=True)
    y = torch.tensor([0, 1, 9])
    assert attack.relabel(y, 10).tolist() == [1, 2, 0]
    assert attack.victims(y).all()


def test_blended_mixes_with_its_pattern():
    attack = create_attack("blended", alpha=0.25, pattern_seed=3)
    x = torch.rand(4, 3, 8, 8)
    pattern = attack.pattern((3, 8, 8))
    assert torch.allclose(attack.trigger(x), 0.75 * x + 0.25 * pattern)
    assert not torch.equal(pattern, create_attack("blended", pattern_seed=4).pattern((3, 8, 8)))


@pytest.mark.parametrize("kwargs, message", [
    ({"rate": 0.0}, "poison rate"), ({"rate": 1.5}, "poison rate"),
    ({"pattern": "stars"}, "pattern"), ({"target": -1}, "target"),
    # Types are checked too (a record may come from anyone): these once failed mid-training
    # or passed as something else.
    ({"size": 2.5}, "size must be int"), ({"all_to_all": "yes"}, "all_to_all must be bool"),
    ({"size": True}, "size must be int"), ({"bogus": 1}, "no setting 'bogus'"),
])
def test_bad_settings(kwargs, message):
    with pytest.raises(SettingsError, match=message):
        create_attack("badnets", **kwargs)


def test_target_out_of_range():
    with pytest.raises(SettingsError, match="out of range"):
        poison_dataset(tiny_data(), create_attack("badnets", target=7), seed=0)


def test_a_rate_that_poisons_no_sample_is_refused():
    # Rounded to zero samples, the "backdoored" model would be a clean one recorded as attacked.
    with pytest.raises(SettingsError, match="poisons none"):
        poison_dataset(tiny_data(), create_attack("badnets", rate=1e-9), seed=0)


def test_unknown_attack_suggests_a_name():
    with pytest.raises(SettingsError, match="did you mean 'badnets'"):
        create_attack("badnet")
