"""i-BAU: implicit Backdoor Adversarial Unlearning. Find the universal perturbation that hurts
the model most on clean data, then unlearn it with the implicit hypergradient; repeat.

Zeng, Chen, Park, Mao, Jin & Jia, "Adversarial Unlearning of Backdoors via Implicit
Hypergradient", ICLR 2022, https://arxiv.org/abs/2110.03735. Reference implementations:
YiZeng623/I-BAU (`defense.py`, `hypergrad.py`) and SCLBD/BackdoorBench `defense/i-bau.py`.

The minimax problem: min_θ L(θ, δ*(θ)) with δ*(θ) = argmin_δ g(δ, θ) and
g(δ, θ) = −CE(f_θ(x + δ), y) + penalty·‖δ‖², one δ for all images, no norm bound.
Plan, with the model in eval mode throughout (as the reference: BatchNorm uses and keeps its
running statistics; its affine parameters are trained like any other):
  1. The clean batches are read once and kept, in order, for the unlearning passes.
  2. Per round, inner maximisation: δ = 0, then `inner_passes` passes over the clean loader of
     plain SGD (lr `inner_lr`) on g with y = the model's own predictions on the clean images.
  3. Per round, one unlearning pass over the kept batches; per batch one Adam step (lr `lr`) on
     the hypergradient of L = CE(f_θ(x with δ added to a random `portion` of the images), y)
     (true labels). The hypergradient is computed by `fixed_point_hypergradient` with
     `fixed_point_steps` (K) iterations of the map Φ(δ) = δ − map_lr·∇_δ g(δ, θ) on the first
     kept batch with its labels, as the reference's `hypergrad.fixed_point` with GradientDescent.

Differs from the reference: at least one image of each batch is perturbed in the unlearning loss
(the reference's ⌊n·portion⌋ is 0 for batches under 100 images), because otherwise i-BAU silently
becomes plain fine-tuning on small batches; δ lives in [0, 1] pixel space, unclipped (as the
authors' code; BackdoorBench adds it to normalised images), because our models normalise inside.

Settings (defaults, BackdoorBench's i-bau config and code): rounds 5, inner_passes 1, inner_lr 10,
penalty 0.001, fixed_point_steps 5 (K), map_lr 0.1, portion 0.01, lr 1e-4 (Adam with AMSGrad, no
weight decay, as BackdoorBench's optimizer; the authors' code uses plain Adam at 1e-3). A bench
grid's `budget_steps` resizes the rounds (budget.py): the fair grid's 2,460 steps are about 205
rounds where the reference runs 5.

Example:
    >>> result = defend("ibau", model, clean_loader)
    >>> result.details["perturbation_loss"]   # per round: clean loss, ‖δ‖ and loss under δ
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..errors import DataError, SettingsError
from ..resume import EpochCheckpoints
from ..training import device_of
from . import budget
from .base import DefenseResult
from .registered import DEFENSES


@dataclass(frozen=True)
class IBAUSettings:
    rounds: int = field(default=5, metadata={
        "help": "rounds of (perturbation search, one unlearning pass over the clean data)"})
    inner_passes: int = field(default=1, metadata={
        "help": "passes over the clean data of the perturbation search, per round"})
    inner_lr: float = field(default=10.0, metadata={
        "help": "SGD learning rate of the perturbation search"})
    penalty: float = field(default=0.001, metadata={
        "help": "c in the inner objective −CE + c·‖δ‖² (the perturbation has no norm bound)"})
    fixed_point_steps: int = field(default=5, metadata={
        "help": "K: fixed-point iterations of the implicit hypergradient"})
    map_lr: float = field(default=0.1, metadata={
        "help": "step of the gradient-descent map whose fixed point defines δ*(θ)"})
    portion: float = field(default=0.01, metadata={
        "help": "fraction of each unlearning batch that gets the perturbation (at least one)"})
    lr: float = field(default=1e-4, metadata={"help": "Adam learning rate of the unlearning"})

    def __post_init__(self) -> None:
        if self.rounds < 0 or self.inner_passes < 1 or self.fixed_point_steps < 0:
            raise SettingsError(f"i-BAU needs rounds ≥ 0, inner_passes ≥ 1, "
                                f"fixed_point_steps ≥ 0; got {self.rounds}, "
                                f"{self.inner_passes}, {self.fixed_point_steps}")
        if min(self.inner_lr, self.map_lr, self.lr) <= 0 or self.penalty < 0:
            raise SettingsError(f"i-BAU needs inner_lr, map_lr, lr > 0 and penalty ≥ 0; got "
                                f"{self.inner_lr}, {self.map_lr}, {self.lr}, {self.penalty}")
        if not 0 <= self.portion <= 1:
            raise SettingsError(f"i-BAU's portion must be in [0, 1], got {self.portion}")

    def planned_steps(self, batches_per_epoch: int) -> int:
        """One Adam step per clean batch per round."""
        return self.rounds * batches_per_epoch

    def at_budget(self, steps: int, batches_per_epoch: int) -> IBAUSettings:
        return dataclasses.replace(self, rounds=budget.epochs_for(steps, batches_per_epoch))


def fixed_point_hypergradient(inner: Sequence[Tensor], outer: Sequence[Tensor],
                              fixed_map: Callable[[list[Tensor]], list[Tensor]],
                              outer_loss: Callable[[list[Tensor]], Tensor], steps: int,
                              tol: float = 1e-10) -> list[Tensor]:
    """d/dθ of outer_loss(w*(θ), θ), where w*(θ) is a fixed point of w = fixed_map(w) (θ enters
    both callables implicitly, as the tensors `outer`), evaluated at w = `inner`.

    Implicit differentiation gives dL/dθ = ∂L/∂θ + (∂Φ/∂θ)ᵀ v with v = (I − ∂Φ/∂w)⁻ᵀ ∂L/∂w.
    v is found by `steps` iterations of v ← (∂Φ/∂w)ᵀ v + ∂L/∂w from v = 0, i.e. the first
    `steps` terms of the Neumann series, stopping early once v moves less than `tol`
    (Grazzi et al., ICML 2020; the reference's `hypergrad.fixed_point`). Exact when Φ is a
    contraction and steps → ∞. Outer tensors that L and Φ do not use get zeros.
    """
    w = [t.detach().requires_grad_(True) for t in inner]
    outer = list(outer)

    def grads(output: Tensor | Sequence[Tensor], wrt: Sequence[Tensor],
              cotangents: Sequence[Tensor] | None = None, retain: bool = True) -> list[Tensor]:
        found = torch.autograd.grad(output, wrt, grad_outputs=cotangents, retain_graph=retain,
                                    allow_unused=True)
        return [torch.zeros_like(t) if g is None else g for g, t in zip(found, wrt, strict=True)]

    loss = outer_loss(w)
    loss_w, loss_theta = grads(loss, w), grads(loss, outer, retain=False)
    mapped = fixed_map(w)  # built with create_graph=True: differentiable in w and θ
    v = [torch.zeros_like(t) for t in w]
    for _ in range(steps):
        previous = v
        v = [jv + g for jv, g in zip(grads(mapped, w, v), loss_w, strict=True)]
        moved = torch.cat([(a - b).flatten() for a, b in zip(v, previous, strict=True)])
        if float(moved.norm()) < tol:
            break
    implicit = grads(mapped, outer, v, retain=False)
    return [a + b for a, b in zip(loss_theta, implicit, strict=True)]


def inner_objective(model: nn.Module, x: Tensor, y: Tensor, delta: Tensor,
                    penalty: float) -> Tensor:
    """g(δ, θ) = −CE(f_θ(x + δ), y) + penalty·‖δ‖², minimised over δ."""
    return -F.cross_entropy(model(x + delta), y) + penalty * delta.pow(2).sum()


def universal_perturbation(model: nn.Module, loader: DataLoader, settings: IBAUSettings
                           ) -> Tensor:
    """A (1, C, H, W) perturbation raising the loss of the model's own predictions on `loader`:
    from 0, plain SGD on g over `inner_passes` passes, no norm bound and no clipping. The model
    is run in eval mode (its mode is restored) and is not changed."""
    device, was_training = device_of(model), model.training
    first = next(iter(loader))[0]
    delta = torch.zeros((1, *first.shape[1:]), device=device)
    model.eval()
    try:
        for _ in range(settings.inner_passes):
            for x, *_ in loader:
                x = x.to(device)
                with torch.no_grad():
                    predicted = model(x).argmax(1)  # the reference ignores the true labels here
                delta.requires_grad_(True)
                objective = inner_objective(model, x, predicted, delta, settings.penalty)
                (grad,) = torch.autograd.grad(objective, delta)
                delta = (delta - settings.inner_lr * grad).detach()
    finally:
        model.train(was_training)
    return delta


def chosen_images(n: int, portion: float, device: torch.device | str = "cpu") -> Tensor:
    """A (n,) 0/1 vector marking a random max(1, ⌊n·portion⌋) of n images (none if portion is
    0), drawn from torch's global RNG."""
    count = max(1, int(n * portion)) if portion > 0 else 0
    chosen = torch.zeros(n, device=device)
    chosen[torch.randperm(n)[:count].to(device)] = 1
    return chosen


def unlearning_hypergradient(model: nn.Module, params: Sequence[Tensor], delta: Tensor,
                             x: Tensor, y: Tensor, chosen: Tensor,
                             map_batch: tuple[Tensor, Tensor], settings: IBAUSettings
                             ) -> list[Tensor]:
    """The implicit hypergradient, for `params`, of the unlearning loss CE(f(x + chosen·δ), y)
    at δ = `delta` (chosen: 0/1 per image), with δ*(θ) the fixed point of the gradient-descent
    map on g over `map_batch` (images, labels)."""
    map_x, map_y = map_batch
    chosen = chosen.view(-1, *[1] * (x.dim() - 1))

    def fixed_map(w: list[Tensor]) -> list[Tensor]:
        objective = inner_objective(model, map_x, map_y, w[0], settings.penalty)
        (grad,) = torch.autograd.grad(objective, w[0], create_graph=True)
        return [w[0] - settings.map_lr * grad]

    def outer_loss(w: list[Tensor]) -> Tensor:
        return F.cross_entropy(model(x + chosen * w[0]), y)

    return fixed_point_hypergradient([delta], params, fixed_map, outer_loss,
                                     settings.fixed_point_steps)


@torch.no_grad()
def mean_loss(model: nn.Module, loader: DataLoader, delta: Tensor | None = None) -> float:
    """Mean cross-entropy on `loader` (true labels), of clean images or images plus `delta`."""
    device, was_training = device_of(model), model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for x, y, *_ in loader:
            x = x.to(device)
            x = x + delta if delta is not None else x
            total += float(F.cross_entropy(model(x), y.to(device), reduction="sum"))
            count += len(y)
    finally:
        model.train(was_training)
    if count == 0:
        raise DataError("the clean data loader gave no batches")
    return total / count


@DEFENSES.register("ibau", settings=IBAUSettings, needs_labels=True)
def ibau(model: nn.Module, clean: DataLoader, settings: IBAUSettings, *, seed: int,
         progress: bool, callbacks: dict) -> DefenseResult:
    s, device = settings, device_of(model)
    params = [p for p in model.parameters() if p.requires_grad]
    # AMSGrad, no weight decay: BackdoorBench's Adam (its optimizer factory with i-BAU's config),
    # whose learning rate this default takes; the authors' code uses plain Adam at 1e-3.
    optimizer = torch.optim.Adam(params, lr=s.lr, amsgrad=True)
    # 1. the unlearning batches, read once (the reference's images_list)
    kept = [(x.to(device), y.to(device)) for x, y, *_ in clean]
    if not kept:
        raise DataError("the clean data loader gave no batches")

    seconds = {"inner": 0.0, "outer": 0.0, "record": 0.0}
    record, deltas, steps = [], [], 0
    # A run cut short resumes after its last saved round (resume.py), after the kept batches
    # above are read: they come from the seeded start, as in an uninterrupted run.
    checkpoints = EpochCheckpoints.from_callbacks(callbacks, "ibau", s)
    stateful = {"model": model, "optimizer": optimizer}
    done, saved = checkpoints.resume(stateful)
    if saved:
        record, deltas, steps = saved["record"], saved["deltas"], saved["steps"]
        seconds = saved["seconds"]
    model.eval()
    for round_ in tqdm(range(done, s.rounds), desc="i-bau", disable=not progress, leave=False,
                       initial=done, total=s.rounds):
        began = time.perf_counter()
        # 2. the universal perturbation against the current model
        delta = universal_perturbation(model, clean, s)
        seconds["inner"] += time.perf_counter() - began
        began = time.perf_counter()  # the record's two evaluation passes are not the method's
        record.append({"clean": mean_loss(model, clean), "norm": float(delta.norm()),
                       "perturbed": mean_loss(model, clean, delta)})
        deltas.append(delta.cpu())
        seconds["record"] += time.perf_counter() - began
        began = time.perf_counter()
        # 3. unlearn it, one hypergradient step per kept batch
        for x, y in kept:
            chosen = chosen_images(len(x), s.portion, device)  # one draw per step
            hypergradient = unlearning_hypergradient(model, params, delta, x, y, chosen,
                                                     kept[0], s)
            for p, g in zip(params, hypergradient, strict=True):
                p.grad = g
            optimizer.step()
            steps += 1
        seconds["outer"] += time.perf_counter() - began
        checkpoints.save(round_ + 1, stateful, {"record": record, "deltas": deltas,
                                                "steps": steps, "seconds": seconds},
                         final=round_ + 1 == s.rounds)
    details = {"perturbation_loss": record, "perturbations": deltas}
    return DefenseResult(model.eval(), details, {**seconds, **checkpoints.seconds()},
                         steps=steps)
