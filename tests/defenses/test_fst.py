import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from tscpurify.defenses import defend
from tscpurify.defenses import fst as fst_module
from tscpurify.defenses._common import accuracy
from tscpurify.defenses.fst import FSTSettings, classifier_head
from tscpurify.errors import SettingsError, SpecError

from .conftest import CLASSES, SIZE


@pytest.fixture
def spy(monkeypatch):
    """Records the head's weight and bias right after the defense re-initialises it."""
    seen = []

    def recording(head):
        reinitialise(head)
        bias = None if head.bias is None else head.bias.detach().clone()
        seen.append((head.weight.detach().clone(), bias))

    reinitialise = fst_module.reinitialise_head
    monkeypatch.setattr(fst_module, "reinitialise_head", recording)
    return seen


class HeadFirst(nn.Module):
    """The head is declared (and registered) first but called last, after another Linear."""

    def __init__(self):
        super().__init__()
        self.out = nn.Linear(8, CLASSES)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(SIZE * SIZE, 8), nn.ReLU())

    def forward(self, x):
        return self.out(self.body(x))


def test_head_is_the_linear_whose_output_is_the_models_output(trained_cnn, band_data):
    x = band_data.tensors[0][:8]
    name, head = classifier_head(trained_cnn, x)
    assert head is trained_cnn[-1] and name == str(len(trained_cnn) - 1)
    assert trained_cnn[-3].out_features != CLASSES  # the other Linear is not taken

    model = HeadFirst().train()
    name, head = classifier_head(model, x)
    assert (name, head) == ("out", model.out)
    assert model.training and all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("model", [
    nn.Sequential(nn.Conv2d(1, CLASSES, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()),
    nn.Sequential(nn.Flatten(), nn.Linear(SIZE * SIZE, CLASSES), nn.Tanh()),
], ids=["conv-head", "linear-then-tanh"])
def test_a_model_without_a_linear_head_is_refused(model, band_data):
    with pytest.raises(SpecError, match="linear classification head"):
        defend("fst", model, DataLoader(band_data, batch_size=32), progress=False, epochs=1)


def test_a_frozen_head_is_refused(trained_cnn, band_data):
    trained_cnn[-1].weight.requires_grad_(False)
    with pytest.raises(SpecError, match="frozen"):
        defend("fst", trained_cnn, DataLoader(band_data, batch_size=32), progress=False)


def test_the_head_is_reinitialised_from_the_seeded_rng(trained_cnn, band_data, spy):
    loader = DataLoader(band_data, batch_size=32)
    for seed in (1, 1, 2):
        defend("fst", trained_cnn, loader, progress=False, seed=seed, epochs=1, lr=1e-4)
    (first, first_bias), (again, again_bias), (other, _) = spy
    original = trained_cnn[-1].weight.detach()
    assert first.shape == original.shape
    assert not torch.allclose(first, original, atol=1e-3)
    bound = 1 / math.sqrt(original.shape[1])
    assert first.abs().max() <= bound and first_bias.abs().max() <= bound
    assert first.std() > bound / 3  # spread over the range, not a constant
    assert torch.equal(first, again) and torch.equal(first_bias, again_bias)
    assert not torch.allclose(first, other)


def test_one_step_is_cross_entropy_plus_the_shift_penalty_then_the_norm_projection(
        trained_cnn, band_data, spy):
    x, y = band_data.tensors[0][:32], band_data.tensors[1][:32]
    one_batch = DataLoader(TensorDataset(x, y), batch_size=32)
    lr, alpha = 0.1, 0.5
    result = defend("fst", trained_cnn, one_batch, progress=False, epochs=1, lr=lr, alpha=alpha,
                    momentum=0.0, augment=False)
    assert result.steps == 1

    # Oracle: from the re-initialised head, one SGD step on CE + α·Σ W ⊙ W₀, then
    # W ← W · ‖W₀‖ / ‖W‖ (BatchNorm on batch statistics).
    w0 = trained_cnn[-1].weight.detach()
    start_weight, start_bias = spy[0]

    def step(alpha):
        model = copy.deepcopy(trained_cnn).train()
        with torch.no_grad():
            model[-1].weight.copy_(start_weight)
            model[-1].bias.copy_(start_bias)
        params = list(model.parameters())
        loss = F.cross_entropy(model(x), y) + alpha * (model[-1].weight * w0).sum()
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p.sub_(lr * g)
            model[-1].weight.mul_(w0.norm() / model[-1].weight.norm())
        return model

    oracle = step(alpha)
    for (name, p), q in zip(result.model.named_parameters(), oracle.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-5), name
    # ...and the penalty made a difference: without it the head lands elsewhere.
    assert not torch.allclose(result.model[-1].weight, step(0.0)[-1].weight, atol=1e-4)


def test_the_penalty_turns_the_head_away_from_the_original_at_the_original_norm(
        trained_cnn, band_data):
    w0 = trained_cnn[-1].weight.detach()
    inner = {}
    for alpha in (0.0, 1.0):
        loader = DataLoader(band_data, batch_size=32, shuffle=True)
        result = defend("fst", trained_cnn, loader, progress=False, seed=3, epochs=3,
                        alpha=alpha, augment=False)
        weight = result.model[-1].weight.detach()
        assert float(weight.norm()) == pytest.approx(float(w0.norm()), rel=1e-5)
        inner[alpha] = float((weight * w0).sum())
        assert result.details["inner_products"][-1] == pytest.approx(inner[alpha], rel=1e-5)
        assert result.details["head"] == str(len(trained_cnn) - 1)
    assert inner[1.0] < inner[0.0] - 0.1 * float(w0.norm()) ** 2


def test_fst_keeps_clean_accuracy_and_frozen_parameters(trained_cnn, band_data):
    trained_cnn[1].weight.requires_grad_(False)  # the first convolution
    frozen = trained_cnn[1].weight.detach().clone()
    loader = DataLoader(band_data, batch_size=32, shuffle=True)
    # The reference's defaults, except the crop: a 4-pixel shift erases these 3-row bands.
    result = defend("fst", trained_cnn, loader, progress=False, seed=0, augment=False)
    assert torch.equal(result.model[1].weight, frozen)
    assert accuracy(result.model, DataLoader(band_data, batch_size=80)) >= 0.9


def test_steps_reported_equal_planned_and_the_budget_resizes_epochs(trained_cnn, band_data):
    loader = DataLoader(band_data, batch_size=32, shuffle=True)  # 5 batches
    settings = FSTSettings(epochs=2)
    result = defend("fst", trained_cnn, loader, settings, progress=False)
    assert result.steps == settings.planned_steps(len(loader)) == 10
    assert len(result.details["losses"]) == 2
    # The reference's schedule: cosine over epochs, one rate per epoch.
    four = defend("fst", trained_cnn, loader, progress=False, epochs=4, lr=0.02)
    expected = [0.01 * (1 + math.cos(math.pi * e / 4)) for e in range(4)]
    assert four.details["lrs"] == pytest.approx(expected)

    assert FSTSettings().at_budget(50, 5) == FSTSettings(epochs=10)
    resized = FSTSettings(alpha=0.1).at_budget(23, 5)
    assert resized.epochs == 5 and resized.alpha == 0.1
    assert resized.planned_steps(5) == 25
    assert FSTSettings().at_budget(2, 5).epochs == 1  # never below one pass


@pytest.mark.parametrize("bad", [dict(epochs=0), dict(lr=0.0), dict(alpha=-0.1),
                                 dict(crop_padding=-1)])
def test_bad_settings_are_refused(bad):
    with pytest.raises(SettingsError):
        FSTSettings(**bad)
