import copy

import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from tscpurify.curve import recompute_bn_stats
from tscpurify.defenses import defend
from tscpurify.defenses.mcr import MCRSettings, mcr
from tscpurify.errors import DataError
from tscpurify.settings import replace_settings

from .conftest import snapshot

TINY = dict(ft_epochs=1, epochs=2, lr=0.05, t=0.3)


def parameters(model):
    return {k: v for k, v in model.named_parameters()}


def test_the_result_is_the_curve_point_at_t_between_the_model_and_its_fine_tuned_copy(
        trained_cnn, band_data):
    before = snapshot(trained_cnn)
    ordered = DataLoader(band_data, batch_size=32)  # fixed order: BN statistics reproducible
    result = defend("mcr", trained_cnn, ordered, progress=False, **TINY)
    curve, endpoint = result.details["curve"], result.details["endpoint"]

    # Endpoints: the suspect model at t=0 and the fine-tuned copy at t=1, bit for bit.
    for key, value in parameters(curve.point(0.0)).items():
        assert torch.equal(value, before[key]), key
    for key, value in parameters(curve.point(1.0)).items():
        assert torch.equal(value, parameters(endpoint)[key]), key
    assert any(not torch.equal(v, before[k]) for k, v in parameters(endpoint).items())

    # The repaired weights are the curve's at t; BN statistics re-estimated on the clean data.
    for key, value in parameters(curve.point(0.3)).items():
        assert torch.equal(parameters(result.model)[key], value), key
    expected = curve.point(0.3)
    recompute_bn_stats(expected, ordered)
    for key, value in expected.state_dict().items():
        assert torch.allclose(result.model.state_dict()[key], value, atol=1e-6), key
    assert not torch.equal(result.model.state_dict()["2.running_mean"], before["2.running_mean"])

    # Only the control point trained: it left the endpoints' mean.
    moved = [not torch.equal(curve.mid[k.replace(".", "-")], (before[k] + parameters(endpoint)[k])
                             / 2) for k in curve.keys]
    assert all(moved)
    assert len(result.details["curve_log"]) == TINY["epochs"]


def test_a_label_free_loss_replaces_cross_entropy_everywhere(trained_cnn, band_data):
    images = TensorDataset(band_data.tensors[0][:64])
    bare = DataLoader(images, batch_size=32)
    with pytest.raises(DataError, match="needs labelled"):
        defend("mcr", trained_cnn, bare)

    callers = []

    def consistency(model_fn, batch):
        """A label-free loss: agree with yourself under a one-pixel shift."""
        callers.append(type(model_fn).__name__)
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return F.mse_loss(model_fn(x), model_fn(torch.roll(x, 1, dims=-1)).detach())

    before = snapshot(trained_cnn)
    result = mcr(copy.deepcopy(trained_cnn), bare, replace_settings(MCRSettings(), **TINY),
                 seed=0, progress=False, callbacks={"loss_fn": consistency})
    assert set(callers) == {"Sequential", "CurveFunction"}  # endpoint fine-tuning and curve
    assert callers.count("CurveFunction") == TINY["epochs"] * len(bare)
    assert any(not torch.equal(v, before[k]) for k, v in result.model.state_dict().items())


def test_tsc_s_recipe_starts_the_control_point_at_a_fresh_initialisation(trained_cnn, band_data):
    from tscpurify.curve import fresh_control_point
    from tscpurify.seeding import derive_seed

    def control_point(result):  # the curve keys its control point with '-' for '.'
        return {k.replace("-", "."): v for k, v in result.details["curve"].mid.items()}

    loader = DataLoader(band_data, batch_size=32)
    # No training at all: the curve's control point is where it was initialised.
    own = defend("mcr", trained_cnn, loader, progress=False, seed=3, ft_epochs=0, epochs=0)
    recipe = defend("mcr", trained_cnn, loader, progress=False, seed=3, ft_epochs=0, epochs=0,
                    mid_init="random")
    # The paper's init is the endpoints' mean: here the model itself (no fine-tuning epochs).
    for name, p in trained_cnn.named_parameters():
        assert torch.allclose(control_point(own)[name], p), name
    fresh = fresh_control_point(trained_cnn, derive_seed(3, "mcr", "mid"))
    assert all(torch.equal(control_point(recipe)[k], v) for k, v in fresh.items())
    assert own.steps == recipe.steps == 0
