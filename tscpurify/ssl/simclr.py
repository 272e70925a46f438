"""SimCLR pre-training: how a clean (or, with BadEncoder, a backdoored) encoder comes to exist.

Chen, Kornblith, Norouzi & Hinton, "A Simple Framework for Contrastive Learning of Visual
Representations", ICML 2020, https://arxiv.org/abs/2002.05709. Adapted for a CPU: Adam instead
of LARS with batch 4096 (LARS exists for very large batches), a few epochs on a few thousand
28×28 images, and the default `SimCLRAugment`. The loop knows no labels: the objective is
`simclr_loss`, the same `LossFn` that TSC's curves train with.

Sizing, measured on one CPU thread shared with another job: one step of 256 pairs through
`simclr` width 16 takes about 1 s, so 10 epochs over 5,000 images take about 4 minutes. Later
measured in `tscpurify encoder` runs (one thread, two cores shared with two other training
jobs): 10 epochs over 5,000 images took 69–80 s.

Example:
    model = create_model("simclr", width=16)
    losses = pretrain_simclr(model, DataLoader(data.tensor_dataset(labels=False),
                                               batch_size=256, shuffle=True), epochs=10)
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..curve.contrastive import Augment, simclr_loss
from ..curve.train import LossFn
from ..errors import DataError, SettingsError


@dataclass(frozen=True)
class SimCLRSettings:
    epochs: int = field(default=10, metadata={
        "help": "passes over the images (10 × 5,000 images took 1–4 CPU-minutes at width 16, "
                "depending on the machine's load)"})
    lr: float = field(default=1e-3, metadata={
        "help": "initial learning rate (Adam's usual 1e-3; for SGD try 0.05–0.1)"})
    optimizer: str = field(default="adam", metadata={
        "help": "'adam' (robust at small batches) or 'sgd' (momentum 0.9)"})
    weight_decay: float = field(default=1e-6, metadata={
        "help": "weight decay (SimCLR: 1e-6)"})
    temperature: float = field(default=0.5, metadata={
        "help": "NT-Xent temperature (SimCLR on CIFAR-10 and the TSC reference: 0.5)"})

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.lr <= 0 or self.weight_decay < 0 or self.temperature <= 0:
            raise SettingsError(f"pre-training needs epochs ≥ 0, lr > 0, weight_decay ≥ 0 and "
                                f"temperature > 0; got {self.epochs}, {self.lr}, "
                                f"{self.weight_decay}, {self.temperature}")
        if self.optimizer not in ("adam", "sgd"):
            raise SettingsError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")


def _optimizer(model: nn.Module, settings: SimCLRSettings) -> torch.optim.Optimizer:
    if settings.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=settings.lr,
                                weight_decay=settings.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=0.9,
                           weight_decay=settings.weight_decay)


def pretrain_simclr(model: nn.Module, images: Iterable[Any], settings: SimCLRSettings | None = None,
                    *, augment: Augment | None = None, loss_fn: LossFn | None = None,
                    callbacks: Sequence[Callable[[int, nn.Module], None]] = (),
                    progress: bool = True, **overrides: Any) -> list[float]:
    """Train `model` in place with SimCLR; returns the mean loss of each epoch.

    Args:
        model: an encoder whose forward returns the projection (e.g. `create_model("simclr")`).
        images: a loader of bare image batches (a tensor or a 1-tuple per batch), in [0, 1].
        settings: SimCLRSettings (default: SimCLRSettings()); `overrides` replace single fields,
            e.g. `pretrain_simclr(model, loader, epochs=5, lr=1e-3)`.
        augment: the view maker handed to `simclr_loss` (default: `SimCLRAugment()`).
        loss_fn: replaces the objective altogether (default: `simclr_loss(augment, temperature)`).
        callbacks: `callback(epoch, model)` after each epoch (evaluation, checkpoints).

    The learning rate follows a cosine from `lr` to 0 over all steps; the model ends in eval
    mode. Randomness (augmentation, loader order) comes from the global RNG and the loader.
    """
    try:
        settings = dataclasses.replace(settings or SimCLRSettings(), **overrides)
    except TypeError as err:
        raise SettingsError(f"pretrain_simclr: {err}") from None
    objective = loss_fn or simclr_loss(augment, settings.temperature)
    return train_on_loss(model, images, objective, _optimizer(model, settings), settings.epochs,
                         callbacks=callbacks, progress=progress, desc="simclr")


def train_on_loss(model: nn.Module, batches: Iterable[Any], objective: LossFn,
                  optimizer: torch.optim.Optimizer, epochs: int, *,
                  callbacks: Sequence[Callable[[int, nn.Module], None]] = (),
                  progress: bool = True, desc: str = "train") -> list[float]:
    """The self-supervised training loop (SimCLR, CLIP): `objective(model, batch)` minimised by
    `optimizer` for `epochs` passes, the learning rate following a cosine to 0 over all steps
    (when the loader has a length). Returns each epoch's mean loss; the model ends in eval
    mode."""
    steps = max(1, epochs * len(batches)) if hasattr(batches, "__len__") else None
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
                 if steps else None)
    history: list[float] = []
    bar = tqdm(range(epochs), desc=desc, disable=not progress, leave=False)
    for epoch in bar:
        model.train()  # every epoch: a callback may have left the model in eval mode
        began, total, count = time.perf_counter(), 0.0, 0
        for batch in batches:
            loss = objective(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            total += loss.item()
            count += 1
        if count == 0:
            raise DataError(f"{desc}: training needs data, the loader gave no batches")
        history.append(total / count)
        bar.set_postfix(loss=f"{history[-1]:.3f}", sec=f"{time.perf_counter() - began:.0f}")
        for callback in callbacks:
            callback(epoch, model)
    model.eval()
    return history
