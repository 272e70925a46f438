import copy
import dataclasses

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from tscpurify.defenses import defend
from tscpurify.defenses.ft_sam import (
    FTSAMSettings,
    frozen_running_stats,
    sam_perturbation,
    smooth_cross_entropy,
)
from tscpurify.errors import SettingsError

from .conftest import CLASSES, snapshot

STATS = ("running_mean", "running_var")


def parameters_and_gradients(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(4, 3, generator=g), torch.randn(5, generator=g)]
    grads = [torch.randn(p.shape, generator=g) for p in params]
    return params, grads


def test_plain_sam_step_has_norm_rho_along_the_gradient():
    params, grads = parameters_and_gradients()
    eps = sam_perturbation(params, grads, rho=0.7, adaptive=False)
    flat_eps, flat_grad = torch.cat([e.flatten() for e in eps]), torch.cat([g.flatten()
                                                                         for g in grads])
    assert float(flat_eps.norm()) == pytest.approx(0.7, rel=1e-5)
    assert torch.allclose(flat_eps, 0.7 * flat_grad / flat_grad.norm(), atol=1e-6)


def test_adaptive_sam_step_has_norm_rho_relative_to_the_weights():
    params, grads = parameters_and_gradients(1)
    eps = sam_perturbation(params, grads, rho=2.0, adaptive=True, eta=0.01)
    relative = torch.cat([(e / (p.abs() + 0.01)).flatten() for e, p in zip(eps, params,
                                                                            strict=True)])
    assert float(relative.norm()) == pytest.approx(2.0, rel=1e-5)
    # Larger weights get larger steps: ε_i ∝ (|w_i| + eta)² g_i.
    ratio = torch.cat([(e / ((p.abs() + 0.01) ** 2 * g)).flatten()
                       for e, p, g in zip(eps, params, grads, strict=True)])
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-4)
    assert float(torch.cat([e.flatten() for e in eps]).norm()) != pytest.approx(2.0, rel=1e-2)


def test_default_adaptive_step_is_the_references_rho_w2_g_over_norm_of_w_g():
    params, grads = parameters_and_gradients(2)
    assert FTSAMSettings().adaptive and FTSAMSettings().eta == 0.0
    eps = sam_perturbation(params, grads, rho=2.0, adaptive=True)
    norm = torch.cat([(p.abs() * g).flatten() for p, g in zip(params, grads, strict=True)]).norm()
    for e, p, g in zip(eps, params, grads, strict=True):
        assert torch.allclose(e, 2.0 * p.pow(2) * g / norm, atol=1e-6)


def test_label_smoothing_puts_s_over_c_minus_1_on_every_other_class():
    g = torch.Generator().manual_seed(3)
    logits, labels = torch.randn(6, CLASSES, generator=g), torch.arange(6) % CLASSES
    # Target 1 − s on the label and s/(C − 1) elsewhere is torch's smoothing of s·C/(C − 1).
    torch_style = F.cross_entropy(logits, labels, label_smoothing=0.1 * CLASSES / (CLASSES - 1))
    assert torch.allclose(smooth_cross_entropy(logits, labels, 0.1), torch_style, atol=1e-6)
    assert not torch.allclose(smooth_cross_entropy(logits, labels, 0.1),
                              F.cross_entropy(logits, labels, label_smoothing=0.1), atol=1e-4)
    assert torch.allclose(smooth_cross_entropy(logits, labels, 0.0),
                          F.cross_entropy(logits, labels), atol=1e-6)


def test_frozen_running_stats_normalise_on_the_batch_but_keep_the_buffers():
    bn, cumulative = nn.BatchNorm2d(3).train(), nn.BatchNorm2d(3, momentum=None).train()
    model = nn.Sequential(bn, cumulative)
    x = torch.randn(8, 3, 4, 4) * 3 + 1
    with torch.no_grad():
        model(x)  # move the statistics away from their initial values
    before = snapshot(model)
    with frozen_running_stats(model), torch.no_grad():
        out = model(x)
    for key in (f"{m}.{stat}" for m in "01" for stat in STATS):
        assert torch.equal(model.state_dict()[key], before[key]), key
    # normalised with the batch's own statistics, not the running ones
    assert torch.allclose(out.mean((0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert bn.momentum == 0.1 and cumulative.momentum is None  # restored


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_one_step_descends_with_the_gradient_taken_at_the_perturbed_weights(trained_cnn,
                                                                             band_data,
                                                                             smoothing):
    x, y = band_data.tensors[0][:32], band_data.tensors[1][:32]
    one_batch = DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    lr, rho = 0.1, 0.5
    result = defend("ft_sam", trained_cnn, one_batch, progress=False, epochs=1, lr=lr, rho=rho,
                    adaptive=False, momentum=0.0, weight_decay=0.0, label_smoothing=smoothing,
                    augment=False)

    # Oracle: w − lr · ∇L(w + rho · g/‖g‖), g = ∇L(w), BatchNorm on batch statistics, L the
    # cross-entropy with the reference's smoothing (torch's smoothing of s·C/(C − 1)).
    def loss(logits):
        return F.cross_entropy(logits, y, label_smoothing=smoothing * CLASSES / (CLASSES - 1))

    model = copy.deepcopy(trained_cnn).train()
    params = list(model.parameters())
    grads = torch.autograd.grad(loss(model(x)), params)
    first_pass = {k: v.clone() for k, v in model.state_dict().items() if k.endswith(STATS)}
    norm = torch.cat([g.flatten() for g in grads]).norm()
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            p.add_(rho * g / norm)
    sharp = torch.autograd.grad(loss(model(x)), params)
    start = dict(trained_cnn.named_parameters())
    for (name, p), g in zip(result.model.named_parameters(), sharp, strict=True):
        assert torch.allclose(p, start[name] - lr * g, atol=1e-5), name
    # ...and not the plain gradient step.
    plain = torch.cat([(start[n] - lr * g).flatten() for (n, _), g in
                       zip(result.model.named_parameters(), grads, strict=True)])
    assert not torch.allclose(torch.cat([p.flatten() for p in result.model.parameters()]),
                              plain, atol=1e-5)
    # The running statistics are the first pass's: the perturbed pass left them untouched.
    state = result.model.state_dict()
    for key, value in first_pass.items():
        assert torch.equal(state[key], value), key
        assert not torch.equal(value, trained_cnn.state_dict()[key]), key


def test_steps_are_sgd_updates_and_follow_the_budget(trained_cnn, band_data):
    loader = DataLoader(band_data, batch_size=32, shuffle=True)
    settings = FTSAMSettings(epochs=2, augment=False)
    result = defend("ft_sam", trained_cnn, loader, settings, progress=False)
    assert result.steps == settings.planned_steps(len(loader)) == 2 * 5
    for steps in (1, 7, 12, 40):
        resized = settings.at_budget(steps, len(loader))
        assert abs(resized.planned_steps(len(loader)) - steps) <= len(loader)
        assert dataclasses.replace(resized, epochs=2) == settings
    with pytest.raises(SettingsError):
        settings.at_budget(0, len(loader))
    for bad in (dict(epochs=-1), dict(lr=0), dict(rho=-1), dict(eta=-1),
                dict(label_smoothing=1.0)):
        with pytest.raises(SettingsError):
            FTSAMSettings(**bad)
