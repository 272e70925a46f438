"""FST: feature shift tuning, fine-tuning with a fresh classification head pushed away from the
backdoored one, so the features must shift away from the backdoor's too.

Min, Qin, Shen & Cheng, "Towards Stable Backdoor Purification through Feature Shift Tuning",
NeurIPS 2023, https://arxiv.org/abs/2310.01875. Reference: the authors' fine-tuning script,
`fine_tune/ft.py --ft_mode fst` in https://github.com/AISafety-HKUST/stable_backdoor_purification.

Plan:
  1. Find the head: the nn.Linear whose output is the model's output (one forward pass).
  2. Keep its weight W₀ and C = ‖W₀‖_F; re-initialise weight and bias uniformly in
     ±1/√fan_in.
  3. Fine-tune every trainable parameter on the clean data (SGD, momentum, cosine per epoch)
     with the loss  CE(f(x), y) + α·⟨W, W₀⟩,  ⟨W, W₀⟩ = Σ W ⊙ W₀ (weight only, not bias).
  4. After every step project the head's weight back onto the sphere ‖W‖_F = C, so the penalty
     can only turn W away from W₀, not shrink it.

Differs from the reference: the head is found by a forward hook rather than by attribute name,
because our defenses must work on any nn.Module; crop and flip are applied to every data set
(the reference flips CIFAR-10 only) because a defense does not know which data set it is given;
parameters frozen by the caller stay frozen (the reference unfreezes all), because a defense
never changes the model's requires_grad flags.

Settings (defaults from the reference script and its README command unless said): epochs 10,
lr 0.01, momentum 0.9, weight decay 0 (the reference's SGD has none), alpha 0.2 (the script's
default; the README example uses 0.1), cosine over epochs
(T_max = epochs, stepped once per epoch), random crop with padding 4 and flip. A bench grid's
`budget_steps` resizes the epochs (budget.py): the fair grid's 2,460 steps are about 30 times
the reference's 10 epochs over 1,000 images in batches of 128.

Example:
    >>> result = defend("fst", model, clean_loader, alpha=0.2)
    >>> result.details["inner_products"][-1]  # ⟨W, W₀⟩ after the last epoch
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.augment import random_crop_flip
from ..errors import SettingsError, SpecError
from ..resume import EpochCheckpoints
from ..training import device_of
from ._common import inputs_of
from .base import DefenseResult
from .budget import epochs_for
from .registered import DEFENSES


@dataclass(frozen=True)
class FSTSettings:
    epochs: int = field(default=10, metadata={"help": "passes over the clean data"})
    lr: float = field(default=0.01, metadata={
        "help": "initial SGD learning rate (cosine over epochs)"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    weight_decay: float = field(default=0.0, metadata={
        "help": "SGD weight decay (the reference uses none)"})
    alpha: float = field(default=0.2, metadata={
        "help": "weight of the penalty α·⟨W, W₀⟩ between the new and the original head"})
    augment: bool = field(default=True, metadata={"help": "random crop and horizontal flip"})
    crop_padding: int = field(default=4, metadata={
        "help": "zero padding of the random crop, in pixels"})

    def __post_init__(self) -> None:
        if (self.epochs < 1 or self.lr <= 0 or self.momentum < 0 or self.weight_decay < 0
                or self.alpha < 0 or self.crop_padding < 0):
            raise SettingsError(f"FST needs epochs ≥ 1, lr > 0 and momentum, weight_decay, "
                                f"alpha, crop_padding ≥ 0; got {self.epochs}, {self.lr}, "
                                f"{self.momentum}, {self.weight_decay}, {self.alpha}, "
                                f"{self.crop_padding}")

    def planned_steps(self, batches_per_epoch: int) -> int:
        return self.epochs * batches_per_epoch

    def at_budget(self, steps: int, batches_per_epoch: int) -> FSTSettings:
        return replace(self, epochs=epochs_for(steps, batches_per_epoch))


@torch.no_grad()
def classifier_head(model: nn.Module, x: Tensor) -> tuple[str, nn.Linear]:
    """(name, module) of the nn.Linear whose output tensor is the model's output on `x`, found
    by hooking every Linear for one eval-mode forward (buffers and training flags are left as
    they were). Raises SpecError if the output does not come straight from an nn.Linear."""
    calls: list[tuple[str, nn.Linear, Any]] = []

    def recorder(name: str, module: nn.Linear):
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            calls.append((name, module, output))
        return hook

    handles = [m.register_forward_hook(recorder(name, m))
               for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()
        output = model(x.to(device_of(model)))
    finally:
        for handle in handles:
            handle.remove()
        for m, flag in flags.items():
            m.training = flag
    # Identity, not equality: the head's output must be the very tensor the model returns.
    heads = [(name, module) for name, module, out in calls if out is output]
    if not heads:
        raise SpecError(f"FST needs a linear classification head, an nn.Linear whose output is "
                        f"the model's output; {type(model).__name__} has none (its output comes "
                        f"from another layer or is changed after its last nn.Linear)")
    return heads[-1]


@torch.no_grad()
def reinitialise_head(head: nn.Linear) -> None:
    """Weight and bias uniform in ±1/√fan_in, drawn from the global RNG (seeded by `defend`)."""
    bound = 1 / math.sqrt(head.in_features)
    head.weight.uniform_(-bound, bound)
    if head.bias is not None:
        head.bias.uniform_(-bound, bound)


@torch.no_grad()
def project_norm(weight: Tensor, norm: Tensor) -> None:
    """Rescale `weight` in place to Frobenius norm `norm`."""
    weight.mul_(norm / weight.norm().clamp_min(1e-12))


@DEFENSES.register("fst", settings=FSTSettings, needs_labels=True)
def fst(model: nn.Module, clean: DataLoader, settings: FSTSettings, *, seed: int,
        progress: bool, callbacks: dict) -> DefenseResult:
    began = time.perf_counter()
    device = device_of(model)
    # 1. the head, found by what it does
    name, head = classifier_head(model, inputs_of(next(iter(clean))))
    if not head.weight.requires_grad:
        raise SpecError(f"FST tunes the classification head {name!r}, but its weight is frozen "
                        f"(requires_grad=False)")
    # 2. remember the backdoored head, then start from a fresh one
    original = head.weight.detach().clone()
    norm = original.norm()
    reinitialise_head(head)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum,
                                weight_decay=settings.weight_decay)
    # As in the reference: cosine with T_max = epochs, stepped once per epoch.
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.epochs)
    losses, inner_products, lrs, steps, elapsed = [], [], [], 0, 0.0
    # A run cut short resumes after its last saved epoch (resume.py): the head is found, W₀
    # kept and the head re-drawn above as in any run, then the saved weights replace them.
    checkpoints = EpochCheckpoints.from_callbacks(callbacks, "fst", settings)
    stateful = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    done, saved = checkpoints.resume(stateful)
    if saved:
        losses, inner_products, lrs = saved["losses"], saved["inner_products"], saved["lrs"]
        steps, elapsed = saved["steps"], saved["seconds"]
    for epoch in tqdm(range(done, settings.epochs), desc="fst", disable=not progress,
                      leave=False, initial=done, total=settings.epochs):
        model.train()
        lrs.append(optimizer.param_groups[0]["lr"])
        total, count = 0.0, 0
        for x, y, *_ in clean:
            x, y = x.to(device), y.to(device)
            if settings.augment:
                x = random_crop_flip(x, padding=settings.crop_padding)
            # 3. cross-entropy plus the shift penalty α·⟨W, W₀⟩
            loss = (F.cross_entropy(model(x), y)
                    + settings.alpha * (head.weight * original).sum())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            # 4. back onto the original norm, so only W's direction can move away from W₀
            project_norm(head.weight, norm)
            steps += 1
            total += loss.item() * len(y)
            count += len(y)
        scheduler.step()
        losses.append(total / max(count, 1))
        inner_products.append(float((head.weight.detach() * original).sum()))
        checkpoints.save(epoch + 1, stateful,
                         {"losses": losses, "inner_products": inner_products, "lrs": lrs,
                          "steps": steps, "seconds": elapsed + time.perf_counter() - began},
                         final=epoch + 1 == settings.epochs)
    details = {"head": name, "losses": losses, "inner_products": inner_products, "lrs": lrs,
               "original_norm": float(norm)}
    return DefenseResult(model.eval(), details,
                         {"finetune": elapsed + time.perf_counter() - began,
                          **checkpoints.seconds()}, steps=steps)
