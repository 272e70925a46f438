"""derive_spec: the groups it finds, and the errors it raises on what it cannot reason about."""

from __future__ import annotations

import ast
import re

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from tscpurify.errors import SpecError
from tscpurify.permutation import Axis, derive_spec, max_output_change, random_permutation


def _stage_groups(spec):
    return {name: g for name, g in spec.groups.items() if len(g.probes) > 1}


def test_preactresnet_residual_stream_is_one_group_per_stage(kit):
    spec = derive_spec(kit.build("preactresnet18"), kit.images()[:2])
    # 4 stage streams + the inner conv of each of the 8 blocks.
    assert len(spec.groups) == 12
    streams = _stage_groups(spec)
    assert {n: set(g.probes) for n, g in streams.items()} == {
        "conv1": {"conv1", "layer1.0.conv2", "layer1.1.conv2"},
        **{f"layer{s}.0.shortcut": {f"layer{s}.0.shortcut", f"layer{s}.0.conv2",
                                    f"layer{s}.1.conv2"} for s in (2, 3, 4)},
    }
    assert [streams[n].size for n in streams] == [4, 8, 16, 32]
    for stage in (1, 2, 3, 4):
        for block in (0, 1):
            inner = spec.groups[f"layer{stage}.{block}.conv1"]
            assert inner.probes == (f"layer{stage}.{block}.conv1",)
    # The shortcut conv's output axis and both blocks' output convs move with the stream, and
    # so do the pre-activation BNs reading it.
    keys = {a.key for a in streams["layer2.0.shortcut"].params if a.dim == 0}
    assert {"layer2.0.shortcut.weight", "layer2.0.conv2.weight", "layer2.1.conv2.weight",
            "layer2.1.bn1.weight", "layer3.0.bn1.running_var"} <= keys


def test_resnet_downsample_branch_joins_the_stream(kit):
    spec = derive_spec(kit.build("resnet18"), kit.images()[:2])
    assert len(spec.groups) == 12
    stream = spec.groups["layer3.0.downsample.0"]
    assert set(stream.probes) == {"layer3.0.downsample.0", "layer3.0.conv2", "layer3.1.conv2"}
    keys = {a.key for a in stream.params if a.dim == 0}
    assert {"layer3.0.downsample.1.running_mean", "layer3.0.bn2.weight"} <= keys


@pytest.mark.parametrize("size, block", [(28, 49), (32, 64)])
def test_flatten_after_conv_gives_a_block_axis(kit, size, block):
    spec = derive_spec(kit.build("cnn", 1, size), kit.images(1, size)[:2])
    axis = next(a for a in spec.groups["11"].params if a.key == "16.weight")
    assert (axis.dim, axis.block) == (1, block)


def test_inputs_outputs_and_normalize_never_move(arch, kit):
    model = kit.build(arch)
    spec = derive_spec(model, kit.images()[:2])
    state = model.state_dict()
    classifier = list(state)[-1].rsplit(".", 1)[0]  # the last layer's path
    for key in spec.keys:
        assert not key.endswith((".mean", ".std")), key  # Normalize's buffers
        assert not key.endswith("num_batches_tracked")
    assert spec.axes_of(f"{classifier}.weight")[0] is None
    assert spec.axes_of(f"{classifier}.bias") == ()
    first_conv_or_linear = next(k for k, v in state.items() if k.endswith("weight") and v.dim() > 1)
    assert spec.axes_of(first_conv_or_linear, ndim=state[first_conv_or_linear].dim())[1] is None


def test_derive_spec_leaves_the_model_alone(kit):
    model = kit.build("resnet18").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    derive_spec(model, kit.images()[:2])
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class _Functional(nn.Module):
    """Functional ops, tensor methods, torch.add residuals and view-as-flatten."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.conv3 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 6, 3, stride=2)
        self.fc1, self.ln = nn.Linear(6 * 3 * 3, 8), nn.LayerNorm(8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = torch.add(h, self.conv2(h).sigmoid() * 0.5)
        h = F.max_pool2d(self.conv3(h), 2)
        h = F.gelu(self.ln(self.fc1(h.view(h.size(0), -1))))
        h = h.unsqueeze(-1).squeeze(2)  # a no-op pair of reshapes the rules must see through
        return self.fc2(h + h.mean(dim=1, keepdim=True))


def test_functional_ops_are_understood(kit):
    model, x = _Functional(), torch.rand(8, 1, 14, 14)
    kit.randomize_norms(model)
    spec = derive_spec(model, x[:2])
    assert set(spec.groups) == {"conv1", "conv3", "fc1"}
    assert set(spec.groups["conv1"].probes) == {"conv1", "conv2"}
    assert any(a.key == "fc1.weight" and a.block == 9 for a in spec.groups["conv3"].params)
    for seed in range(3):
        perm = random_permutation(spec, torch.Generator().manual_seed(seed))
        assert max_output_change(model, spec, perm, x) <= 1e-5 * kit.output_scale(model, x)


class _Mixer(nn.Module):
    """Ops that mix or reorder channels, which no permutation rule covers."""

    OPS = {
        "cumsum": lambda a, b: torch.cumsum(a, dim=1) + b,
        "flip": lambda a, b: a.flip(1) + b,
        "roll": lambda a, b: torch.roll(a, 1, dims=1) + b,
    }

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op
        self.a, self.b = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.OPS[self.op](self.a(x), self.b(x))


class _Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            return x
        return -x


class _Net(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.stem = nn.Identity() if isinstance(inner, _Mixer) else nn.Conv2d(1, 4, 3)
        self.layer2 = nn.Sequential(inner)
        self.conv = nn.Conv2d(4, 5, 3)
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv(self.layer2(self.stem(x))))
        return self.head(h.mean((2, 3)))


@pytest.mark.parametrize("op, name", [("cumsum", "op 'cumsum'"), ("flip", "method 'flip'"),
                                      ("roll", "op 'roll'")])
def test_channel_mixing_ops_are_refused_naming_op_and_module(op, name):
    with pytest.raises(SpecError, match=rf"{name} at 'layer2\.0'.*leaf_modules"):
        derive_spec(_Net(_Mixer(op)), torch.rand(2, 1, 4, 4))


def test_the_error_names_the_source_line_and_its_hint_works_as_written():
    model = _Net(_Mixer("cumsum"))
    with pytest.raises(SpecError) as caught:
        derive_spec(model, torch.rand(2, 1, 4, 4))
    message = str(caught.value)
    assert "(test_perm_trace.py:" in message and "torch.cumsum(a, dim=1) + b" in message
    hint = re.search(r"pass (leaf_modules=\(.*?,\))", message).group(1)
    leaf_modules = ast.literal_eval(hint.split("=", 1)[1])
    spec = derive_spec(model, torch.rand(2, 1, 4, 4), leaf_modules=leaf_modules)
    assert spec.groups  # the rest of the model still permutes


def test_data_dependent_control_flow_is_refused_naming_the_module():
    with pytest.raises(SpecError, match=r"cannot trace 'layer2\.0'.*control flow"):
        derive_spec(_Net(_Gate()), torch.rand(2, 1, 12, 12))


def test_leaf_modules_make_an_untraceable_block_opaque(kit):
    model, x = _Net(_Gate()), torch.rand(8, 1, 12, 12)
    for leaf in (_Gate, "layer2.0"):
        spec = derive_spec(model, x[:2], leaf_modules=(leaf,))
        # The stem feeds the opaque gate, so it is pinned; the conv after it still moves.
        assert list(spec.groups) == ["conv"]
        perm = random_permutation(spec, torch.Generator().manual_seed(0))
        assert max_output_change(model, spec, perm, x) <= 1e-5 * kit.output_scale(model, x)
    with pytest.raises(SpecError, match="not modules of the model"):
        derive_spec(model, x[:2], leaf_modules=("nope",))


def test_a_module_without_a_rule_is_refused():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.PReLU(4), nn.Conv2d(4, 2, 3))
    with pytest.raises(SpecError, match="module PReLU at '1'"):
        derive_spec(model, torch.rand(2, 1, 8, 8))


class _Split(nn.Module):
    """A layer's 6 units viewed as 2 × 3, the 3 read by the next layer (as heads × head_dim)."""

    def __init__(self, regroup: bool = False) -> None:
        super().__init__()
        self.regroup = regroup
        self.fc, self.out = nn.Linear(4, 6), nn.Linear(3 if not regroup else 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x).view(-1, 2, 3)
        return self.out(h.reshape(-1, 3, 2) if self.regroup else h)


def test_reshape_that_splits_units_factors_them(kit):
    model, x = _Split(), torch.rand(8, 4)
    spec = derive_spec(model, x[:2])
    # The outer factor (2) reaches the output and stays; the inner (3) moves in both copies.
    assert list(spec.groups) == ["fc/1"]
    assert set(spec.groups["fc/1"].params) == {
        Axis("fc.weight", 0, 1, repeat=2), Axis("fc.bias", 0, 1, repeat=2),
        Axis("out.weight", 1)}
    perm = random_permutation(spec, torch.Generator().manual_seed(0))
    assert max_output_change(model, spec, perm, x) <= 1e-5 * kit.output_scale(model, x)


def test_reshape_that_regroups_units_is_refused():
    with pytest.raises(SpecError, match=r"method 'reshape' at '<top level>'.*reshapes"):
        derive_spec(_Split(regroup=True), torch.rand(2, 4))


def test_a_wrong_example_input_is_a_spec_error(kit):
    with pytest.raises(SpecError, match="example_input"):
        derive_spec(kit.build("cnn"), torch.rand(2, 3, 28, 28))


class _InputResidual(nn.Module):
    """conv(x) + x: the conv's channels are tied to the (unpermutable) input channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.mid = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 5, 3)
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.mid(self.conv(x) + x))
        return self.head(h.amax(dim=(2, 3)))


def test_a_group_added_to_the_input_is_pinned(kit):
    model, x = _InputResidual(), torch.rand(8, 3, 10, 10)
    spec = derive_spec(model, x[:2])
    assert list(spec.groups) == ["mid"]
    perm = random_permutation(spec, torch.Generator().manual_seed(0))
    assert max_output_change(model, spec, perm, x) <= 1e-5 * kit.output_scale(model, x)


def test_pooling_over_hidden_units_is_refused():
    model = nn.Sequential(nn.Linear(8, 6), nn.MaxPool1d(2), nn.Linear(3, 1))
    with pytest.raises(SpecError, match="module MaxPool1d at '1' pools over a hidden-unit axis"):
        derive_spec(model, torch.rand(2, 3, 8))


class _TupleOut(nn.Module):
    """A layer's output split by chunk and returned as a tuple: its units reach the output."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.other = nn.Linear(3, 4), nn.Linear(3, 5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.fc(x).chunk(2, dim=-1), self.other(x)


def test_units_in_a_returned_tuple_never_move():
    assert list(derive_spec(_TupleOut(), torch.rand(2, 3)).groups) == []
