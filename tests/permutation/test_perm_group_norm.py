"""GroupNorm with 1 < groups < channels: whole groups move (block axes), the function is kept
exactly, and matching scores groups by their channels' summed correlations."""

import copy

import torch
from torch import nn

from tscpurify.permutation import (
    apply_permutation,
    derive_spec,
    match,
    max_output_change,
    random_permutation,
)
from tscpurify.permutation.apply import invert
from tscpurify.settings import replace_settings


def group_norm_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.ReLU(),   # groups of 2
        nn.Conv2d(8, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),  # groups of 4
        nn.Conv2d(16, 16, 3, padding=1), nn.GroupNorm(2, 16), nn.ReLU(),  # groups of 8
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()


def test_group_norm_moves_whole_groups_and_keeps_the_function():
    model, x = group_norm_cnn(), torch.rand(6, 1, 10, 10)
    spec = derive_spec(model, x[:2])
    sizes = {name: group.size for name, group in spec.groups.items()}
    assert sizes == {"0": 4, "3": 4, "6": 2}
    blocks = {(axis.key, axis.dim): axis.block for axis in spec.groups["3"].params}
    assert blocks[("3.weight", 0)] == blocks[("4.weight", 0)] == blocks[("6.weight", 1)] == 4
    assert spec.coverage(model.state_dict()) >= 0.9
    for seed in range(3):
        perm = random_permutation(spec, torch.Generator().manual_seed(seed))
        scale = model(x).abs().max().item()
        assert max_output_change(model, spec, perm, x) <= 1e-5 * scale


def test_align_recovers_a_group_permutation():
    model, x = group_norm_cnn(), torch.rand(32, 1, 10, 10)
    spec = derive_spec(model, x[:2])
    perm = random_permutation(spec, torch.Generator().manual_seed(5))
    shuffled = copy.deepcopy(model)
    shuffled.load_state_dict(apply_permutation(model.state_dict(), spec, perm))
    found = match(model, shuffled, spec, [(x, torch.zeros(32, dtype=torch.long))], mode="align")
    expected = invert(perm)
    assert all(torch.equal(found[name], expected[name]) for name in spec.groups)


def test_tsc_purifies_a_group_norm_network():
    from torch.utils.data import DataLoader, TensorDataset

    from tscpurify import TSCSettings, purify

    x, y = torch.rand(64, 1, 10, 10), torch.randint(0, 10, (64,))
    settings = replace_settings(TSCSettings(), rounds=1, epochs=1, ft_epochs=0,
                                final_ft_epochs=0, profile_points=0, batch_size=None)
    purified, report = purify(group_norm_cnn(), DataLoader(TensorDataset(x, y), batch_size=16),
                              settings, progress=False)
    assert report.symmetry["groups"] == 3 and report.symmetry["coverage"] >= 0.9
    assert torch.isfinite(purified(x)).all()
