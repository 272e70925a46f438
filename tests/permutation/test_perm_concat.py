"""Concatenation along channels (DenseNet): each input keeps its own group and every consumer
of the concatenation moves one segment per input; the function is kept exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from tscpurify.errors import SpecError
from tscpurify.permutation import (
    Axis,
    PermutationGroup,
    PermutationSpec,
    apply_permutation,
    derive_spec,
    match,
    max_output_change,
    random_permutation,
)
from tscpurify.permutation.apply import invert

from ..conftest import randomize_norms


class DenseLayer(nn.Module):
    """BN-ReLU-conv1x1-BN-ReLU-conv3x3, its output concatenated to its input."""

    def __init__(self, channels: int, growth: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(channels), nn.Conv2d(channels, 2 * growth, 1)
        self.bn2 = nn.BatchNorm2d(2 * growth)
        self.conv2 = nn.Conv2d(2 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.relu(self.bn1(x)))
        return torch.cat([x, self.conv2(F.relu(self.bn2(h)))], 1)


class DenseNet(nn.Module):
    """Stem, a dense block of 3 layers, a transition, a second block of 2, BN and a head."""

    def __init__(self, in_channels: int = 3, stem: int = 6, growth: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, stem, 3, padding=1)
        c = stem
        layers = []
        for _ in range(3):
            layers.append(DenseLayer(c, growth))
            c += growth
        self.block1 = nn.Sequential(*layers)
        self.transition = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, 8, 1),
                                        nn.AvgPool2d(2))
        self.block2 = nn.Sequential(DenseLayer(8, growth), DenseLayer(8 + growth, growth))
        self.norm = nn.BatchNorm2d(8 + 2 * growth)
        self.head = nn.Linear(8 + 2 * growth, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block2(self.transition(self.block1(self.stem(x))))
        return self.head(F.relu(self.norm(h)).mean((2, 3)))


def dense_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_norms(DenseNet(), seed)


def test_each_concatenated_input_keeps_its_group_and_its_segments():
    model, x = dense_net(), torch.rand(6, 3, 8, 8)
    spec = derive_spec(model, x[:2])
    assert {"stem", "block1.0.conv2", "block1.2.conv2", "transition.2",
            "block2.1.conv2"} <= set(spec.groups)
    # The stem's 6 channels are the first segment of every later layer of block 1 and of the
    # transition; layer 0's 4 new channels are the second.
    stem = {(a.key, a.dim): a for a in spec.groups["stem"].params}
    assert stem[("block1.2.bn1.weight", 0)] == Axis("block1.2.bn1.weight", 0, 1, 0, 6)
    assert stem[("transition.2.weight", 1)] == Axis("transition.2.weight", 1, 1, 0, 6)
    new = {(a.key, a.dim): a for a in spec.groups["block1.0.conv2"].params}
    assert new[("block1.1.conv1.weight", 1)] == Axis("block1.1.conv1.weight", 1, 1, 6, 4)
    assert spec.axes_of("transition.2.weight") == (
        "transition.2", ("stem", "block1.0.conv2", "block1.1.conv2", "block1.2.conv2"))
    assert spec.coverage(model.state_dict()) >= 0.9


def test_a_random_permutation_keeps_the_function():
    model, x = dense_net(), torch.rand(6, 3, 8, 8)
    spec = derive_spec(model, x[:2])
    with torch.no_grad():
        scale = float(model(x).abs().max())
    for seed in range(3):
        perm = random_permutation(spec, torch.Generator().manual_seed(seed))
        assert max_output_change(model, spec, perm, x) <= 1e-5 * scale


def test_align_recovers_a_permuted_dense_net():
    model, x = dense_net(), torch.rand(32, 3, 8, 8)
    spec = derive_spec(model, x[:2])
    perm = random_permutation(spec, torch.Generator().manual_seed(4))
    shuffled = copy.deepcopy(model)
    shuffled.load_state_dict(apply_permutation(model.state_dict(), spec, perm))
    found = match(model, shuffled, spec, [x], mode="align")
    assert all(torch.equal(found[name], invert(perm)[name]) for name in spec.groups)
    restored = apply_permutation(shuffled.state_dict(), spec, found)
    assert all(torch.equal(restored[k], v) for k, v in model.state_dict().items())


class _InputConcat(nn.Module):
    """cat([x, conv(x)]): the input's channels never move, the conv's still do."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.mix, self.head = nn.Conv2d(2, 5, 3, padding=1), nn.Conv2d(7, 4, 1), \
            nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mix(torch.cat((x, self.conv(x)), dim=1)).amax((2, 3)))


def test_a_concatenated_input_stays_and_the_rest_moves():
    model, x = _InputConcat().eval(), torch.rand(6, 2, 5, 5)
    spec = derive_spec(model, x[:2])
    assert set(spec.groups) == {"conv", "mix"}
    assert Axis("mix.weight", 1, 1, 2, 5) in spec.groups["conv"].params
    perm = random_permutation(spec, torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert max_output_change(model, spec, perm, x) <= 1e-5 * float(model(x).abs().max())


def test_a_sum_with_a_differently_cut_concatenation_pins_it():
    class Uneven(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(1, 2, 1), nn.Conv2d(1, 3, 1), nn.Conv2d(1, 5, 1)
            self.out = nn.Conv2d(5, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.cat([self.a(x), self.b(x)], 1) + self.c(x))

    model, x = Uneven().eval(), torch.rand(4, 1, 3, 3)
    spec = derive_spec(model, x[:2])
    assert set(spec.groups) == set()  # a, b meet c's single group: nothing can move
    even = derive_spec(nn.Sequential(nn.Conv2d(1, 3, 1), nn.Conv2d(3, 2, 1)), x[:2])
    assert set(even.groups) == {"0"}


def test_segments_move_only_their_entries():
    state = {"w": torch.arange(10.0)}
    spec = PermutationSpec({
        "a": PermutationGroup("a", 3, (Axis("w", 0, 1, 2, 3),)),
        "b": PermutationGroup("b", 2, (Axis("w", 0, 2, 5, 4),))})
    out = apply_permutation(state, spec, {"a": torch.tensor([2, 0, 1]),
                                          "b": torch.tensor([1, 0])})
    assert out["w"].tolist() == [0, 1, 4, 2, 3, 7, 8, 5, 6, 9]
    spec.validate(state)
    with pytest.raises(SpecError, match="too small"):
        spec.validate({"w": torch.zeros(8)})


def test_overlapping_segments_are_refused_and_factors_of_one_segment_are_not():
    with pytest.raises(SpecError, match="overlapping"):
        PermutationSpec({"a": PermutationGroup("a", 3, (Axis("w", 0, 1, 0, 3),)),
                         "b": PermutationGroup("b", 2, (Axis("w", 0, 1, 2, 2),))})
    with pytest.raises(SpecError, match="overlapping"):  # a segment inside a whole axis
        PermutationSpec({"a": PermutationGroup("a", 6, (Axis("w", 0),)),
                         "b": PermutationGroup("b", 2, (Axis("w", 0, 1, 2, 2),))})
    with pytest.raises(SpecError, match="length 5"):
        PermutationSpec({"a": PermutationGroup("a", 2, (Axis("w", 0, 1, 0, 5),))})
    # Heads (blocks of 4) and units within heads (4, once per head) share one axis.
    heads_and_units = PermutationSpec({
        "heads": PermutationGroup("heads", 3, (Axis("w", 0, 4),)),
        "units": PermutationGroup("units", 4, (Axis("w", 0, 1, repeat=3),))})
    assert heads_and_units.axes_of("w") == (("heads", "units"),)
    with pytest.raises(SpecError, match="overlapping"):  # blocks of 3 cut the units' runs
        PermutationSpec({"heads": PermutationGroup("heads", 4, (Axis("w", 0, 3),)),
                         "units": PermutationGroup("units", 4, (Axis("w", 0, 1, repeat=3),))})


def test_what_concatenation_cannot_do_is_refused():
    class GroupNormAfterCat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(1, 4, 1), nn.Conv2d(1, 4, 1)
            self.norm, self.out = nn.GroupNorm(2, 8), nn.Conv2d(8, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.norm(torch.cat([self.a(x), self.b(x)], 1)))

    class UnevenSplit(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.a, self.b = nn.Linear(2, 6), nn.Linear(2, 1), nn.Linear(4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            left, right = self.fc(x).split([2, 4], dim=-1)  # cuts one layer's units unevenly
            return self.a(left) + self.b(right)

    with pytest.raises(SpecError, match="module GroupNorm at 'norm' .* normalises groups of a "
                                        "concatenation"):
        derive_spec(GroupNormAfterCat(), torch.rand(2, 1, 3, 3))
    with pytest.raises(SpecError, match="method 'split' .* splits a hidden-unit axis inside"):
        derive_spec(UnevenSplit(), torch.rand(2, 2))
