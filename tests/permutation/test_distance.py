"""model_distances: raw and permutation-aligned distance between two models."""

import copy

import torch

import tscpurify.permutation.distance as distance_module
from tscpurify.permutation import (
    apply_permutation,
    derive_spec,
    model_distances,
    random_permutation,
)


def test_a_permuted_copy_is_far_in_raw_weights_and_at_zero_once_aligned(kit):
    model = kit.build("cnn")
    x = kit.images()
    spec = derive_spec(model, x[:2])
    permuted = copy.deepcopy(model)
    permuted.load_state_dict(apply_permutation(model.state_dict(), spec,
                                               random_permutation(spec, torch.Generator()
                                                                  .manual_seed(0))))
    before = {k: v.clone() for k, v in permuted.state_dict().items()}
    distance = model_distances(model, permuted, kit.batches(x), spec)
    assert distance["raw"] > 0.3
    assert distance["aligned"] < 1e-6
    assert all(torch.equal(v, permuted.state_dict()[k]) for k, v in before.items())


def test_aligned_distance_counts_real_changes(kit):
    model = kit.build("cnn")
    x = kit.images()
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.1 * p.abs().mean() * torch.randn(p.shape, generator=torch.Generator()
                                                      .manual_seed(1)))
    distance = model_distances(model, moved, kit.batches(x))  # spec derived here
    assert 0.01 < distance["aligned"] <= distance["raw"] + 1e-9


def test_aligned_distance_is_never_above_the_raw_one(kit, monkeypatch):
    # Activation matching can pick a worse order than the model's own (seen on FST and SAU rows
    # of the fair grid); the identity is a permutation too, so "aligned" keeps the smaller.
    model = kit.build("cnn")
    x = kit.images()
    spec = derive_spec(model, x[:2])
    scrambled = random_permutation(spec, torch.Generator().manual_seed(0))
    monkeypatch.setattr(distance_module, "match", lambda *args, **kwargs: scrambled)
    copy_of_model = copy.deepcopy(model)
    distance = model_distances(model, copy_of_model, kit.batches(x), spec)
    assert distance == {"raw": 0.0, "aligned": 0.0}
