"""Distil: the suspect model's clean behaviour taught to a fresh copy of its architecture.

The student starts from a fresh, seeded initialisation and learns to match the suspect model's
softened outputs on the clean images (Hinton et al.'s T²-scaled KL); it never sees a label.
What the suspect knows about clean inputs moves to the student; the hope is that a trigger,
which clean inputs never show, has nothing to move through. That fails for a trigger clean
inputs come close to: on the Blended tuning model the student carried the backdoor over (ASR
93.58%; mixed images are themselves blends, docs/deep-purification.md). It is the baseline
that throws the suspect's weights away but keeps its knowledge, as training from scratch (`ft`
with `reinit`) throws both away.

Reference: Yoshida & Fujino, "Disabling Backdoor and Identifying Poison Data by using Knowledge
Distillation in Backdoor Attacks on Deep Neural Networks", AISec 2020 (distil the backdoored
teacher into a student on clean data). The settings here are ours, not theirs: a temperature
of 4, SGD with one cosine over all steps, and crop, flip and mixup of the clean images, so that
the teacher is asked about more inputs than the few thousand clean images (mixup needs no
labels here: both models see the same mixed image). Added 2026-12-04 after a deep-purification
pilot (docs/deep-purification.md, look 2) found it removed BadNets from a tuning model with less
accuracy lost than TSC; it joined the fair grid then, before any run of it on a benchmark cell
(and before the pilot found it carries Blended over).

Example:
    >>> result = defend("distill", model, clean_images_loader)   # no labels needed
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace

from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..curve import distillation_loss
from ..data.augment import mix_images, random_crop_flip
from ..errors import SettingsError
from ..resume import EpochCheckpoints
from ..seeding import derive_seed
from ..training import TrainSettings, train_classifier
from ._common import reinitialise
from .base import DefenseResult
from .budget import epochs_for
from .registered import DEFENSES


@dataclass(frozen=True)
class DistillSettings:
    epochs: int = field(default=200, metadata={
        "help": "passes over the clean data (200 × 12 batches ≈ TSC's 2,460 steps on 3,000 "
                "images)"})
    lr: float = field(default=0.05, metadata={
        "help": "initial SGD learning rate (cosine to 0); the backdoored models' own rate"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    weight_decay: float = field(default=5e-4, metadata={"help": "SGD weight decay"})
    temperature: float = field(default=4.0, metadata={
        "help": "softening of both models' outputs in the KL term"})
    mixup: float = field(default=1.0, metadata={
        "help": "alpha of the Beta that draws each batch's mixup weight (0 = no mixup)"})
    augment: bool = field(default=True, metadata={"help": "random crop and flip"})

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.lr <= 0 or self.temperature <= 0 or self.mixup < 0:
            raise SettingsError(f"distill needs epochs ≥ 0, lr > 0, temperature > 0 and "
                                f"mixup ≥ 0; got {self.epochs}, {self.lr}, {self.temperature}, "
                                f"{self.mixup}")

    def planned_steps(self, batches_per_epoch: int) -> int:
        return self.epochs * batches_per_epoch

    def at_budget(self, steps: int, batches_per_epoch: int) -> DistillSettings:
        return replace(self, epochs=epochs_for(steps, batches_per_epoch))


def _augmentation(settings: DistillSettings):
    def augment(x: Tensor) -> Tensor:
        if settings.augment:
            x = random_crop_flip(x)
        return mix_images(x, settings.mixup) if settings.mixup > 0 else x
    return augment


@DEFENSES.register("distill", settings=DistillSettings, needs_labels=False)
def distill(model: nn.Module, clean: DataLoader, settings: DistillSettings, *, seed: int,
            progress: bool, callbacks: dict) -> DefenseResult:
    teacher = copy.deepcopy(model).eval()
    teacher.requires_grad_(False)
    reinitialise(model, derive_seed(seed, "distill"))
    train = TrainSettings(epochs=settings.epochs, lr=settings.lr, momentum=settings.momentum,
                          weight_decay=settings.weight_decay, augment=False,  # the loss's own
                          batch_size=clean.batch_size or 1)
    loss_fn = distillation_loss(teacher, _augmentation(settings), weight=1.0,
                                temperature=settings.temperature)
    # A run cut short resumes after its last saved epoch (resume.py), from the student saved then.
    checkpoints = EpochCheckpoints.from_callbacks(callbacks, "distill", settings)
    losses = train_classifier(model, clean, train, progress=progress, desc="distill",
                              loss_fn=loss_fn, checkpoints=checkpoints)
    return DefenseResult(model, {"losses": losses}, checkpoints.seconds(),
                         steps=settings.epochs * len(clean))
