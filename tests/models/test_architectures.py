"""The registered ViT, DenseNet, ConvNeXt and GroupNorm CNN: each builds for grey 28×28 and RGB
32×32 images, and the symmetry engine derives its spec on its own (coverage ≥ 0.9), a spec whose
random permutations keep the function."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tscpurify.errors import SettingsError
from tscpurify.models import create_model
from tscpurify.permutation import (
    apply_permutation,
    derive_spec,
    max_output_change,
    random_permutation,
    weight_distance,
)

from ..conftest import randomize_norms

# Tiny sizes; the groups each should give: the residual streams, the MLPs' hidden units, and
# per attention layer its heads, Q·K units and V units (ViT); one group per conv (DenseNet,
# GroupNorm CNN) plus the CNN's hidden Linear.
ARCHS: dict[str, tuple[dict, int]] = {
    "vit": ({"dim": 8, "heads": 2, "depth": 2, "mlp_ratio": 2}, 1 + 2 * 4),
    "densenet": ({"width": 4, "growth": 2, "blocks": (2, 2)}, 1 + 4 + 1),
    "convnext": ({"width": 4, "depths": (1, 1)}, 2 + 2),
    "gn_cnn": ({"width": 8}, 4 + 1),
}
SHAPES = [(1, 28), (3, 32)]  # (in_channels, image size)
CASES = [(arch, c, s) for arch in ARCHS for c, s in SHAPES]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(arch: str, channels: int, size: int, seed: int = 0) -> nn.Module:
    kwargs = dict(ARCHS[arch][0], num_classes=7, in_channels=channels)
    if arch in ("vit", "gn_cnn"):
        kwargs["image_size"] = size
    torch.manual_seed(seed)
    return randomize_norms(create_model(arch, **kwargs), seed)


@pytest.mark.parametrize("arch,channels,size", CASES, ids=[f"{a}-{c}x{s}" for a, c, s in CASES])
def test_builds_and_its_symmetry_is_derived(arch, channels, size):
    model = build(arch, channels, size)
    x = torch.rand(6, channels, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(x)
    assert out.shape == (6, 7) and torch.isfinite(out).all()
    spec = derive_spec(model, x[:2])
    assert len(spec.groups) == ARCHS[arch][1]
    assert spec.coverage(model.state_dict()) >= 0.9
    scale = float(out.abs().max())
    for seed in range(2):
        perm = random_permutation(spec, torch.Generator().manual_seed(seed))
        assert max_output_change(model, spec, perm, x) <= 1e-5 * scale
        assert weight_distance(model.state_dict(),
                               apply_permutation(model.state_dict(), spec, perm)) > 0.1


def test_vit_defaults_are_the_issue_s_small_vit():
    model = create_model("vit")
    assert model.patch_embed.kernel_size == (4, 4) and model.patch_embed.stride == (4, 4)
    assert len(model.blocks) == 4
    attn = model.blocks[0].attn
    assert (attn.embed_dim, attn.num_heads) == (64, 4)
    assert model.pos_embed.shape == (1, 7 * 7 + 1, 64)
    assert model.blocks[0].mlp[0].out_features == 4 * 64


def test_sizes_that_do_not_fit_are_refused():
    with pytest.raises(SettingsError, match="not a multiple of patch"):
        create_model("vit", image_size=30)
    with pytest.raises(SettingsError, match="not a multiple of heads"):
        create_model("vit", dim=10, heads=4)
    with pytest.raises(SettingsError, match="must divide width"):
        create_model("gn_cnn", width=6)
