"""Backdoor metrics: clean accuracy (ACC), attack success rate (ASR), robust accuracy (RA),
and BackdoorBench's defense effectiveness rating (DER)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..attacks.base import Attack
from ..data.images import ImageData
from ..training import device_of


@dataclass(frozen=True)
class Metrics:
    """Percentages. ASR/RA are None when no attack is known (e.g. a model of unknown origin)."""

    acc: float
    asr: float | None = None
    ra: float | None = None

    def as_dict(self) -> dict[str, float | None]:
        return {"acc": self.acc, "asr": self.asr, "ra": self.ra}


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Predicted classes for float images in [0, 1], in eval mode (the mode is restored)."""
    device = device_of(model)
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model(images[i:i + batch_size].to(device)).argmax(1).cpu()
                          for i in range(0, len(images), batch_size)])
    finally:
        model.train(was_training)


def evaluate(model: nn.Module, test: ImageData, attack: Attack | None = None,
             batch_size: int = 1000) -> Metrics:
    """ACC on clean test data; ASR and RA on triggered test inputs that the attack must move
    (for all-to-one: those whose true class is not the target)."""
    images = test.floats()
    acc = (predict(model, images, batch_size) == test.labels).float().mean().item() * 100
    if attack is None:
        return Metrics(acc)
    victims = attack.victims(test.labels)
    triggered = attack.trigger(images[victims])
    labels = test.labels[victims]
    predicted = predict(model, triggered, batch_size)
    asr = (predicted == attack.relabel(labels, test.num_classes)).float().mean().item() * 100
    ra = (predicted == labels).float().mean().item() * 100
    return Metrics(acc, asr, ra)


def der(before: Metrics, after: Metrics) -> float:
    """Defense effectiveness rating in [0, 1]: rewards the ASR drop, penalises the ACC drop.

    (max(0, ΔASR) − max(0, ΔACC) + 1) / 2, in fractions. Note the minus: a widely used
    implementation adds the accuracy drop, rewarding a defense for destroying the model.
    """
    if before.asr is None or after.asr is None:
        raise ValueError("DER needs ASR before and after")
    asr_drop = max(0.0, before.asr - after.asr) / 100
    acc_drop = max(0.0, before.acc - after.acc) / 100
    return (asr_drop - acc_drop + 1) / 2
