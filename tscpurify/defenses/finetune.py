"""FT: plain fine-tuning on the clean data, the simplest baseline every defense must beat.

Reference: SCLBD/BackdoorBench `defense/ft.py`, SGD on the defender's clean data with
cross-entropy.
Differs from the reference: the rate follows one cosine from lr to 0 over all steps, whatever
the reference's configured schedule, so that a step budget resizes the run without changing its
shape and TSC can be compared with fine-tuning at an equal number of gradient steps.
With `label_smoothing` 0.1 and lr 0.03 it is TSC's last fine-tune on its own (the bench's
`last_ft_alone` row): what TSC's removal owes to that fine-tune rather than to its curves.
With `reinit` it trains the architecture from a fresh initialisation on the clean data alone:
not a purification but its floor, what re-training on the defender's data gives without the
suspect weights (the accuracy study of docs/ablations.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..curve import cross_entropy_loss, fresh_control_point
from ..curve.train import bf16_autocast
from ..data.augment import random_crop_flip
from ..errors import SettingsError
from ..seeding import derive_seed
from ..settings import validate_settings
from ..training import TrainSettings, device_of
from .base import DefenseResult
from .budget import epochs_for
from .registered import DEFENSES
from .resume import EpochCheckpoints


@dataclass(frozen=True)
class FineTuneSettings:
    epochs: int = field(default=20, metadata={"help": "passes over the clean data"})
    lr: float = field(default=0.01, metadata={"help": "initial SGD learning rate (cosine to 0)"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    weight_decay: float = field(default=5e-4, metadata={"help": "SGD weight decay"})
    augment: bool = field(default=True, metadata={"help": "random crop and flip"})
    label_smoothing: float = field(default=0.0, metadata={
        "help": "label smoothing of the cross-entropy (0 = none; TSC's last fine-tune: 0.1)"})
    reinit: bool = field(default=False, metadata={
        "help": "start from a fresh, seeded initialisation of the architecture instead of the "
                "suspect weights: training from scratch on the clean data (a reference row)"})

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.lr <= 0 or not 0 <= self.label_smoothing < 1:
            raise SettingsError(f"FT needs epochs ≥ 0, lr > 0 and label_smoothing in [0, 1); "
                                f"got {self.epochs}, {self.lr}, {self.label_smoothing}")

    def planned_steps(self, batches_per_epoch: int) -> int:
        return self.epochs * batches_per_epoch

    def at_budget(self, steps: int, batches_per_epoch: int) -> FineTuneSettings:
        return replace(self, epochs=epochs_for(steps, batches_per_epoch))


def classifier_optimizer(model: nn.Module, train: TrainSettings, batches: int
                         ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The optimiser and per-step cosine schedule of `train_classifier` (training.py), built
    alike, so that a defense holds them and can save and restore them between epochs."""
    validate_settings(train)
    if train.optimizer == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(
            model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=train.lr, momentum=train.momentum,
                                    weight_decay=train.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(1, train.epochs * batches))
    return optimizer, scheduler


def classifier_epoch(model: nn.Module, loader: DataLoader, train: TrainSettings,
                     optimizer: torch.optim.Optimizer,
                     scheduler: torch.optim.lr_scheduler.LRScheduler,
                     loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None) -> float:
    """One epoch of `train_classifier` (training.py, one process): the same steps and draws in
    the same order, so that epochs run one at a time, with saves between them, give its very
    weights. Returns the epoch's mean loss; the model is left in train mode."""
    device = device_of(model)
    model.train()
    total, count = 0.0, 0
    for batch in loader:
        with bf16_autocast(device, train.bf16):
            if loss_fn is None:
                x, y = (t.to(device, non_blocking=True) for t in batch)
                loss = F.cross_entropy(model(random_crop_flip(x) if train.augment else x), y)
            else:
                loss = loss_fn(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total += loss.item()
        count += 1
    return total / max(count, 1)


def train_resumably(model: nn.Module, loader: DataLoader, train: TrainSettings,
                    checkpoints: EpochCheckpoints, *, progress: bool, desc: str,
                    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None
                    ) -> tuple[list[float], float]:
    """`train_classifier(model, loader, train, loss_fn=loss_fn)`, saving after each epoch to
    `checkpoints` and resuming from its last save (resume.py). Returns the mean loss of each
    epoch and the training's seconds, over every session that ran its epochs."""
    began = time.perf_counter()
    optimizer, scheduler = classifier_optimizer(model, train, len(loader))
    stateful = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    done, saved = checkpoints.resume(stateful)
    losses, elapsed = saved.get("losses", []), saved.get("seconds", 0.0)
    for epoch in tqdm(range(done, train.epochs), desc=desc, disable=not progress, leave=False,
                      initial=done, total=train.epochs):
        losses.append(classifier_epoch(model, loader, train, optimizer, scheduler, loss_fn))
        checkpoints.save(epoch + 1, stateful,
                         {"losses": losses, "seconds": elapsed + time.perf_counter() - began},
                         final=epoch + 1 == train.epochs)
    model.eval()
    return losses, elapsed + time.perf_counter() - began


@DEFENSES.register("ft", settings=FineTuneSettings, needs_labels=True)
def fine_tune(model: nn.Module, clean: DataLoader, settings: FineTuneSettings, *, seed: int,
              progress: bool, callbacks: dict) -> DefenseResult:
    if settings.reinit:
        model.load_state_dict({**model.state_dict(),
                               **fresh_control_point(model, derive_seed(seed, "scratch"))})
        for module in model.modules():  # fresh BatchNorm statistics too
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.reset_running_stats()
    train = TrainSettings(epochs=settings.epochs, lr=settings.lr, momentum=settings.momentum,
                          weight_decay=settings.weight_decay, augment=settings.augment,
                          batch_size=clean.batch_size or 1)
    # Smoothing goes through the curve's loss builder, the same one TSC's last fine-tune uses.
    loss_fn = (cross_entropy_loss(random_crop_flip if settings.augment else None,
                                  label_smoothing=settings.label_smoothing)
               if settings.label_smoothing > 0 else None)
    # A run cut short resumes after its last saved epoch (resume.py), from the weights saved
    # then, whatever the start above (the suspect's or a fresh initialisation).
    checkpoints = EpochCheckpoints.from_callbacks(callbacks, "ft", settings)
    losses, _ = train_resumably(model, clean, train, checkpoints, progress=progress,
                                desc="fine-tune", loss_fn=loss_fn)
    return DefenseResult(model, {"losses": losses}, checkpoints.seconds(),
                         steps=settings.epochs * len(clean))
