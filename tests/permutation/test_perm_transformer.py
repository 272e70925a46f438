"""Transformers and ConvNeXt: the residual stream (through patch embedding, class token,
position embedding, LayerNorm and head), the MLP's hidden units, and attention heads (whole
heads, plus the units within them that Q and K share, and that V shares with the output
projection) are derived by tracing, keep the function exactly, and are matched back."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from tscpurify.permutation import (
    Axis,
    apply_permutation,
    derive_spec,
    match,
    max_output_change,
    random_permutation,
    weight_distance,
)
from tscpurify.permutation.apply import invert

from ..conftest import randomize_norms

DIM, HEADS, PATCH = 12, 3, 4


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Attention(nn.Module):
    """The usual hand-written multi-head self-attention (timm's)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class ChunkAttention(nn.Module):
    """Packed projection split with chunk, heads by view, fused attention."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).flatten(2))


class SeparateAttention(nn.Module):
    """Separate Q, K, V layers, explicit softmax(q·kᵀ)·v."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = (f(x).reshape(b, n, self.heads, c // self.heads).permute(0, 2, 1, 3)
                   for f in (self.q, self.k, self.v))
        attn = torch.softmax(torch.matmul(q, k.transpose(2, 3)) / 2.0, dim=-1)
        return self.out((attn @ v).permute(0, 2, 1, 3).contiguous().view(b, n, c))


class TorchAttention(nn.Module):
    """nn.MultiheadAttention, called as self-attention."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mha(x, x, x, need_weights=False)[0]


class Block(nn.Module):
    def __init__(self, attention: type[nn.Module]) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(DIM), attention(DIM, HEADS)
        self.norm2, self.mlp = nn.LayerNorm(DIM), Mlp(DIM, 2 * DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, attention: type[nn.Module], depth: int = 2, pool: str = "token") -> None:
        super().__init__()
        self.pool = pool
        self.patch_embed = nn.Conv2d(3, DIM, PATCH, stride=PATCH)
        self.cls_token = nn.Parameter(torch.randn(1, 1, DIM))
        self.pos_embed = nn.Parameter(torch.randn(1, (16 // PATCH) ** 2 + 1, DIM))
        self.blocks = nn.Sequential(*(Block(attention) for _ in range(depth)))
        self.norm, self.head = nn.LayerNorm(DIM), nn.Linear(DIM, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0] if self.pool == "token" else x.mean(1))


def vit(attention: type[nn.Module] = TorchAttention, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_norms(ViT(attention, **kwargs), seed)


def scale_of(model: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(model(x).abs().max())


def assert_permutations_keep_the_function(model: nn.Module, spec, x: torch.Tensor) -> None:
    scale = scale_of(model, x)
    for seed in range(3):
        perm = random_permutation(spec, torch.Generator().manual_seed(seed))
        assert max_output_change(model, spec, perm, x) <= 1e-5 * scale
        assert weight_distance(model.state_dict(),
                               apply_permutation(model.state_dict(), spec, perm)) > 0.1


HAND_WRITTEN = [Attention, ChunkAttention, SeparateAttention]
# Per variant: the layer producing Q (and K, V), and the names of its three attention groups.
ATTENTION_GROUPS = {
    Attention: ("qkv", "qkv/1[0]", "qkv/2[0]", "qkv/2[2]"),
    ChunkAttention: ("qkv", "qkv/1[0]/0", "qkv/1[0]/1", "qkv/1[2]/1"),
    SeparateAttention: ("q", "q/0", "q/1", "v/1"),
}


@pytest.mark.parametrize("attention", HAND_WRITTEN, ids=lambda a: a.__name__)
def test_hand_written_attention_vit_is_traced_head_by_head(attention):
    model, x = vit(attention), torch.rand(4, 3, 16, 16)
    spec = derive_spec(model, x[:2])
    layer, heads, qk, v = (f"blocks.0.attn.{name}" for name in ATTENTION_GROUPS[attention])
    assert {heads, qk, v, "patch_embed", "blocks.0.mlp.fc1"} <= set(spec.groups)
    assert len(spec.groups) == 9  # stream + 2 blocks × (heads, qk, v, mlp)
    assert [spec.groups[g].size for g in (heads, qk, v)] == [HEADS, DIM // HEADS, DIM // HEADS]
    assert layer in spec.groups[heads].probes
    proj = "out" if attention is SeparateAttention else "proj"
    assert Axis(f"blocks.0.attn.{proj}.weight", 1, DIM // HEADS) in spec.groups[heads].params
    assert Axis(f"blocks.0.attn.{proj}.weight", 1, repeat=HEADS) in spec.groups[v].params
    assert not any(a.key.startswith(f"blocks.0.attn.{proj}") for a in spec.groups[qk].params)
    assert f"blocks.0.attn.{proj}" in spec.groups["patch_embed"].probes
    assert spec.coverage(model.state_dict()) >= 0.9
    assert_permutations_keep_the_function(model, spec, x)


@pytest.mark.parametrize("attention", [TorchAttention, *HAND_WRITTEN], ids=lambda a: a.__name__)
def test_vit_is_matched_back_head_by_head(attention):
    model, x = vit(attention), torch.rand(48, 3, 16, 16)
    spec = derive_spec(model, x[:2])
    perm = random_permutation(spec, torch.Generator().manual_seed(7))
    shuffled = copy.deepcopy(model)
    shuffled.load_state_dict(apply_permutation(model.state_dict(), spec, perm))
    found = match(model, shuffled, spec, [(x[:24], None), (x[24:], None)], mode="align")
    expected = invert(perm)
    assert all(torch.equal(found[name], expected[name]) for name in spec.groups)
    restored = apply_permutation(shuffled.state_dict(), spec, found)
    assert all(torch.equal(restored[k], v) for k, v in model.state_dict().items())
    unalign = match(model, model, spec, [x], mode="unalign")
    for name, group in spec.groups.items():
        assert sorted(unalign[name].tolist()) == list(range(group.size))
    assert max_output_change(model, spec, unalign, x) <= 1e-5 * scale_of(model, x)


@pytest.mark.parametrize("pool", ["token", "mean"])
def test_multihead_attention_vit_keeps_its_function_under_every_symmetry(pool):
    model, x = vit(pool=pool), torch.rand(4, 3, 16, 16)
    spec = derive_spec(model, x[:2])
    assert set(spec.groups) == {
        "patch_embed",  # the residual stream: one group through every block
        *(f"blocks.{i}.{name}" for i in (0, 1) for name in
          ("attn.mha/heads", "attn.mha/qk", "attn.mha/v", "mlp.fc1"))}
    stream = spec.groups["patch_embed"]
    assert set(stream.probes) == {"patch_embed", "blocks.0.mlp.fc2", "blocks.1.mlp.fc2"}
    keys = {(a.key, a.dim) for a in stream.params}
    assert {("cls_token", 2), ("pos_embed", 2), ("norm.weight", 0), ("head.weight", 1),
            ("blocks.1.attn.mha.in_proj_weight", 1),
            ("blocks.1.attn.mha.out_proj.bias", 0)} <= keys
    assert ("pos_embed", 1) not in keys and ("head.weight", 0) not in keys
    assert [spec.groups[f"blocks.0.attn.mha/{g}"].size for g in ("heads", "qk", "v")] == \
        [HEADS, DIM // HEADS, DIM // HEADS]
    w_in = "blocks.0.attn.mha.in_proj_weight"
    assert Axis(w_in, 0, DIM // HEADS, DIM, DIM) in spec.groups["blocks.0.attn.mha/heads"].params
    assert Axis(w_in, 0, 1, DIM, DIM, HEADS) in spec.groups["blocks.0.attn.mha/qk"].params
    assert Axis(w_in, 0, 1, 2 * DIM, DIM, HEADS) in spec.groups["blocks.0.attn.mha/v"].params
    assert spec.coverage(model.state_dict()) >= 0.9
    assert_permutations_keep_the_function(model, spec, x)


class ConvNeXtBlock(nn.Module):
    """Depthwise 7×7 conv, LayerNorm over channels (channels last), inverted MLP, layer scale
    and a residual."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pwconv1, self.pwconv2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        h = self.gamma * self.pwconv2(F.gelu(self.pwconv1(h)))
        return x + h.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 4, stride=4)
        self.stages = nn.Sequential(ConvNeXtBlock(8), ConvNeXtBlock(8))
        self.norm, self.head = nn.LayerNorm(8), nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.stages(self.stem(x)).mean((2, 3))))


def test_convnext_block_keeps_its_function():
    torch.manual_seed(0)
    model, x = randomize_norms(ConvNeXt()), torch.rand(4, 3, 16, 16)
    spec = derive_spec(model, x[:2])
    assert set(spec.groups) == {"stem", "stages.0.pwconv1", "stages.1.pwconv1"}
    stream = {(a.key, a.dim) for a in spec.groups["stem"].params}
    assert {("stages.0.dwconv.weight", 0), ("stages.1.norm.bias", 0), ("stages.0.gamma", 0),
            ("stages.1.pwconv2.weight", 0), ("head.weight", 1)} <= stream
    assert spec.coverage(model.state_dict()) >= 0.9
    assert_permutations_keep_the_function(model, spec, x)


@pytest.mark.parametrize("attention", [TorchAttention, Attention], ids=lambda a: a.__name__)
def test_every_axis_of_every_attention_group_is_needed(attention):
    """Negative control: each group alone keeps the function, and leaving out any one of its
    axes (one segment of the packed projection, say) breaks it. K's bias is the exception: it
    adds q·b_k to a whole row of scores, which softmax ignores, so it cannot break anything."""
    from dataclasses import replace

    from tscpurify.permutation import PermutationSpec

    model, x = vit(attention, depth=1), torch.rand(4, 3, 16, 16)
    spec = derive_spec(model, x[:2])
    scale = scale_of(model, x)
    for name, group in spec.groups.items():
        perm = {name: torch.roll(torch.arange(group.size), 1)}  # moves every unit
        assert max_output_change(model, spec, perm, x) <= 1e-5 * scale, name
        for skipped in group.params:
            if skipped.key.endswith(("in_proj_bias", "qkv.bias")) and skipped.start == DIM:
                continue
            half = replace(group, params=tuple(a for a in group.params if a != skipped))
            broken = PermutationSpec({**spec.groups, name: half})
            assert max_output_change(model, broken, perm, x) > 1e-4 * scale, (name, skipped)


def test_tsc_purifies_a_vit():
    from torch.utils.data import DataLoader, TensorDataset

    from tscpurify import TSCSettings, purify
    from tscpurify.settings import replace_settings

    x, y = torch.rand(32, 3, 16, 16), torch.randint(0, 5, (32,))
    settings = replace_settings(TSCSettings(), rounds=1, epochs=1, ft_epochs=0,
                                final_ft_epochs=0, profile_points=0, batch_size=None)
    purified, report = purify(vit(Attention, depth=1), DataLoader(TensorDataset(x, y),
                                                                  batch_size=16),
                              settings, progress=False)
    assert report.symmetry["groups"] == 5 and report.symmetry["coverage"] >= 0.9
    with torch.no_grad():
        assert torch.isfinite(purified(x)).all()
