import dataclasses

import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from tscpurify.defenses import defend
from tscpurify.defenses.ibau import (
    IBAUSettings,
    chosen_images,
    fixed_point_hypergradient,
    mean_loss,
    universal_perturbation,
    unlearning_hypergradient,
)
from tscpurify.errors import SettingsError

from .conftest import CLASSES, snapshot


def quadratic_problem(seed: int = 0):
    """Inner g(w, θ) = ½wᵀAw − wᵀBθ (so w*(θ) = A⁻¹Bθ), outer L(w, θ) = ½‖w − c‖² + dᵀθ."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))
    a = q @ torch.diag(torch.tensor([1.0, 1.5, 2.0, 3.0], dtype=torch.float64)) @ q.T
    b, c, d = (torch.randn(*shape, generator=g, dtype=torch.float64)
               for shape in ((4, 3), (4,), (3,)))
    theta = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    return a, b, c, d, theta


def test_hypergradient_is_the_implicit_derivative_on_a_quadratic_problem():
    a, b, c, d, theta = quadratic_problem()
    eta = 0.1  # Φ(w) = w − η∇g is a contraction: |1 − ηλ| ≤ 0.9

    def fixed_map(w):
        (grad,) = torch.autograd.grad(0.5 * w[0] @ a @ w[0] - w[0] @ b @ theta, w[0],
                                      create_graph=True)
        return [w[0] - eta * grad]

    def outer_loss(w):
        return 0.5 * (w[0] - c).pow(2).sum() + d @ theta

    w_star = torch.linalg.solve(a, b @ theta.detach())
    exact = b.T @ torch.linalg.solve(a, w_star - c) + d  # Bᵀ A⁻¹ (w* − c) + d
    (converged,) = fixed_point_hypergradient([w_star], [theta], fixed_map, outer_loss, 400)
    assert torch.allclose(converged, exact, atol=1e-8)
    # K iterations: the first K terms of the Neumann series, ηBᵀ Σ_{k<K} (I − ηA)^k (w* − c).
    for steps in (0, 1, 3):
        (truncated,) = fixed_point_hypergradient([w_star], [theta], fixed_map, outer_loss, steps)
        v = sum((torch.linalg.matrix_power(torch.eye(4, dtype=torch.float64) - eta * a, k)
                 @ (w_star - c) for k in range(steps)), torch.zeros(4, dtype=torch.float64))
        assert torch.allclose(truncated, eta * b.T @ v + d, atol=1e-10)
    assert not torch.allclose(truncated, exact, atol=1e-3)  # K = 3 is not converged here


def test_hypergradient_matches_finite_differences_on_a_nonlinear_problem():
    # g(w, θ) = ½‖w‖² + ¼Σw⁴ − tanh(Bθ)ᵀw: strongly convex in w, w* found by iterating Φ.
    # L(w, θ) = Σ sin(w) + ‖θ‖², so both the direct and the implicit term matter.
    g = torch.Generator().manual_seed(1)
    b = torch.randn(5, 3, generator=g, dtype=torch.float64)
    theta = torch.randn(3, generator=g, dtype=torch.float64)
    eta = 0.2

    def grad_g(w, th):
        return w + w.pow(3) - torch.tanh(b @ th)

    def solve(th):
        w = torch.zeros(5, dtype=torch.float64)
        for _ in range(2000):
            w = w - eta * grad_g(w, th)
        return w

    def total(th):
        return float(torch.sin(solve(th)).sum() + th.pow(2).sum())

    h = 1e-6
    numeric = torch.tensor([(total(theta + h * e) - total(theta - h * e)) / (2 * h)
                            for e in torch.eye(3, dtype=torch.float64)], dtype=torch.float64)
    leaf = theta.clone().requires_grad_(True)
    (analytic,) = fixed_point_hypergradient(
        [solve(theta)], [leaf], lambda w: [w[0] - eta * grad_g(w[0], leaf)],
        lambda w: torch.sin(w[0]).sum() + leaf.pow(2).sum(), 300)
    assert torch.allclose(analytic, numeric, atol=1e-6)
    implicit_only = analytic - 2 * theta
    assert float(implicit_only.abs().max()) > 0.05  # the implicit term is not negligible


def test_perturbation_search_is_unbounded_penalised_sgd_on_the_model_predictions(trained_cnn,
                                                                                 band_data):
    before = snapshot(trained_cnn)
    images, labels = band_data.tensors
    ordered = DataLoader(band_data, batch_size=32)
    wrong = DataLoader(TensorDataset(images, (labels + 1) % CLASSES), batch_size=32)
    settings = IBAUSettings(inner_passes=2)
    delta = universal_perturbation(trained_cnn, ordered, settings)
    # The labels the loader gives play no part: the model's own predictions are the targets.
    assert torch.equal(delta, universal_perturbation(trained_cnn, wrong, settings))

    # Oracle: plain SGD (lr 10) on −CE(f(x + δ), argmax f(x)) + 0.001·‖δ‖², no projection.
    oracle = torch.zeros(1, 1, 12, 12, requires_grad=True)
    for _ in range(2):
        for x, _ in ordered:
            target = trained_cnn(x).argmax(1)
            objective = (-F.cross_entropy(trained_cnn(x + oracle), target)
                         + 0.001 * oracle.pow(2).sum())
            (grad,) = torch.autograd.grad(objective, oracle)
            oracle = (oracle - 10 * grad).detach().requires_grad_(True)
    assert torch.allclose(delta, oracle, atol=1e-5)
    assert float(delta.norm()) > 5  # far beyond the old L2 bound of 1.8: nothing caps it
    assert mean_loss(trained_cnn, ordered, delta) > mean_loss(trained_cnn, ordered) + 1
    for key, value in trained_cnn.state_dict().items():  # the search never trains the model
        assert torch.equal(value, before[key]), key


def test_the_unlearning_loss_perturbs_a_portion_of_each_batch_and_at_least_one_image():
    torch.manual_seed(0)
    for n, portion, expected in ((256, 0.01, 2), (100, 0.01, 1), (32, 0.01, 1), (10, 0.5, 5),
                                 (32, 0.0, 0), (32, 1.0, 32)):
        chosen = chosen_images(n, portion)
        assert chosen.shape == (n,) and set(chosen.tolist()) <= {0.0, 1.0}
        assert int(chosen.sum()) == expected
    draws = {tuple(chosen_images(32, 0.01).nonzero().flatten().tolist()) for _ in range(20)}
    assert len(draws) > 1  # a fresh random choice every step


def test_unlearning_hypergradient_matches_explicit_hessian_vector_products(trained_cnn,
                                                                          band_data):
    # An independent route to the same quantity: v = Σ_{k<K} (I − ηH)^k ∂L/∂δ with H the
    # Hessian of g in δ (as Hessian-vector products), then ∂L/∂θ − η ∂/∂θ (∇_δ g · v).
    model = trained_cnn
    params = list(model.parameters())
    images, labels = band_data.tensors
    x, y, map_x, map_y = images[32:48], labels[32:48], images[:32], labels[:32]
    settings = IBAUSettings(fixed_point_steps=3, map_lr=0.1, penalty=0.001)
    torch.manual_seed(0)
    delta = 0.3 * torch.randn(1, 1, 12, 12)
    chosen = torch.zeros(16)
    chosen[[1, 5, 6]] = 1
    result = unlearning_hypergradient(model, params, delta, x, y, chosen, (map_x, map_y),
                                      settings)

    mask = chosen.view(-1, 1, 1, 1)
    d = delta.clone().requires_grad_(True)
    outer = F.cross_entropy(model(x + mask * d), y)
    (outer_d,) = torch.autograd.grad(outer, d, retain_graph=True)
    outer_theta = torch.autograd.grad(outer, params)
    inner = -F.cross_entropy(model(map_x + d), map_y) + 0.001 * d.pow(2).sum()
    (inner_d,) = torch.autograd.grad(inner, d, create_graph=True)
    v, term = torch.zeros_like(delta), outer_d
    for _ in range(3):
        v = v + term
        (hv,) = torch.autograd.grad(inner_d, d, grad_outputs=term, retain_graph=True)
        term = term - 0.1 * hv
    implicit = torch.autograd.grad(inner_d, params, grad_outputs=v)
    for got, direct, extra in zip(result, outer_theta, implicit, strict=True):
        assert torch.allclose(got, direct - 0.1 * extra, atol=1e-5, rtol=1e-4)
    # ...and the implicit term is really there.
    plain = unlearning_hypergradient(model, params, delta, x, y, chosen, (map_x, map_y),
                                     dataclasses.replace(settings, fixed_point_steps=0))
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(result, plain, strict=True))


def test_unlearning_steps_follow_the_budget_and_keep_batchnorm_statistics(trained_cnn,
                                                                          band_data):
    loader = DataLoader(band_data, batch_size=32)
    before = snapshot(trained_cnn)
    settings = IBAUSettings(rounds=2, portion=1.0, lr=1e-3)
    result = defend("ibau", trained_cnn, loader, settings, progress=False)
    assert result.steps == settings.planned_steps(len(loader)) == 2 * 5
    # The reference runs in eval mode throughout: running statistics are used, never updated.
    for key, value in result.model.named_buffers():
        assert torch.equal(value, before[key]), key
    assert any(not torch.equal(p, before[k]) for k, p in result.model.named_parameters())
    # Unlearning the first round's δ makes the model far less sensitive to it.
    first = result.details["perturbations"][0]
    assert mean_loss(result.model, loader, first) < 0.5 * mean_loss(trained_cnn, loader, first)

    for steps in (1, 7, 12, 40):
        resized = settings.at_budget(steps, len(loader))
        assert abs(resized.planned_steps(len(loader)) - steps) <= len(loader)
        assert dataclasses.replace(resized, rounds=2) == settings
    with pytest.raises(SettingsError):
        settings.at_budget(0, len(loader))
    for bad in (dict(rounds=-1), dict(inner_passes=0), dict(fixed_point_steps=-1),
                dict(inner_lr=0), dict(penalty=-1), dict(portion=1.5), dict(lr=0)):
        with pytest.raises(SettingsError):
            IBAUSettings(**bad)


def test_the_outer_optimiser_is_backdoorbenchs_amsgrad_adam(trained_cnn, band_data, adam_calls):
    # BackdoorBench's optimizer factory (whose i-BAU learning rate is our default) builds Adam
    # with amsgrad=True and no weight decay.
    defend("ibau", trained_cnn, DataLoader(band_data, batch_size=32), IBAUSettings(rounds=1),
           progress=False)
    assert adam_calls == [{"lr": 1e-4, "amsgrad": True}]
