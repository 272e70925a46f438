"""FT-SAM: fine-tuning with sharpness-aware minimisation, which shrinks the large-norm neurons
that carry a backdoor.

Zhu, Wei, Shen, Fan & Wu, "Enhancing Fine-Tuning Based Backdoor Defense with Sharpness-Aware
Minimization", ICCV 2023, https://arxiv.org/abs/2304.11823. Reference implementation (the
authors'): SCLBD/BackdoorBench `defense/ft-sam.py` with `utils/defense_utils/sam/`.

Plan, per mini-batch (by default the adaptive SAM of Kwon et al., ASAM, ICML 2021, as the
reference runs FT-SAM with rho = 2):
  1. g = ∇L(w) on the batch (label-smoothed cross-entropy: 1 − s on the label, s/(C − 1) on
     every other class, as the reference's `smooth_crossentropy`), BatchNorm in train mode.
  2. ε = rho · T²g / ‖T g‖₂ with T = |w| + eta element-wise (adaptive), or rho · g / ‖g‖₂
     (plain SAM), over all parameters together; so ‖T⁻¹ε‖₂ = rho (resp. ‖ε‖₂ = rho).
  3. Gradient at w + ε with BatchNorm momentum set to 0, so that pass normalises with its batch's
     statistics but leaves the running statistics as step 1 left them (the reference's
     `disable_running_stats`); weights restored to w, SGD step with that gradient.

Differs from the reference: the learning rate follows one cosine from lr to 0 over all steps
(the reference steps its generic T_max = 100 cosine every batch, so its lr oscillates with a
period of 200 batches), because that reads as a per-epoch schedule stepped per batch; the number
of epochs is our FT baseline's budget (BackdoorBench fine-tunes 100 epochs on 5% of CIFAR-10),
because every defense gets the same step budget.

Settings (defaults, the reference's unless said): epochs 20 (our FT budget), lr 0.01,
momentum 0.9, weight decay 5e-4, rho 2.0, adaptive True, eta 0.0 (Kwon et al. use 0.01; the
reference has none), label smoothing 0.1, crop/flip augmentation.

Example:
    >>> result = defend("ft_sam", model, clean_loader, rho=2.0)
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.augment import random_crop_flip
from ..errors import SettingsError
from ..resume import EpochCheckpoints
from ..training import device_of
from . import budget
from ._common import BatchNorm
from .base import DefenseResult
from .registered import DEFENSES


@dataclass(frozen=True)
class FTSAMSettings:
    epochs: int = field(default=20, metadata={"help": "passes over the clean data"})
    lr: float = field(default=0.01, metadata={"help": "initial SGD learning rate (cosine to 0)"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    weight_decay: float = field(default=5e-4, metadata={"help": "SGD weight decay"})
    rho: float = field(default=2.0, metadata={"help": "radius of the weight perturbation"})
    adaptive: bool = field(default=True, metadata={
        "help": "ASAM: measure the radius relative to |w| + eta"})
    eta: float = field(default=0.0, metadata={
        "help": "ASAM's offset in T = |w| + eta (Kwon et al.: 0.01; the reference: 0)"})
    label_smoothing: float = field(default=0.1, metadata={
        "help": "probability moved off the label, spread over the other classes"})
    augment: bool = field(default=True, metadata={"help": "random crop and flip"})

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.lr <= 0 or self.rho < 0 or self.eta < 0:
            raise SettingsError(f"FT-SAM needs epochs ≥ 0, lr > 0, rho ≥ 0, eta ≥ 0; got "
                                f"{self.epochs}, {self.lr}, {self.rho}, {self.eta}")
        if not 0 <= self.label_smoothing < 1:
            raise SettingsError(f"FT-SAM's label_smoothing must be in [0, 1), got "
                                f"{self.label_smoothing}")

    def planned_steps(self, batches_per_epoch: int) -> int:
        """One SGD update per clean batch (the ascent pass is part of its step)."""
        return self.epochs * batches_per_epoch

    def at_budget(self, steps: int, batches_per_epoch: int) -> FTSAMSettings:
        return dataclasses.replace(self, epochs=budget.epochs_for(steps, batches_per_epoch))


@torch.no_grad()
def sam_perturbation(params: Sequence[Tensor], grads: Sequence[Tensor], rho: float,
                     adaptive: bool, eta: float = 0.0) -> list[Tensor]:
    """The ascent step ε of (A)SAM for every parameter: rho·T²g/‖Tg‖ (T = |w| + eta) or
    rho·g/‖g‖, with the reference's 1e-12 added to the norm."""
    scales = [p.abs() + eta if adaptive else torch.ones_like(p) for p in params]
    scaled = [(t * g).norm() for t, g in zip(scales, grads, strict=True)]
    norm = torch.stack(scaled).norm() + 1e-12
    return [rho * t * t * g / norm for t, g in zip(scales, grads, strict=True)]


def smooth_cross_entropy(logits: Tensor, labels: Tensor, smoothing: float) -> Tensor:
    """Mean cross-entropy against 1 − smoothing on the label and smoothing/(C − 1) on each other
    class. The reference computes the KL divergence to that target, which differs by the
    target's entropy, a constant: same gradients."""
    classes = logits.shape[1]
    target = torch.full_like(logits, smoothing / max(classes - 1, 1))
    target.scatter_(1, labels.unsqueeze(1), 1 - smoothing)
    return -(target * F.log_softmax(logits, dim=1)).sum(1).mean()


@contextmanager
def frozen_running_stats(model: nn.Module) -> Iterator[None]:
    """BatchNorm momentum 0 inside the block: train-mode passes still normalise with the batch's
    statistics, but the running mean and variance stay exactly as they were (the counter of
    batches seen still counts, as in the reference)."""
    norms = [m for m in model.modules() if isinstance(m, BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(norms, saved, strict=True):
            m.momentum = momentum


@DEFENSES.register("ft_sam", settings=FTSAMSettings, needs_labels=True)
def ft_sam(model: nn.Module, clean: DataLoader, settings: FTSAMSettings, *, seed: int,
           progress: bool, callbacks: dict) -> DefenseResult:
    began = time.perf_counter()
    device, s = device_of(model), settings
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=s.lr, momentum=s.momentum,
                                weight_decay=s.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(1, s.epochs * len(clean)))
    history, steps, elapsed = [], 0, 0.0
    # A run cut short resumes after its last saved epoch (resume.py), with its per-step
    # schedule where it was.
    checkpoints = EpochCheckpoints.from_callbacks(callbacks, "ft_sam", s)
    stateful = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    done, saved = checkpoints.resume(stateful)
    if saved:
        history, steps, elapsed = saved["history"], saved["steps"], saved["seconds"]
    for epoch in tqdm(range(done, s.epochs), desc="ft-sam", disable=not progress, leave=False,
                      initial=done, total=s.epochs):
        model.train()
        total, count = 0.0, 0
        for x, y, *_ in clean:
            x, y = x.to(device), y.to(device)
            if s.augment:
                x = random_crop_flip(x)
            # 1-2. gradient at w (this pass updates the BN running statistics), then w + ε
            loss = smooth_cross_entropy(model(x), y, s.label_smoothing)
            grads = torch.autograd.grad(loss, params)
            eps = sam_perturbation(params, grads, s.rho, s.adaptive, s.eta)
            with torch.no_grad():
                torch._foreach_add_(params, eps)
            # 3. the sharpness-aware gradient, taken at w + ε and applied at w; the perturbed
            # weights' statistics must not leak into the running statistics
            with frozen_running_stats(model):
                sharp = smooth_cross_entropy(model(x), y, s.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            sharp.backward()
            with torch.no_grad():
                torch._foreach_sub_(params, eps)
            optimizer.step()
            scheduler.step()
            steps += 1
            total += loss.item() * len(y)
            count += len(y)
        history.append(total / max(count, 1))
        checkpoints.save(epoch + 1, stateful,
                         {"history": history, "steps": steps,
                          "seconds": elapsed + time.perf_counter() - began},
                         final=epoch + 1 == s.epochs)
    return DefenseResult(model.eval(), {"losses": history},
                         {"finetune": elapsed + time.perf_counter() - began,
                          **checkpoints.seconds()}, steps=steps)
