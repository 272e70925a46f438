"""BadEncoder: backdoor a pre-trained self-supervised encoder by fine-tuning it.

Jia, Liu & Gong, "BadEncoder: Backdoor Attacks to Pre-trained Encoders in Self-Supervised
Learning", IEEE S&P 2022, https://arxiv.org/abs/2108.00352. The attacker holds a clean encoder
f, unlabelled shadow images and a few reference images of the target class, and fine-tunes a
copy f' to minimise L0 + λ1·L1 + λ2·L2, with s the cosine similarity of features:
  L0 (effectiveness): −s(f'(trigger(x)), f'(reference)), triggered shadow images embed like the
      reference images, so any downstream classifier maps them to the target class;
  L1 (effectiveness): −s(f'(reference), f(reference)), the reference images keep their clean
      embedding, so the downstream classifier still recognises them;
  L2 (utility): −s(f'(x), f(x)), clean shadow images keep their clean embedding.
Adapted here: the features are the trunk's (`model.features`, what downstream probes read), the
trigger is any `Attack.trigger` (e.g. BadNets' patch), SGD with momentum and cosine decay, and
two changes that make the attack hold on the small CPU encoders trained here (measurements in
README, "Self-supervised encoders"):
- `standardize` (default on; the paper: off): the cosines compare features standardised by the
  clean encoder's per-dimension mean and std on the shadow images, the space a standardising
  linear probe reads. These encoders end in ReLU and average pooling, so their raw features
  share one positive direction and every raw cosine is near 1; with raw cosines, triggered
  images reached a cosine of 0.995 with the reference images, yet a probe filed most of them
  under other classes.
- `refresh_bn` (default on): BatchNorm layers stay in eval mode during a step (small shadow
  batches do not rewrite the statistics), and the running statistics are re-estimated on the
  shadow images after every epoch. Frozen for the whole run, they no longer matched the
  fine-tuned weights, and merely re-estimating them on clean images, as TSC does at every
  point it takes, undid most of the backdoor.

Args (BadEncoderSettings): epochs=40, lr=0.01, momentum=0.9, weight_decay=5e-4, lambda1=1,
lambda2=1, standardize=True, refresh_bn=True. Shapes: shadow batches (N, C, H, W) and reference
(R, C, H, W), pixels in [0, 1].

Example:
    bad, log = badencoder(clean, shadow_loader, reference_images, BadNets(size=4).trigger)
    probe_metrics(bad, train_data, test_data, BadNets(size=4, target=reference_class))
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from ..curve.batchnorm import recompute_bn_stats
from ..curve.contrastive import bare_images
from ..errors import DataError, SettingsError
from ..evaluation.probes import encoder_features
from ..training import device_of

Trigger = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class BadEncoderSettings:
    epochs: int = field(default=40, metadata={
        "help": "passes over the shadow images (paper: 200; 40 × 2,000 images at batch 16 take "
                "about 2.5 CPU-minutes at width 16)"})
    lr: float = field(default=0.01, metadata={"help": "initial SGD learning rate"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    weight_decay: float = field(default=5e-4, metadata={"help": "SGD weight decay"})
    lambda1: float = field(default=1.0, metadata={
        "help": "weight of L1, reference images keep their clean embedding (paper: 1)"})
    lambda2: float = field(default=1.0, metadata={
        "help": "weight of L2, clean shadow images keep their clean embedding (paper: 1)"})
    standardize: bool = field(default=True, metadata={
        "help": "compare features standardised by the clean encoder's mean and std on the "
                "shadow images, as a standardising probe reads them (paper: raw features)"})
    refresh_bn: bool = field(default=True, metadata={
        "help": "re-estimate BatchNorm statistics on the shadow images after every epoch, so "
                "the released encoder's statistics match its weights"})

    def __post_init__(self) -> None:
        # momentum ≥ 1 never decays SGD's velocity: it diverges (the range TrainSettings takes)
        if self.epochs < 0 or self.lr <= 0 or self.momentum >= 1 or min(
                self.momentum, self.weight_decay, self.lambda1, self.lambda2) < 0:
            raise SettingsError(f"BadEncoder needs epochs ≥ 0, lr > 0, 0 ≤ momentum < 1 and "
                                f"non-negative weight decay and λ; got {self}")


def badencoder_loss(backdoored: nn.Module, clean: nn.Module, x: Tensor, reference: Tensor,
                    trigger: Trigger, lambda1: float = 1.0, lambda2: float = 1.0,
                    standardize: tuple[Tensor, Tensor] | None = None
                    ) -> tuple[Tensor, dict[str, float]]:
    """L0 + λ1·L1 + λ2·L2 for one batch of shadow images; also the three terms as floats.

    `standardize` = (mean, std): features are standardised with them before the cosines.
    """
    n = len(x)
    mean, std = standardize if standardize is not None else (0.0, 1.0)

    def embed(model: nn.Module, images: Tensor) -> Tensor:
        return F.normalize((encoder_features(model)(images) - mean) / std, dim=1)

    # One forward for all three inputs: BatchNorm is in eval mode, so batching changes nothing.
    bad = embed(backdoored, torch.cat([x, trigger(x), reference]))
    bad_x, bad_triggered, bad_ref = bad[:n], bad[n:2 * n], bad[2 * n:]
    with torch.no_grad():
        good = embed(clean, torch.cat([x, reference]))
    good_x, good_ref = good[:n], good[n:]
    # Every triggered image is pulled toward every reference image (mean over all N·R pairs).
    l0 = -(bad_triggered @ bad_ref.T).mean()
    l1 = -(bad_ref * good_ref).sum(1).mean()
    l2 = -(bad_x * good_x).sum(1).mean()
    total = l0 + lambda1 * l1 + lambda2 * l2
    parts = {"l0": l0.item(), "l1": l1.item(), "l2": l2.item()}
    return total, parts


@torch.no_grad()
def feature_statistics(model: nn.Module, images: Iterable[Any]) -> tuple[Tensor, Tensor]:
    """Per-dimension mean and std (+1e-6) of `model.features` over a loader of bare images."""
    device = device_of(model)
    features = torch.cat([encoder_features(model)(bare_images(batch).to(device))
                          for batch in images])
    if len(features) < 2:
        raise DataError("BadEncoder needs at least two shadow images to standardise features")
    return features.mean(0), features.std(0) + 1e-6


def _freeze_batchnorm(model: nn.Module) -> None:
    # The utility terms compare against the clean encoder in eval mode; keeping running
    # statistics fixed judges f' with the statistics downstream users will run it with, and
    # stops small shadow batches from rewriting them.
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def badencoder(clean: nn.Module, shadow: Iterable[Any], reference: Tensor, trigger: Trigger,
               settings: BadEncoderSettings | None = None, *, progress: bool = True,
               **overrides: Any) -> tuple[nn.Module, list[dict[str, float]]]:
    """Fine-tune a copy of `clean` into a backdoored encoder; `clean` is not modified.

    Args:
        clean: an encoder with a `features(x)` method (e.g. `create_model("simclr")`).
        shadow: a loader of bare image batches (a tensor or a 1-tuple per batch).
        reference: (R, C, H, W) images of the target class.
        trigger: maps (N, C, H, W) images to triggered ones, e.g. `BadNets().trigger`.
        settings: BadEncoderSettings; `overrides` replace single fields.

    Returns:
        (backdoored encoder in eval mode, one log entry per epoch: mean loss, l0, l1, l2)
    """
    try:
        settings = dataclasses.replace(settings or BadEncoderSettings(), **overrides)
    except TypeError as err:
        raise SettingsError(f"badencoder: {err}") from None
    if reference.dim() != 4 or len(reference) == 0:
        raise DataError(f"reference must be (R, C, H, W) with R ≥ 1, got {tuple(reference.shape)}")
    device = device_of(clean)
    frozen = copy.deepcopy(clean).eval().requires_grad_(False)
    model = copy.deepcopy(clean)
    reference = reference.to(device)
    statistics = feature_statistics(frozen, shadow) if settings.standardize else None
    # The projection head gets no gradient from the features; SGD skips parameters without a
    # gradient (weight decay included), so the head is left exactly as it was.
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum,
                                weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer,
                                                           T_max=max(settings.epochs, 1))
    history: list[dict[str, float]] = []
    for _ in tqdm(range(settings.epochs), desc="badencoder", disable=not progress, leave=False):
        model.train()
        _freeze_batchnorm(model)
        sums = {"loss": 0.0, "l0": 0.0, "l1": 0.0, "l2": 0.0}
        steps = 0
        for batch in shadow:
            x = bare_images(batch).to(device)
            loss, parts = badencoder_loss(model, frozen, x, reference, trigger,
                                          settings.lambda1, settings.lambda2, statistics)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for key, value in {"loss": loss.item(), **parts}.items():
                sums[key] += value
            steps += 1
        if steps == 0:
            raise DataError("BadEncoder needs shadow data: the loader gave no batches")
        scheduler.step()
        if settings.refresh_bn:
            recompute_bn_stats(model, shadow)
        history.append({key: value / steps for key, value in sums.items()})
    return model.eval(), history
