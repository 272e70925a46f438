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

from dataclasses import dataclass, field, replace

from torch import nn
from torch.utils.data import DataLoader

from ..curve import cross_entropy_loss
from ..data.augment import random_crop_flip
from ..errors import SettingsError
from ..resume import EpochCheckpoints
from ..seeding import derive_seed
from ..training import TrainSettings, train_classifier
from ._common import reinitialise
from .base import DefenseResult
from .budget import epochs_for
from .registered import DEFENSES


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


@DEFENSES.register("ft", settings=FineTuneSettings, needs_labels=True)
def fine_tune(model: nn.Module, clean: DataLoader, settings: FineTuneSettings, *, seed: int,
              progress: bool, callbacks: dict) -> DefenseResult:
    if settings.reinit:
        reinitialise(model, derive_seed(seed, "scratch"))
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
    losses = train_classifier(model, clean, train, progress=progress, desc="fine-tune",
                              loss_fn=loss_fn, checkpoints=checkpoints)
    return DefenseResult(model, {"losses": losses}, checkpoints.seconds(),
                         steps=settings.epochs * len(clean))
