import copy
import dataclasses

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from tscpurify.defenses import defend
from tscpurify.defenses.anp import ANPSettings, neuron_forward, neuron_layers, perturb_neurons
from tscpurify.errors import SettingsError

from .conftest import snapshot

BNS = ["2", "5", "9", "12"]  # the width-4 CNN's BatchNorm layers
HIDDEN = "16"  # its hidden Linear (→ 16 features); "18" is the output layer
LAYERS = [*BNS, HIDDEN]


def clean_loader(data):
    return DataLoader(data, batch_size=32, shuffle=True,
                      generator=torch.Generator().manual_seed(1))


def run(model, data, **overrides):
    return defend("anp", model, clean_loader(data), progress=False, iterations=25, seed=3,
                  **overrides)


def test_neurons_are_the_batchnorm_channels_and_the_hidden_linear_features(trained_cnn,
                                                                           band_data):
    x = band_data.tensors[0][:4]
    assert list(neuron_layers(trained_cnn, x)) == LAYERS
    # A Linear that feeds a BatchNorm has its neurons masked once, on the BatchNorm.
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(144, 8), nn.BatchNorm1d(8), nn.ReLU(),
                        nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    assert list(neuron_layers(mlp, x)) == ["2", "4"]


def test_neuron_forward_scales_bn_weights_and_linear_rows(trained_cnn, band_data):
    x = band_data.tensors[0][:8]
    layers = neuron_layers(trained_cnn, x)
    ones = {n: torch.ones(layer.weight.shape[0]) for n, layer in layers.items()}
    with torch.no_grad():
        assert torch.allclose(neuron_forward(trained_cnn, layers, x, ones), trained_cnn(x),
                              atol=1e-6)
        ones["5"][2] = 0
        ones[HIDDEN][3] = 0.5
        noise = ({n: torch.zeros_like(m) for n, m in ones.items()},
                 {n: torch.zeros_like(m) for n, m in ones.items()})
        noise[0][HIDDEN][1] = -0.25
        noise[1][HIDDEN][1] = 1.0
        masked = neuron_forward(trained_cnn, layers, x, ones, noise)
        trained_cnn[5].weight[2] = 0
        trained_cnn[16].weight[3] *= 0.5
        trained_cnn[16].weight[1] *= 0.75
        trained_cnn[16].bias[1] *= 2
        assert torch.allclose(masked, trained_cnn(x), atol=1e-6)


def test_neuron_noise_starts_uniform_and_its_signed_step_is_not_clamped(trained_cnn,
                                                                         band_data):
    x, y = band_data.tensors[0][:64], band_data.tensors[1][:64]
    layers = neuron_layers(trained_cnn, x)
    ones = {n: torch.ones(layer.weight.shape[0]) for n, layer in layers.items()}
    torch.manual_seed(0)
    start = perturb_neurons(trained_cnn, layers, x, y, ones, eps=0.4, steps=0)
    torch.manual_seed(0)
    noise = perturb_neurons(trained_cnn, layers, x, y, ones, eps=0.4, steps=1)
    assert set(noise[0]) == set(LAYERS) and HIDDEN in noise[1]  # the hidden Linear is perturbed
    for before, after in zip((*start[0].values(), *start[1].values()),
                             (*noise[0].values(), *noise[1].values()), strict=True):
        assert float(before.abs().max()) <= 0.4
        step = (after - before).abs()
        assert torch.allclose(step[step > 0], torch.tensor(0.4))  # one step of eps/steps
    beyond = torch.cat([t.abs() for t in (*noise[0].values(), *noise[1].values())])
    assert float(beyond.max()) > 0.5  # left outside [-eps, eps]: no projection
    with torch.no_grad():
        at_start = float(F.cross_entropy(neuron_forward(trained_cnn, layers, x, ones, start), y))
        attacked = float(F.cross_entropy(neuron_forward(trained_cnn, layers, x, ones, noise), y))
    assert attacked > at_start + 0.1


def test_masks_are_learnt_on_batch_statistics_and_no_buffer_changes(trained_cnn, band_data):
    # In train mode BatchNorm ignores its running statistics, so corrupting them must not
    # change a single mask (in eval mode it would change them all); and the returned model
    # keeps the corrupted statistics exactly.
    default = run(trained_cnn, band_data)
    corrupted = copy.deepcopy(trained_cnn)
    with torch.no_grad():
        for name in BNS:
            corrupted[int(name)].running_var.mul_(50)
            corrupted[int(name)].running_mean.add_(1)
    before = snapshot(corrupted)
    result = run(corrupted, band_data)
    assert result.details["masks"] == default.details["masks"]
    for key, value in result.model.named_buffers():
        assert torch.equal(value, before[key]), key


def test_exactly_the_neurons_at_or_below_the_threshold_are_pruned(trained_cnn, band_data):
    before = snapshot(trained_cnn)
    default = run(trained_cnn, band_data)
    masks = {n: torch.tensor(m) for n, m in default.details["masks"].items()}
    assert list(masks) == LAYERS
    assert all(float(m.min()) >= 0 and float(m.max()) <= 1 for m in masks.values())
    assert float(masks[HIDDEN].min()) < 1, "the hidden Linear's masks must move too"

    more = run(trained_cnn, band_data, threshold=0.9)  # same seed: same masks
    zero = run(trained_cnn, band_data, threshold=0.0)  # masks clipped to exactly 0 go too
    for threshold, result in ((0.2, default), (0.9, more), (0.0, zero)):
        assert result.details["masks"] == default.details["masks"]
        assert result.steps == 25
        state = result.model.state_dict()
        for name, mask in masks.items():
            low = (mask <= threshold).nonzero().flatten().tolist()
            assert result.details["pruned"][name] == low
            expected = before[f"{name}.weight"].clone()
            expected[low] = 0  # a BN's γ_k, or row k of the Linear's weight
            assert torch.equal(state[f"{name}.weight"], expected)
        for key, value in state.items():  # everything else, shifts and buffers included
            if not any(key == f"{n}.weight" for n in LAYERS):
                assert torch.equal(value, before[key]), key
    assert more.details["count"] > default.details["count"] > zero.details["count"] > 0
    assert more.details["pruned"][HIDDEN]


def test_the_adversarial_term_is_what_drives_masks_down(trained_cnn, band_data):
    # On a well-fit model the clean loss alone (alpha = 1) barely moves the masks; with ANP's
    # alpha the perturbed loss pushes the sensitive neurons' masks down. (Unaugmented: the
    # tiny model was fit to these very images, not to their crops.)
    def total_drop(alpha):
        result = run(trained_cnn, band_data, alpha=alpha, augment=False)
        masks = torch.cat([torch.tensor(m) for m in result.details["masks"].values()])
        return float((1 - masks).sum())

    assert total_drop(0.2) > 5 * total_drop(1.0) + 0.1


def test_steps_are_mask_updates_and_follow_the_budget(trained_cnn, band_data):
    loader = clean_loader(band_data)  # 5 batches: iterations need not be whole passes
    settings = ANPSettings(iterations=7)
    result = defend("anp", trained_cnn, loader, settings, progress=False)
    assert result.steps == settings.planned_steps(len(loader)) == 7
    resized = settings.at_budget(12, len(loader))
    assert resized.planned_steps(len(loader)) == 12
    assert dataclasses.replace(resized, iterations=7) == settings  # nothing else changes
    with pytest.raises(SettingsError):
        settings.at_budget(0, len(loader))
    for bad in (dict(eps=-0.1), dict(steps=0), dict(alpha=1.5), dict(mask_lr=0),
                dict(iterations=-1)):
        with pytest.raises(SettingsError):
            ANPSettings(**bad)


def test_each_batch_is_cropped_and_flipped_once_as_the_reference_data(trained_cnn, band_data,
                                                                      monkeypatch):
    # The reference learns masks on its transform_train data: one augmentation per batch,
    # seen alike by the noise's ascent and the mask step.
    import tscpurify.defenses.anp as anp_module

    calls = []

    def spy(x, *args, **kwargs):
        calls.append(x.shape)
        return x

    monkeypatch.setattr(anp_module, "random_crop_flip", spy)
    result = run(trained_cnn, band_data)
    assert len(calls) == result.steps == 25
    calls.clear()
    run(trained_cnn, band_data, augment=False)
    assert calls == []
