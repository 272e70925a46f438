"""The SimCLR encoder: traceable symmetry that never moves the projection, and its two outputs."""

from __future__ import annotations

import pytest
import torch

from tscpurify.checkpoint import load_model, save_model
from tscpurify.errors import SettingsError
from tscpurify.models import MODELS, create_model
from tscpurify.permutation import derive_spec, max_output_change, random_permutation, verify_spec
from tscpurify.sidecar import Sidecar


@pytest.mark.parametrize("trunk, feature_dim", [("cnn", 8), ("resnet18", 32)])
def test_spec_is_derived_verified_and_leaves_the_projection_alone(trunk, feature_dim):
    torch.manual_seed(0)
    model = create_model("simclr", trunk=trunk, width=4).eval()
    x = torch.rand(4, 1, 28, 28)
    spec = derive_spec(model, x[:2])
    verify_spec(model, spec, x, generator=torch.Generator().manual_seed(0))
    assert model(x).shape == (4, 64) and model.features(x).shape == (4, feature_dim)
    moved = {(a.key, a.dim) for g in spec.groups.values() for a in g.params}
    assert ("head.2.weight", 0) not in moved and ("head.2.bias", 0) not in moved
    assert ("head.0.weight", 0) in moved  # the head's hidden units are a symmetry too
    # A permutation of one group's weights without the next layer's inputs must break it.
    perm = random_permutation(spec, torch.Generator().manual_seed(1))
    assert max_output_change(model, spec, perm, x) < 1e-4
    head = spec.groups["head.0"]
    partial = type(spec)({"head.0": type(head)(head.name, head.size, head.params[:1])})
    assert max_output_change(model, partial, {"head.0": perm["head.0"]}, x) > 1e-3


def test_forward_is_the_head_applied_to_the_features():
    model = create_model("simclr", width=4, proj_dim=7).eval()
    x = torch.rand(3, 1, 28, 28)
    assert torch.allclose(model(x), model.head(model.features(x)))
    assert model(x).shape == (3, 7)


def test_the_encoder_is_not_a_classifier_and_names_its_trunks():
    assert "simclr" in MODELS
    with pytest.raises(SettingsError, match="num_classes"):
        create_model("simclr", num_classes=10)
    with pytest.raises(SettingsError, match="choices: cnn, resnet18"):
        create_model("simclr", trunk="vit")


def test_a_saved_encoder_loads_back_with_the_same_outputs(tmp_path):
    kwargs = {"trunk": "resnet18", "width": 4, "proj_dim": 16}
    torch.manual_seed(0)
    model = create_model("simclr", **kwargs).eval()
    save_model(model, tmp_path, Sidecar(arch="simclr", kwargs=kwargs, kind="encoder"))
    loaded, sidecar = load_model(tmp_path)
    x = torch.rand(2, 1, 28, 28)
    assert sidecar.kind == "encoder" and torch.equal(loaded(x), model(x))
