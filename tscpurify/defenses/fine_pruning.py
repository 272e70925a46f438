"""FP: Fine-Pruning. Prune the channels that clean data leaves dormant, then fine-tune.

Liu, Dolan-Gavitt & Garg, "Fine-Pruning: Defending Against Backdooring Attacks on Deep Neural
Networks", RAID 2018, https://arxiv.org/abs/1805.12185.

Plan:
  1. Hold out `holdout` of the clean data (seeded); the rest measures activations.
  2. Find the last feature map (the last module call that returns N×C×H×W) and the layer that
     reads it (the next Linear or Conv2d call), from one forward pass: no architecture names.
  3. Rank its C channels by mean activation on the clean data, lowest first.
  4. Prune channels in that order, one at a time, while held-out accuracy stays within
     `tolerance` of the unpruned model's; the first channel that breaks the tolerance is kept.
  5. Fine-tune on all the clean data with the pruned channels held at zero.

Reference: kangliucn/Fine-pruning-defense and SCLBD/BackdoorBench `defense/fp.py`.
Differs from the reference: pruning stops on a held-out part of the defender's clean data, not on
test accuracy, because a defense must not see data it does not hold (details below).

Adapted: the paper prunes the last conv layer of nets whose conv is followed directly by ReLU.
Here the pruned layer is the last feature map, as BackdoorBench does for PreAct-ResNet18 (the
output of the last stage + BN, which the classifier reads): for our CNN that is the last conv
block after ReLU and pooling; for (PreAct-)ResNets it also covers the residual stream, which
masking the last conv alone would leave intact. Activity is the mean of max(x, 0), so a
pre-activation map (PreAct's final BN) counts as its ReLU will see it. A channel is pruned by
zeroing the reading layer's weights on it, so the pruning is part of the saved weights (no hook
to lose); fine-tuning masks those weights' gradients, so they stay exactly zero.

The stopping rule sees only clean data the defender holds: BackdoorBench instead stops at a
10% relative drop of accuracy on the test set (acc_ratio 0.1), data a defender does not have.

Settings (defaults): holdout 0.2, tolerance 0.04 (an absolute drop: the paper's 4%),
fine-tuning epochs 20, lr 0.01, momentum 0.9, weight decay 5e-4 and crop/flip augmentation
(our FT baseline's budget; BackdoorBench fine-tunes 100 epochs on 5% of CIFAR-10).

Details: layer and reader names, per-channel activity, the order, the pruned channels,
held-out accuracy after each pruning step (index 0: unpruned), fine-tuning losses.

Example:
    >>> result = defend("fine_pruning", model, clean_loader, tolerance=0.04)
    >>> result.details["pruned"]          # channel indices, least active first
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..errors import SettingsError, SpecError
from ..resume import EpochCheckpoints
from ..training import TrainSettings, device_of, train_classifier
from ._common import Output, accuracy, inputs_of, module_outputs, split_loader
from .base import DefenseResult
from .budget import epochs_for
from .registered import DEFENSES


@dataclass(frozen=True)
class FinePruningSettings:
    holdout: float = field(default=0.2, metadata={
        "help": "fraction of the clean data held out to measure accuracy while pruning"})
    tolerance: float = field(default=0.04, metadata={
        "help": "largest allowed drop of held-out accuracy, absolute (paper: 4%)"})
    epochs: int = field(default=20, metadata={"help": "fine-tuning epochs after pruning"})
    lr: float = field(default=0.01, metadata={"help": "fine-tuning SGD learning rate (cosine)"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    weight_decay: float = field(default=5e-4, metadata={"help": "SGD weight decay"})
    augment: bool = field(default=True, metadata={"help": "random crop and flip"})

    def __post_init__(self) -> None:
        if not 0 < self.holdout < 1 or self.tolerance < 0:
            raise SettingsError(f"fine-pruning needs 0 < holdout < 1 and tolerance ≥ 0; got "
                                f"{self.holdout}, {self.tolerance}")

    def planned_steps(self, batches_per_epoch: int) -> int:
        return self.epochs * batches_per_epoch  # pruning itself only runs forward passes

    def at_budget(self, steps: int, batches_per_epoch: int) -> FinePruningSettings:
        return replace(self, epochs=epochs_for(steps, batches_per_epoch))


def last_feature_map(model: nn.Module, x: Tensor) -> tuple[Output, Output]:
    """(the last N×C×H×W output, the Linear/Conv2d call that reads it next)."""
    calls = module_outputs(model, x)
    maps = [i for i, call in enumerate(calls) if len(call.shape) == 4]
    if not maps:
        raise SpecError("fine-pruning needs a convolutional model: no module returns N×C×H×W")
    feature = calls[maps[-1]]
    channels = feature.shape[1]
    for call in calls[maps[-1] + 1:]:
        layer = call.module
        if isinstance(layer, nn.Linear) and layer.in_features % channels == 0:
            return feature, call
        if isinstance(layer, nn.Conv2d) and layer.in_channels == channels and layer.groups == 1:
            return feature, call
    raise SpecError(f"no Linear/Conv2d after {feature.name!r} reads its {channels} channels")


def channel_mask(weight: Tensor, channels: list[int], total: int) -> Tensor:
    """Ones, except zeros on the input columns of `weight` that read `channels` (of `total`)."""
    mask = torch.ones_like(weight)
    mask.view(weight.shape[0], total, -1)[:, channels] = 0
    return mask


@torch.no_grad()
def channel_activity(model: nn.Module, module: nn.Module, loader: DataLoader) -> Tensor:
    """Mean of max(output, 0) of each channel of `module` over the images of `loader`."""
    total: list[Tensor] = []
    count = [0]

    def hook(_module: nn.Module, _args: object, output: Tensor) -> None:
        total.append(output.detach().clamp_min(0).sum((0, 2, 3)))
        count[0] += output.numel() // output.shape[1]

    handle = module.register_forward_hook(hook)
    model.eval()
    try:
        for batch in loader:
            model(inputs_of(batch).to(device_of(model)))
    finally:
        handle.remove()
    return torch.stack(total).sum(0) / count[0]


@DEFENSES.register("fine_pruning", settings=FinePruningSettings, needs_labels=True)
def fine_pruning(model: nn.Module, clean: DataLoader, settings: FinePruningSettings, *,
                 seed: int, progress: bool, callbacks: dict) -> DefenseResult:
    began = time.perf_counter()
    rest, holdout = split_loader(clean, settings.holdout, seed)
    feature, reader = last_feature_map(model, inputs_of(next(iter(rest)))[:2])
    channels = feature.shape[1]
    activity = channel_activity(model, feature.module, rest)
    order = torch.argsort(activity, stable=True).tolist()

    # Prune one channel at a time; the pruned set is always a prefix of `order`.
    weight = reader.module.weight
    original = weight.detach().clone()
    scores = [accuracy(model, holdout)]
    pruned = 0
    with torch.no_grad():
        for k in tqdm(range(1, channels + 1), desc="prune", disable=not progress, leave=False):
            weight.copy_(original * channel_mask(original, order[:k], channels))
            scores.append(accuracy(model, holdout))
            if scores[0] - scores[-1] > settings.tolerance:
                break
            pruned = k
        mask = channel_mask(original, order[:pruned], channels)
        weight.copy_(original * mask)
    seconds = {"prune": time.perf_counter() - began}

    # Zero weights with zero gradients stay zero under SGD with momentum and weight decay.
    # A run cut short resumes after its last saved epoch (resume.py): the pruning above reads
    # no saved state and draws as in any run, so it finds the same channels and mask again;
    # the saved weights, pruned channels at zero, then replace the model's.
    handle = weight.register_hook(lambda grad: grad * mask)
    try:
        train = TrainSettings(epochs=settings.epochs, lr=settings.lr, momentum=settings.momentum,
                              weight_decay=settings.weight_decay, augment=settings.augment,
                              batch_size=clean.batch_size or 1)
        checkpoints = EpochCheckpoints.from_callbacks(callbacks, "fine_pruning", settings)
        began = time.perf_counter()
        losses = train_classifier(model, clean, train, progress=progress, desc="fine-tune",
                                  checkpoints=checkpoints)
        seconds["finetune"] = time.perf_counter() - began
    finally:
        handle.remove()
    seconds.update(checkpoints.seconds())
    details = {"layer": feature.name, "reader": reader.name, "channels": channels,
               "activity": activity.tolist(), "order": order, "pruned": order[:pruned],
               "accuracy": scores, "losses": losses}
    return DefenseResult(model, details, seconds, steps=settings.epochs * len(clean))
