import copy
import math

import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from tscpurify.defenses import defend
from tscpurify.defenses.budget import at_budget, planned_steps
from tscpurify.defenses.sau import SAUSettings, log_one_minus_p, shared_perturbation
from tscpurify.errors import SettingsError

from .conftest import band_images


def nearby(model, scale=0.05, seed=4):
    """A copy with small weight noise: a model near the suspect one, as h is during SAU."""
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=g))
    return other.eval()


def test_shared_examples_fool_both_models_into_the_same_wrong_label(trained_cnn):
    x, y = band_images(64, seed=5)
    suspect, current = trained_cnn, nearby(trained_cnn)
    with torch.no_grad():
        assert (suspect(x).argmax(1) == y).all() and (current(x).argmax(1) == y).all()
    bound = 0.2
    delta = shared_perturbation(current, suspect, x, y, bound=bound, steps=5, step_size=bound)
    assert float(delta.abs().max()) <= bound + 1e-6
    signs = torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        rates = []
        for d in (delta, bound * signs):  # the PGD example, a random corner of the same ball
            label, ref_label = current(x + d).argmax(1), suspect(x + d).argmax(1)
            rates.append(float(((label == ref_label) & (label != y)).float().mean()))
    shared, random = rates
    assert shared >= 0.3 and shared > random + 0.25, rates
    assert not current.training and not suspect.training


def test_log_one_minus_p_is_exact_and_stays_finite_when_p_is_near_one():
    logits = torch.tensor([[2.0, 0.5, -1.0], [40.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    label = torch.tensor([0, 0, 2])
    naive = torch.log1p(-F.softmax(logits.double(), 1)[torch.arange(3), label])
    got = log_one_minus_p(logits, label)
    assert torch.allclose(got[[0, 2]].double(), naive[[0, 2]], atol=1e-6)
    assert got[1] == pytest.approx(-40 + math.log(2), abs=1e-4)  # 1 − p = 2e^−40/(…) ≈ 2e^−40


def sar_loss(model, reference, x, y, delta):
    """Step 2's objective with the default weights, written out: clean CE plus
    −log(1 − p_h(ŷ₀ | x+δ)) (p ≥ 0.001) on the images h₀ really misclassifies."""
    logits, adv_logits = model(x), model(x + delta)
    with torch.no_grad():
        ref_clean, ref_adv = reference(x).argmax(1), reference(x + delta).argmax(1)
    target = (ref_adv != y) & (ref_adv != ref_clean)
    p = F.softmax(adv_logits, 1).gather(1, ref_adv[:, None])[:, 0].clamp(min=1e-3)
    sar = -(torch.log1p(-p) * target).sum() / len(x)
    return F.cross_entropy(logits, y) + sar, sar, target


def test_unlearning_steps_take_adam_on_the_objective_against_the_frozen_suspect(trained_cnn,
                                                                               band_data):
    # In float64: Adam divides by √v, so on a weight whose gradient is ~0 the float32 rounding
    # of two equal forward passes (one batched, one split; summation order is CPU-dependent)
    # becomes an lr-sized step. float64 leaves a numerical difference far below the tolerance.
    trained_cnn = trained_cnn.double()
    x, y = band_data.tensors[0][:64].double(), band_data.tensors[1][:64]
    two_batches = DataLoader(TensorDataset(x, y), batch_size=32)
    lr = 1e-3
    result = defend("sau", trained_cnn, two_batches, progress=False, epochs=1, lr=lr)
    assert result.steps == 2

    # Oracle: h₀ stays the input model throughout; BatchNorm in eval mode.
    model, reference = copy.deepcopy(trained_cnn).eval(), copy.deepcopy(trained_cnn).eval()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, amsgrad=True)
    for xb, yb in two_batches:
        delta = shared_perturbation(model, reference, xb, yb, bound=0.2, steps=5,
                                    step_size=0.2)
        loss, _, target = sar_loss(model, reference, xb, yb, delta)
        assert target.any()  # the test exercises the shared term
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for (name, p), q in zip(result.model.named_parameters(), model.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), name
    for name, buffer in trained_cnn.named_buffers():  # fixed BN: running stats untouched
        assert torch.equal(buffer, dict(result.model.named_buffers())[name]), name


def test_one_unlearning_step_lowers_the_loss_on_the_shared_examples(trained_cnn, band_data):
    x, y = band_data.tensors[0][:32], band_data.tensors[1][:32]
    # At the first step h = h₀, so the step's shared examples are these.
    delta = shared_perturbation(trained_cnn, copy.deepcopy(trained_cnn), x, y, bound=0.2,
                                steps=5, step_size=0.2)
    with torch.no_grad():
        _, before, target = sar_loss(trained_cnn, trained_cnn, x, y, delta)
    assert target.float().mean() >= 0.25  # h₀ is fooled on a good share of the batch
    result = defend("sau", trained_cnn, DataLoader(TensorDataset(x, y), batch_size=32),
                    progress=False, epochs=1, lr=1e-3)
    with torch.no_grad():
        _, after, _ = sar_loss(result.model, trained_cnn, x, y, delta)
    assert float(after) < 0.9 * float(before), (float(before), float(after))


def test_train_mode_updates_batchnorm_statistics(trained_cnn, band_data):
    one_batch = DataLoader(TensorDataset(*band_data.tensors), batch_size=32)
    result = defend("sau", trained_cnn, one_batch, progress=False, epochs=1, pgd_steps=1,
                    train_mode=True)
    means = [n for n, _ in trained_cnn.named_buffers() if n.endswith("running_mean")]
    assert means
    after = dict(result.model.named_buffers())
    assert all(not torch.equal(after[n], dict(trained_cnn.named_buffers())[n]) for n in means)


def test_steps_taken_match_the_plan_and_a_budget_resizes_the_epochs(trained_cnn, band_data):
    loader = DataLoader(band_data, batch_size=32)  # 160 images: 5 batches
    settings = at_budget(SAUSettings(pgd_steps=1), 12, len(loader))
    assert settings.epochs == 2 and planned_steps(settings, len(loader)) == 10
    assert SAUSettings().planned_steps(5) == 500
    assert at_budget(SAUSettings(), 1, 5).epochs == 1
    result = defend("sau", trained_cnn, loader, settings, progress=False)
    assert result.steps == planned_steps(settings, len(loader)) == 10
    assert len(result.details["losses"]) == len(result.details["shared"]) == 2
    assert set(result.seconds) >= {"pgd", "unlearn", "total"}


@pytest.mark.parametrize("bad", [dict(bound=0.0), dict(pgd_steps=0), dict(lr=0.0),
                                 dict(epochs=-1), dict(share_weight=-1.0)])
def test_bad_settings_are_refused(bad):
    with pytest.raises(SettingsError):
        SAUSettings(**bad)


def test_the_unlearning_optimiser_is_backdoorbenchs_amsgrad_adam(trained_cnn, band_data,
                                                                adam_calls):
    defend("sau", trained_cnn, DataLoader(band_data, batch_size=32), progress=False, epochs=1)
    assert adam_calls == [{"lr": 1e-4, "amsgrad": True}]
