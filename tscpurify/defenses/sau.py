"""SAU: Shared Adversarial Unlearning. Find perturbations that fool the suspect model and the
model being repaired in the same way, then teach the repaired model to stop sharing them.

Wei, Zhang, Zha & Wu, "Shared Adversarial Unlearning: Backdoor Mitigation by Unlearning Shared
Adversarial Examples", NeurIPS 2023, https://arxiv.org/abs/2307.10562. Reference: the authors'
implementation in BackdoorBench, `defense/sau.py` (its `Shared_PGD`) and
`config/defense/sau/config.yaml`.

A poisoned input is an adversarial example that the backdoored model h₀ and any model still
carrying the backdoor send to the same (target) class; so the backdoor risk of the repaired
model h is bounded by its risk on the shared adversarial examples (SAEs) of h and h₀.
Plan: h₀ is a frozen copy of the suspect model, h starts from it; per clean mini-batch (x, y):
  1. Shared PGD, both models in eval mode: δ starts at +bound on every pixel; `pgd_steps`
     signed steps of size `pgd_step_size` descend
         adv_weight · L_adv + share_weight · L_share,
     L_adv = −½ mean of CE(h(x+δ), y) over the images h does not yet misclassify (relative to
     its clean prediction) and likewise for h₀; L_share = mean Jensen–Shannon divergence of
     h(x+δ) and h₀(x+δ) over the images that are not yet shared (both fooled, same label);
     project δ onto ‖δ‖∞ ≤ bound; stop early once every image is shared.
  2. Unlearning, one Adam (AMSGrad) step on
         clean_weight · CE(h(x), y) + at_weight · CE(h(x+δ), y) + unlearn_weight · L_sar,
     L_sar = mean over the batch of −log(1 − p_h(ŷ₀ | x+δ)) for the images whose h₀ label
     ŷ₀ = argmax h₀(x+δ) is wrong (≠ y and ≠ h₀'s clean label), 0 for the others: h must not
     follow h₀ to its adversarial class. BatchNorm stays in eval mode unless `train_mode`.

Differs from the reference: L_sar is computed from the logits with logsumexp instead of from
softmax probabilities with 1e-6 guards, because the guards cap the loss at 13.8 and zero its
gradient exactly where h is most confident in h₀'s adversarial class; only the reference's
defaults of L∞ ball and +bound start are offered. The bound needs no rescaling: the reference
also perturbs [0, 1] pixels (it de-normalises first) and does not clip x + δ to [0, 1].

Settings (defaults, the reference's config, as in the paper's experiments): epochs 100,
Adam with AMSGrad, lr 1e-4 (the config names a cosine schedule the loop never steps, so
constant), bound 0.2, pgd_steps 5, pgd_step_size 0.2, adv_weight 0.01 and share_weight 1
(beta_1, beta_2; the paper's λ3, λ4), clean_weight 1, at_weight 0, unlearn_weight 1
(lmd_1..lmd_3; the paper's λ1, λ2), train_mode False. The clean data are the caller's loader
(the reference takes 5% of the training set); like the reference, SAU does not augment them.
A bench grid's `budget_steps` resizes the epochs (budget.py): the fair grid's 2,460 steps are
about 2.5 times the reference's 100 rounds of about 10 batches.

Example:
    >>> result = defend("sau", model, clean_loader)
    >>> result.details["shared"]   # per epoch: share of images whose PGD example fools both
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..errors import SettingsError
from ..resume import EpochCheckpoints
from ..training import device_of
from .base import DefenseResult
from .budget import epochs_for
from .registered import DEFENSES


@dataclass(frozen=True)
class SAUSettings:
    epochs: int = field(default=100, metadata={"help": "passes over the clean data (n_rounds)"})
    lr: float = field(default=1e-4, metadata={"help": "Adam learning rate of the unlearning"})
    bound: float = field(default=0.2, metadata={
        "help": "L-inf bound of the per-image perturbation, in [0, 1] pixel units"})
    pgd_steps: int = field(default=5, metadata={"help": "shared PGD steps per mini-batch"})
    pgd_step_size: float = field(default=0.2, metadata={"help": "size of each signed PGD step"})
    adv_weight: float = field(default=0.01, metadata={
        "help": "PGD: weight of fooling each model (beta_1, the paper's lambda_3)"})
    share_weight: float = field(default=1.0, metadata={
        "help": "PGD: weight of making both models agree (beta_2, the paper's lambda_4)"})
    clean_weight: float = field(default=1.0, metadata={
        "help": "unlearning: weight of clean cross-entropy (lmd_1, the paper's lambda_1)"})
    at_weight: float = field(default=0.0, metadata={
        "help": "unlearning: weight of plain adversarial-training cross-entropy (lmd_2)"})
    unlearn_weight: float = field(default=1.0, metadata={
        "help": "unlearning: weight of the shared adversarial loss (lmd_3, the paper's "
                "lambda_2)"})
    train_mode: bool = field(default=False, metadata={
        "help": "unlearn with BatchNorm on batch statistics (off: fixed BN, higher accuracy)"})

    def __post_init__(self) -> None:
        weights = (self.adv_weight, self.share_weight, self.clean_weight, self.at_weight,
                   self.unlearn_weight)
        if (self.epochs < 0 or self.lr <= 0 or self.bound <= 0 or self.pgd_steps < 1
                or self.pgd_step_size <= 0 or min(weights) < 0):
            raise SettingsError(f"SAU needs epochs ≥ 0, lr > 0, bound > 0, pgd_steps ≥ 1, "
                                f"pgd_step_size > 0 and weights ≥ 0; got {self}")

    def planned_steps(self, batches_per_epoch: int) -> int:
        # One Adam step per clean mini-batch; its PGD steps are part of it (budget.py).
        return self.epochs * batches_per_epoch

    def at_budget(self, steps: int, batches_per_epoch: int) -> SAUSettings:
        return dataclasses.replace(self, epochs=epochs_for(steps, batches_per_epoch))


def js_divergence(logits: Tensor, other: Tensor) -> Tensor:
    """Jensen–Shannon divergence of two batches of softmax distributions, per row."""
    log_p, log_q = F.log_softmax(logits, 1), F.log_softmax(other, 1)
    log_mix = torch.logsumexp(torch.stack([log_p, log_q]), 0) - math.log(2)
    return 0.5 * ((log_p.exp() * (log_p - log_mix)).sum(1)
                  + (log_q.exp() * (log_q - log_mix)).sum(1))


def shared_perturbation(model: nn.Module, reference: nn.Module, x: Tensor, y: Tensor, *,
                        bound: float, steps: int, step_size: float, adv_weight: float = 0.01,
                        share_weight: float = 1.0) -> Tensor:
    """Per-image δ, ‖δ‖∞ ≤ bound, such that `model` and `reference` both change their prediction
    on x + δ and to the same label (step 1 of the plan). Both models are used in eval mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            before, ref_before = model(x).argmax(1), reference(x).argmax(1)
        delta = torch.full_like(x, bound)
        for _ in range(steps):
            delta.requires_grad_(True)
            logits, ref_logits = model(x + delta), reference(x + delta)
            pred, ref_pred = logits.argmax(1), ref_logits.argmax(1)
            fooled, ref_fooled = pred != before, ref_pred != ref_before
            shared = fooled & ref_fooled & (pred == ref_pred)
            if shared.all():
                break
            # Push each model off the true label only while it still resists, so the loss
            # cannot grow without bound on images already fooled; pull their outputs together
            # only where the two do not yet agree on a wrong label.
            adv = -(F.cross_entropy(logits[~fooled], y[~fooled], reduction="sum")
                    + F.cross_entropy(ref_logits[~ref_fooled], y[~ref_fooled],
                                      reduction="sum")) / (2 * len(x))
            share = js_divergence(logits[~shared], ref_logits[~shared]).sum() / len(x)
            (grad,) = torch.autograd.grad(adv_weight * adv + share_weight * share, delta)
            with torch.no_grad():
                delta = (delta - step_size * grad.sign()).clamp(-bound, bound)
    finally:
        model.train(was_training)
    return delta.detach()


def log_one_minus_p(logits: Tensor, label: Tensor) -> Tensor:
    """log(1 − softmax(logits)[label]) per row, exact even when that probability is near 1."""
    others = logits.scatter(1, label[:, None], float("-inf"))
    return torch.logsumexp(others, 1) - torch.logsumexp(logits, 1)


def unlearning_loss(model: nn.Module, reference: nn.Module, x: Tensor, y: Tensor, delta: Tensor,
                    settings: SAUSettings) -> tuple[Tensor, dict[str, float]]:
    """The step-2 objective on one batch, in the model's current mode, and its parts."""
    # One pass over clean and perturbed images, so train-mode BatchNorm sees both together.
    logits, adv_logits = model(torch.cat([x, x + delta])).split(len(x))
    with torch.no_grad():
        ref_before, ref_adv = reference(x).argmax(1), reference(x + delta).argmax(1)
    # Only h₀'s real mistakes are unlearned: an image it still labels y (or labels as before)
    # is no adversarial example of h₀, so h has nothing to stop sharing there.
    target = (ref_adv != y) & (ref_adv != ref_before)
    # p ≥ 0.001 as in the reference: images h already gives < 0.1% to ŷ₀ are left alone.
    sar = -log_one_minus_p(adv_logits, ref_adv).clamp(max=math.log1p(-1e-3))
    sar = (sar * target).sum() / len(x)
    clean = F.cross_entropy(logits, y)
    robust = F.cross_entropy(adv_logits, y)
    loss = (settings.clean_weight * clean + settings.at_weight * robust
            + settings.unlearn_weight * sar)
    shared = target & (adv_logits.argmax(1) == ref_adv)
    return loss, {"clean": clean.item(), "sar": sar.item(), "shared": shared.float().mean().item()}


@DEFENSES.register("sau", settings=SAUSettings, needs_labels=True)
def sau(model: nn.Module, clean: DataLoader, settings: SAUSettings, *, seed: int,
        progress: bool, callbacks: dict) -> DefenseResult:
    device = device_of(model)
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    # AMSGrad, no weight decay: the reference's Adam (BackdoorBench's optimizer factory with
    # SAU's config, wd 0).
    optimizer = torch.optim.Adam(params, lr=settings.lr, amsgrad=True)
    seconds = {"pgd": 0.0, "unlearn": 0.0}
    history: dict[str, list[float]] = {"losses": [], "clean": [], "sar": [], "shared": []}
    steps = 0
    # A run cut short resumes after its last saved epoch (resume.py); the frozen reference is
    # the suspect model, copied above before any saved weights are loaded.
    checkpoints = EpochCheckpoints.from_callbacks(callbacks, "sau", settings)
    stateful = {"model": model, "optimizer": optimizer}
    done, saved = checkpoints.resume(stateful)
    if saved:
        history, steps, seconds = saved["history"], saved["steps"], saved["seconds"]
    bar = tqdm(range(done, settings.epochs), desc="sau", disable=not progress, leave=False,
               initial=done, total=settings.epochs)
    for epoch in bar:
        sums = dict.fromkeys(history, 0.0)
        count = 0
        for x, y, *_ in clean:
            x, y = x.to(device), y.to(device)
            began = time.perf_counter()
            delta = shared_perturbation(model, reference, x, y, bound=settings.bound,
                                        steps=settings.pgd_steps,
                                        step_size=settings.pgd_step_size,
                                        adv_weight=settings.adv_weight,
                                        share_weight=settings.share_weight)
            seconds["pgd"] += time.perf_counter() - began
            began = time.perf_counter()
            model.train(settings.train_mode)
            loss, parts = unlearning_loss(model, reference, x, y, delta, settings)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            model.eval()
            steps += 1
            seconds["unlearn"] += time.perf_counter() - began
            for key, value in {"losses": loss.item(), **parts}.items():
                sums[key] += value * len(y)
            count += len(y)
        for key, total in sums.items():
            history[key].append(total / max(count, 1))
        bar.set_postfix(loss=f"{history['losses'][-1]:.3f}",
                        shared=f"{history['shared'][-1]:.2f}")
        checkpoints.save(epoch + 1, stateful,
                         {"history": history, "steps": steps, "seconds": seconds},
                         final=epoch + 1 == settings.epochs)
    return DefenseResult(model.eval(), history, {**seconds, **checkpoints.seconds()},
                         steps=steps)
