"""Ordinary supervised training: SGD with momentum, cosine schedule per step, augmentation."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import distributed as dist
from .curve.train import (  # shared by training and curves
    Checkpoints,
    bf16_autocast,
    device_of,
)
from .data.augment import random_crop_flip
from .errors import SettingsError
from .settings import validate_settings

OPTIMIZERS = ("sgd", "adamw")


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = field(default=5, metadata={"help": "passes over the training set"})
    lr: float = field(default=0.05, metadata={"help": "initial SGD learning rate"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    weight_decay: float = field(default=5e-4, metadata={"help": "SGD weight decay"})
    batch_size: int = field(default=128, metadata={"help": "mini-batch size"})
    augment: bool = field(default=True, metadata={"help": "random crop (pad 2) and flip"})
    bf16: bool = field(default=False, metadata={
        "help": "bfloat16 autocast for the forward pass and the loss (weights stay float32)"})
    optimizer: str = field(default="sgd", metadata={
        "help": "sgd (momentum, weight decay) or adamw (decoupled weight decay; momentum "
                "unused): transformers train poorly with SGD at these budgets"})

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise SettingsError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got "
                                f"{self.optimizer!r}")
        if self.epochs < 0 or self.lr <= 0 or self.batch_size < 1:
            raise SettingsError(f"training needs epochs ≥ 0, lr > 0, batch_size ≥ 1; got "
                                f"{self.epochs}, {self.lr}, {self.batch_size}")
        # torch.optim.SGD refuses negatives only once training starts, as a traceback, and
        # momentum ≥ 1 diverges: the same range as the re-tune's and ANP's.
        if not 0 <= self.momentum < 1 or self.weight_decay < 0:
            raise SettingsError(f"training needs 0 ≤ momentum < 1 and weight_decay ≥ 0; got "
                                f"{self.momentum}, {self.weight_decay}")


def _classifier_optimizer(model: nn.Module, settings: TrainSettings, batches: int
                         ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """`train_classifier`'s optimiser (SGD with momentum, or AdamW) over `model`'s parameters
    and its per-step cosine from `lr` to 0 over `settings.epochs` epochs of `batches` batches."""
    validate_settings(settings)  # NaN rates and string counts fail here, not as NaN weights
    if settings.optimizer == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(
            model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr,
                                    momentum=settings.momentum,
                                    weight_decay=settings.weight_decay)
    steps = max(1, settings.epochs * batches)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    return optimizer, scheduler


def _classifier_epoch(model: nn.Module, loader: DataLoader, settings: TrainSettings,
                     optimizer: torch.optim.Optimizer,
                     scheduler: torch.optim.lr_scheduler.LRScheduler,
                     loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
                     distributed: bool = False) -> float:
    """One epoch of `train_classifier`, a step per batch; returns its mean loss and leaves the
    model in train mode."""
    device = device_of(model)
    model.train()
    total, count = 0.0, 0
    for batch in loader:
        with bf16_autocast(device, settings.bf16):
            if loss_fn is None:
                x, y = (t.to(device, non_blocking=True) for t in batch)
                loss = F.cross_entropy(model(random_crop_flip(x) if settings.augment else x), y)
            else:
                loss = loss_fn(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if distributed:
            dist.all_reduce_gradients(model.parameters())
        optimizer.step()
        scheduler.step()
        total += loss.item()
        count += 1
    return total / max(count, 1)


# What `train_classifier` saves to its checkpoints (a phased run declares it: resume.py).
CLASSIFIER_STATE = ("model", "optimizer", "scheduler")


def train_classifier(model: nn.Module, loader: DataLoader, settings: TrainSettings, *,
                     callbacks: Sequence[Callable[[int, nn.Module], None]] = (),
                     progress: bool = True, desc: str = "train",
                     loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
                     distributed: bool = False, checkpoints: Checkpoints | None = None
                     ) -> list[float]:
    """Train in place; returns the mean loss of each epoch.

    The loss is cross-entropy on (images, labels) batches with the settings' augmentation,
    or `loss_fn(model, batch)` (e.g. a label-free objective, which then owns augmentation
    and devices). The learning rate follows a cosine from `lr` to 0 over all steps.
    `callbacks(epoch, model)` run after each epoch so the loop stays plain.

    `distributed`: `loader` is this process's shard (tscpurify.distributed) and the model starts
    equal on every process: gradients are averaged over the processes after each backward
    (DistributedDataParallel's rule, done by hand so that any `loss_fn`, including functional
    calls of the module, is averaged alike), BatchNorm normalises with each process's own
    batch statistics (as under DDP), and the running statistics are averaged at the end
    (`distributed.average_buffers`). The returned losses are this process's.

    `checkpoints` (one process only; curve.train.Checkpoints): resume from its last save, then
    save after each epoch, after the callbacks: the model, the optimiser, the schedule and the
    losses so far (record "losses"), which the returned losses then include.
    """
    if checkpoints is not None and distributed:
        raise SettingsError("training saves checkpoints from one process only; distributed "
                            "training takes none")
    optimizer, scheduler = _classifier_optimizer(model, settings, len(loader))
    stateful = dict(zip(CLASSIFIER_STATE, (model, optimizer, scheduler), strict=True))
    done, saved = checkpoints.resume(stateful) if checkpoints is not None else (0, {})
    history: list[float] = list(saved.get("losses", []))
    bar = tqdm(range(done, settings.epochs), desc=desc, disable=not progress, leave=False,
               initial=done, total=settings.epochs)
    for epoch in bar:
        start = time.perf_counter()
        history.append(_classifier_epoch(model, loader, settings, optimizer, scheduler, loss_fn,
                                        distributed))
        bar.set_postfix(loss=f"{history[-1]:.3f}", sec=f"{time.perf_counter() - start:.0f}")
        for callback in callbacks:
            callback(epoch, model)
        if checkpoints is not None:
            checkpoints.save(epoch + 1, stateful, {"losses": history},
                             final=epoch + 1 == settings.epochs)
    if distributed:
        dist.average_buffers(model)
    model.eval()
    return history
