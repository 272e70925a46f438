"""model_distances: raw and permutation-aligned distance between two models."""

import copy

import torch

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
