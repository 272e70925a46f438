"""Input-Aware: a dynamic backdoor whose trigger is generated from each input.

Nguyen & Tran, "Input-Aware Dynamic Backdoor Attack", NeurIPS 2020,
https://arxiv.org/abs/2010.08138. Two small conv nets read the input x and produce a pattern
p(x) and a mask m(x), both in [0, 1]; the triggered input is x' = x + m(x)·(p(x) − x). No two
inputs share a trigger, and a trigger is bound to its input: the paper trains the classifier
on clean samples, backdoor samples (own trigger, target label) and cross-trigger samples
(x_i stamped with the trigger of another input x_j, label kept), so a trigger copied onto
another image does nothing. The plan (paper §3, reference code):

  1. Pre-train the mask generator alone: a diversity loss ‖x1 − x2‖ / ‖m(x1) − m(x2)‖
     (minimised, so different inputs get different masks) plus λ_norm × a density loss
     keeping the mask sparse; then freeze it.
  2. Train the pattern generator jointly with a classifier: cross-entropy on backdoor,
     cross-trigger and clean samples of each batch, plus the same diversity loss on patterns.

What we adapted: our pipeline poisons a fixed data set and trains the victim on it afterwards
(`prepare` then `poison`), as for Label-Consistent and TrojanNN. So the joint training of
step 2 runs in `prepare` with a surrogate classifier (a width-8 'cnn', fresh, trained only
here, then kept as a transient attribute and dropped from the record), on a seeded subset of
at most `samples` clean training images, for a CPU-sized budget (`mask_epochs` + `epochs`
passes over the subset, about 30 s on Fashion-MNIST with one thread) instead of the paper's
25 + 600 epochs over the whole set, with constant learning rates (the paper decays them) and
no augmentation while fitting. `poison` then writes round(rate·N) backdoor samples (drawn
outside the target class, as for every attack here; relabelled all-to-one, or y → y+1 with
all_to_all, the paper's all2all) and round(cross_ratio·backdoor count) cross-trigger samples
(drawn among the others, any class, each stamped with the trigger of a random other training
image, label kept) into the set, where the paper draws fresh ones in every batch.
The generators are much smaller than the paper's encoder-decoders (1,474 parameters in all
for grey and 1,908 for RGB images at width 8, no BatchNorm): 3×3 conv → ReLU → 2×2 max-pool →
3×3 conv → ReLU → nearest upsampling → 3×3 conv, so their weights fit the JSON record, rounded
to 6 decimals (the rounded weights are the ones poisoning uses, so training and test triggers
come from the same networks). The density loss is the mean over samples of
max(0, mean of m(x) − density), so `density` is the share of pixels a mask may cover; the
reference code instead penalises every mask pixel above `density` (an L1 penalty on nearly
binary masks, whose resulting density depends on the balance with the diversity loss).
As in the reference, the pattern is tanh(·)/2 + 1/2 and the mask is that squashed again by
tanh(20·s − 10)/2 + 1/2, which makes it nearly binary.

Args (paper defaults where they exist): target 0, rate 0.1 (paper p_attack), cross_ratio 1
(paper p_cross 0.1 = p_attack), density 0.032, lambda_div 1, lambda_norm 100, lr 0.01 (Adam,
betas (0.5, 0.9), for both generators), classifier_lr 0.01 (SGD, momentum 0.9), batch_size
128; ours: width 8, samples 5000, mask_epochs 5, epochs 8; channels and weights are filled
by `prepare` (or given to rebuild a recorded trigger). Shapes: (N, C, H, W) → (N, C, H, W),
pixels in [0, 1], any C and square H×W (the surrogate classifier needs square images).

Example:
    attack = InputAware(target=0).prepare(train_data, seed=0)   # trains the generators
    triggered = attack.trigger(images)            # each image gets its own trigger
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from ..data.images import ImageData
from ..errors import SettingsError
from .base import Attack, draw_besides, frozen, to_pixels, to_uint8, transient
from .registered import ATTACKS
from .surrogate import surrogate_cnn

log = logging.getLogger(__name__)

Weights = tuple[float, ...]
# Keeps the diversity ratio finite for identical generator outputs (the reference's EPSILON).
EPSILON = 1e-7
# Generators run on chunks of this many images, so triggering a whole test set stays small.
CHUNK = 1000


class TriggerNet(nn.Module):
    """A tiny encoder-decoder: (N, C_in, H, W) → (N, C_out, H, W) raw scores."""

    def __init__(self, in_channels: int, out_channels: int, width: int) -> None:
        super().__init__()
        self.encode = nn.Conv2d(in_channels, width, 3, padding=1)
        self.middle = nn.Conv2d(width, width, 3, padding=1)
        self.decode = nn.Conv2d(width, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.middle(F.max_pool2d(F.relu(self.encode(x)), 2)))
        # Upsample to the input's own size, so odd sizes work too.
        return self.decode(F.interpolate(h, size=x.shape[-2:], mode="nearest"))


def squash(scores: torch.Tensor) -> torch.Tensor:
    """Raw scores → (0, 1), as the reference generators end."""
    return torch.tanh(scores) / 2 + 0.5


def threshold(values: torch.Tensor) -> torch.Tensor:
    """Values in [0, 1] → nearly binary values in [0, 1], steep around 0.5 (the reference's
    mask threshold)."""
    return torch.tanh(20 * values - 10) / 2 + 0.5


def stamp(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """x + m·(p − x): the pattern where the mask is on, the input where it is off."""
    return (x + mask * (pattern - x)).clamp(0, 1)


def diversity(x1: torch.Tensor, x2: torch.Tensor, g1: torch.Tensor,
              g2: torch.Tensor) -> torch.Tensor:
    """Mean over pairs of ‖x1 − x2‖ / ‖G(x1) − G(x2)‖ (root-mean-square distances): small when
    different inputs get different generator outputs."""
    inputs = (x1 - x2).pow(2).flatten(1).mean(1).sqrt()
    # EPSILON inside the root too: the root's gradient at 0 (two equal outputs) is infinite.
    outputs = ((g1 - g2).pow(2).flatten(1).mean(1) + EPSILON).sqrt()
    return (inputs / (outputs + EPSILON)).mean()


def density_excess(mask: torch.Tensor, density: float) -> torch.Tensor:
    """Mean over samples of how far each mask's covered share exceeds `density`."""
    return F.relu(mask.flatten(1).mean(1) - density).mean()


@ATTACKS.register("input_aware")
@dataclass(frozen=True)
class InputAware(Attack):
    """Args: cross_ratio: cross-trigger samples per backdoor sample; density: share of pixels
    a mask may cover; lambda_div / lambda_norm: weights of the diversity and density losses;
    width: hidden channels of both generators; samples: clean images the generators are fitted
    on; mask_epochs / epochs: passes over them for the mask generator alone, then for the
    pattern generator with the surrogate classifier; lr / classifier_lr / batch_size: that
    training; channels / weights: the fitted generators (set by `prepare`, or given to rebuild
    a recorded trigger), mask generator's parameters first."""

    name: ClassVar[str] = "input_aware"
    cross_ratio: float = 1.0
    density: float = 0.032
    lambda_div: float = 1.0
    lambda_norm: float = 100.0
    width: int = 8
    samples: int = 5000
    mask_epochs: int = 5
    epochs: int = 8
    lr: float = 0.01
    classifier_lr: float = 0.01
    batch_size: int = 128
    channels: int | None = None
    weights: Weights | None = None
    surrogate: nn.Module | None = transient()

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "weights", frozen(self.weights))  # JSON lists → tuples
        if (self.cross_ratio < 0 or not 0 < self.density < 1 or self.lambda_div < 0
                or self.lambda_norm < 0):
            raise SettingsError(f"input_aware needs cross_ratio ≥ 0, density in (0, 1) and "
                                f"lambda_div, lambda_norm ≥ 0, got {self.cross_ratio}, "
                                f"{self.density}, {self.lambda_div}, {self.lambda_norm}")
        if (self.width < 1 or self.samples < 2 or self.mask_epochs < 0 or self.epochs < 0
                or self.lr <= 0 or self.classifier_lr <= 0 or self.batch_size < 2):
            raise SettingsError(f"input_aware needs width ≥ 1, samples ≥ 2, epochs ≥ 0, "
                                f"lr > 0 and batch_size ≥ 2, got width={self.width}, "
                                f"samples={self.samples}, mask_epochs={self.mask_epochs}, "
                                f"epochs={self.epochs}, lr={self.lr}, "
                                f"classifier_lr={self.classifier_lr}, "
                                f"batch_size={self.batch_size}")
        if (self.weights is None) != (self.channels is None):
            raise SettingsError("input_aware needs both channels and weights (a fitted "
                                "attack) or neither (to fit them in prepare)")
        if self.weights is not None:
            if self.channels < 1:
                raise SettingsError(f"input_aware channels must be ≥ 1, got {self.channels}")
            expected = sum(p.numel() for net in self.generators(self.channels)
                           for p in net.parameters())
            if len(self.weights) != expected or not all(
                    isinstance(w, (int, float)) for w in self.weights):
                raise SettingsError(f"input_aware weights must be a flat list of {expected} "
                                    f"numbers for {self.channels} channel(s) at width "
                                    f"{self.width}, got {len(self.weights)} entries")

    def generators(self, channels: int) -> tuple[TriggerNet, TriggerNet]:
        """Fresh (mask, pattern) generators for images with `channels` channels."""
        return (TriggerNet(channels, 1, self.width),
                TriggerNet(channels, channels, self.width))

    def fitted(self) -> tuple[TriggerNet, TriggerNet]:
        """The (mask, pattern) generators holding the recorded weights, in eval mode."""
        if self.weights is None:
            raise SettingsError("input_aware's trigger comes from generators learned on the "
                                "training data: call attack.prepare(data, seed) first, or "
                                "rebuild it from a record that holds the weights")
        mask_net, pattern_net = self.generators(self.channels)
        vector = torch.tensor(self.weights, dtype=torch.float32)
        params = [*mask_net.parameters(), *pattern_net.parameters()]
        torch.nn.utils.vector_to_parameters(vector, params)
        for param in params:
            param.requires_grad_(False)
        return mask_net.eval(), pattern_net.eval()

    def _generated(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask_net, pattern_net = self.fitted()
        if source.dim() != 4 or source.shape[1] != self.channels:
            raise SettingsError(f"input_aware generators were fitted to {self.channels}-"
                                f"channel images, got shape {tuple(source.shape)}")
        masks, patterns = [], []
        with torch.no_grad():
            for i in range(0, len(source), CHUNK):
                chunk = source[i:i + CHUNK].float().cpu()
                masks.append(threshold(squash(mask_net(chunk))))
                patterns.append(squash(pattern_net(chunk)))
        return (torch.cat(masks).to(source), torch.cat(patterns).to(source))

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) masks in [0, 1] for inputs x."""
        return self._generated(x)[0]

    def pattern(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) patterns in [0, 1] for inputs x."""
        return self._generated(x)[1]

    def cross(self, x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """x stamped with the triggers generated from `source` (same shape as x)."""
        if source.shape != x.shape:
            raise SettingsError(f"input_aware cross needs inputs and sources of one shape, "
                                f"got {tuple(x.shape)} and {tuple(source.shape)}")
        mask, pattern = self._generated(source)
        return stamp(x, mask, pattern)

    def trigger(self, x: torch.Tensor) -> torch.Tensor:
        return self.cross(x, x)

    def prepare(self, data: ImageData, seed: int) -> InputAware:
        """A copy holding the fitted generators' weights (and the surrogate classifier)."""
        if self.weights is not None:
            return self
        if len(data) < 2:
            raise SettingsError("input_aware needs at least 2 training images to fit its "
                                "generators (pairs of inputs drive the diversity loss)")
        generator = torch.Generator().manual_seed(seed)
        subset = torch.randperm(len(data), generator=generator)[:self.samples]
        x, y = to_pixels(data.images[subset]), data.labels[subset]
        # Initial weights come from the global RNG: seed it here and restore it afterwards, so
        # preparing is deterministic and does not shift the randomness of later training.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            mask_net, pattern_net = self.generators(data.shape[0])
            classifier = surrogate_cnn(data)
        self._fit_mask(mask_net, x, generator)
        self._fit_pattern(mask_net, pattern_net, classifier, x, y, data.num_classes, generator)
        params = [*mask_net.parameters(), *pattern_net.parameters()]
        vector = torch.nn.utils.parameters_to_vector(params).detach()
        weights = frozen(vector.double().round(decimals=6).tolist())
        for param in classifier.parameters():
            param.requires_grad_(False)
        return replace(self, channels=data.shape[0], weights=weights,
                       surrogate=classifier.eval())

    def _pairs(self, count: int, generator: torch.Generator
               ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of index pairs (i, j) from two independent shuffles of range(count)."""
        first = torch.randperm(count, generator=generator)
        second = torch.randperm(count, generator=generator)
        for start in range(0, count, self.batch_size):
            i, j = first[start:start + self.batch_size], second[start:start + self.batch_size]
            if len(i) >= 2:  # a trailing single image has no pair to compare with
                yield i, j

    def _fit_mask(self, mask_net: TriggerNet, x: torch.Tensor,
                  generator: torch.Generator) -> None:
        """Step 1: masks that differ between inputs and cover at most `density` of them."""
        optimizer = torch.optim.Adam(mask_net.parameters(), lr=self.lr, betas=(0.5, 0.9))
        mask_net.train()
        for epoch in range(self.mask_epochs):
            for i, j in self._pairs(len(x), generator):
                m1, m2 = (threshold(squash(mask_net(x[k]))) for k in (i, j))
                loss = (self.lambda_norm * density_excess(m1, self.density)
                        + self.lambda_div * diversity(x[i], x[j], m1, m2))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            log.debug("input_aware mask epoch %d: loss %.4f, density %.4f", epoch,
                      loss.item(), m1.mean().item())
        for param in mask_net.parameters():
            param.requires_grad_(False)
        mask_net.eval()

    def _fit_pattern(self, mask_net: TriggerNet, pattern_net: TriggerNet, classifier: nn.Module,
                     x: torch.Tensor, y: torch.Tensor, num_classes: int,
                     generator: torch.Generator) -> None:
        """Step 2: patterns the classifier learns to send to the target, bound to their input
        by cross-trigger samples, diverse by the diversity loss."""
        pattern_opt = torch.optim.Adam(pattern_net.parameters(), lr=self.lr, betas=(0.5, 0.9))
        classifier_opt = torch.optim.SGD(classifier.parameters(), lr=self.classifier_lr,
                                         momentum=0.9, weight_decay=5e-4)
        pattern_net.train()
        classifier.train()
        for epoch in range(self.epochs):
            for i, j in self._pairs(len(x), generator):
                # Per batch, as the reference: the first share gets its own trigger and the
                # target label, the next share another input's trigger, the rest stays clean.
                n_bd = max(1, round(self.rate * len(i)))
                n_cross = min(round(self.rate * self.cross_ratio * len(i)), len(i) - n_bd)
                x1, x2 = x[i], x[j]
                m1 = threshold(squash(mask_net(x1[:n_bd])))
                p1 = squash(pattern_net(x1[:n_bd]))
                m2 = threshold(squash(mask_net(x2[:max(n_bd, n_cross)])))
                p2 = squash(pattern_net(x2[:max(n_bd, n_cross)]))
                backdoor = stamp(x1[:n_bd], m1, p1)
                crossed = stamp(x1[n_bd:n_bd + n_cross], m2[:n_cross], p2[:n_cross])
                inputs = torch.cat([backdoor, crossed, x1[n_bd + n_cross:]])
                targets = torch.cat([self.relabel(y[i][:n_bd], num_classes), y[i][n_bd:]])
                loss = (F.cross_entropy(classifier(inputs), targets)
                        + self.lambda_div * diversity(x1[:n_bd], x2[:n_bd], p1, p2[:n_bd]))
                pattern_opt.zero_grad()
                classifier_opt.zero_grad()
                loss.backward()
                pattern_opt.step()
                classifier_opt.step()
            log.debug("input_aware joint epoch %d: loss %.4f", epoch, loss.item())
        pattern_net.eval()

    def poison(self, data: ImageData, generator: torch.Generator) -> tuple[ImageData, torch.Tensor]:
        """Backdoor samples as usual, plus cross-trigger samples that keep their labels."""
        poisoned, indices = super().poison(data, generator)
        crossed = draw_besides(len(data), indices, round(self.cross_ratio * len(indices)),
                               generator, f"input_aware's cross-trigger samples (cross_ratio "
                                          f"{self.cross_ratio} × {len(indices)} backdoor samples)")
        if len(crossed) == 0:
            return poisoned, indices
        count = len(crossed)
        # Each cross sample borrows the trigger of a uniformly drawn *other* training image.
        partners = torch.randint(0, len(data) - 1, (count,), generator=generator)
        partners += (partners >= crossed).long()
        images = poisoned.images.clone()
        images[crossed] = to_uint8(self.cross(to_pixels(data.images[crossed]),
                                              to_pixels(data.images[partners])))
        return ImageData(images, poisoned.labels, data.classes), indices
