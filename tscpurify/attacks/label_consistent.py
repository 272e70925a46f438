"""Label-Consistent: a clean-label patch backdoor made learnable by adversarial perturbation.

Turner, Tsipras & Madry, "Label-Consistent Backdoor Attacks", 2019,
https://arxiv.org/abs/1912.02771. Poisoned samples are target-class images whose labels stay
correct, so a plain patch on them would be ignored: the images already look like the target.
The paper first makes them hard to classify with a PGD perturbation (L∞ ball of radius eps)
against a separately trained clean model, then stamps the patch; the network can then only fit
them by relying on the patch. At test time the trigger is the patch alone.

What we adapted: the clean model is a surrogate (a width-8 CNN trained for one epoch on at most
5000 training images, in `prepare`) rather than a fully trained network, to keep preparing
cheap on a CPU; PGD starts from the clean image (no random start), so it is deterministic.
The paper's patch is a 3×3 black-and-white pattern in all four corners (`four_corners=True`);
by default we use one corner, BadNets-style, and full patch amplitude (the paper also studies
reduced-amplitude patches). The patch is applied after the perturbation; rounding to uint8 may
add up to 0.5/255 to the eps bound.

Args (published defaults where they exist): target 0, rate 0.1 (of the data set, capped at
the target class's size as for SIG), eps 16/255 (the paper reports 8/255 and 16/255), steps
10, step size 2.5·eps/steps, size 3, position/margin/pattern as in BadNets, four_corners
False, surrogate_samples 5000, surrogate_epochs 1. Shapes: (N, C, H, W) → (N, C, H, W).

Example:
    attack = LabelConsistent(eps=16 / 255).prepare(train_data, seed=0)
    poisoned, indices = poison_dataset(train_data, attack, seed=0)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from ..data.images import ImageData
from ..errors import SettingsError
from .badnets import POSITIONS, BadNets
from .base import to_pixels, to_uint8, transient
from .registered import ATTACKS
from .surrogate import train_surrogate


@ATTACKS.register("label_consistent")
@dataclass(frozen=True)
class LabelConsistent(BadNets):
    """Args: eps: L∞ radius of the PGD perturbation in [0, 1] pixels; steps: PGD steps;
    four_corners: stamp the patch in every corner (the paper) instead of `position`;
    surrogate_samples / surrogate_epochs: how the clean model is trained; the BadNets
    arguments (size, position, margin, pattern) describe the patch."""

    name: ClassVar[str] = "label_consistent"
    clean_label: ClassVar[bool] = True
    eps: float = 16 / 255
    steps: int = 10
    four_corners: bool = False
    surrogate_samples: int = 5000
    surrogate_epochs: int = 1
    surrogate: nn.Module | None = transient()

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.eps <= 1 or self.steps < 1 or self.surrogate_samples < 1:
            raise SettingsError(f"label_consistent needs eps in (0, 1], steps ≥ 1 and "
                                f"surrogate_samples ≥ 1, got eps={self.eps}, steps={self.steps}, "
                                f"surrogate_samples={self.surrogate_samples}")

    def trigger(self, x: torch.Tensor) -> torch.Tensor:
        if not self.four_corners:
            return super().trigger(x)
        out = x
        for position in POSITIONS:
            out = replace(self, position=position, four_corners=False).trigger(out)
        return out

    def prepare(self, data: ImageData, seed: int) -> LabelConsistent:
        """A copy holding the clean surrogate model the perturbation is computed against."""
        if self.surrogate is not None:
            return self
        model = train_surrogate(data, seed, self.surrogate_samples, self.surrogate_epochs)
        return replace(self, surrogate=model)

    def perturb(self, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        """x moved within the L∞ eps-ball (and [0, 1]) to raise the surrogate's loss on y."""
        if self.surrogate is None:
            raise SettingsError("label_consistent perturbs against a clean surrogate model: "
                                "call attack.prepare(data, seed) first (poison_dataset does)")
        # 2.5·eps/steps (the usual PGD choice): enough to cross the whole ball within the steps.
        step = 2.5 * self.eps / self.steps
        return torch.cat([self._pgd(x[i:i + batch_size], y[i:i + batch_size], step)
                          for i in range(0, len(x), batch_size)])

    def _pgd(self, x: torch.Tensor, y: torch.Tensor, step: float) -> torch.Tensor:
        adv = x.clone()
        for _ in range(self.steps):
            adv.requires_grad_(True)
            loss = F.cross_entropy(self.surrogate(adv), y)
            (grad,) = torch.autograd.grad(loss, adv)
            # Ascend along the gradient sign, then project back onto the ball and pixel range.
            adv = adv.detach() + step * grad.sign()
            adv = torch.min(torch.max(adv, x - self.eps), x + self.eps).clamp(0, 1)
        return adv.detach()

    def poison(self, data: ImageData, generator: torch.Generator) -> tuple[ImageData, torch.Tensor]:
        """Target-class samples: perturb, then stamp the patch; every label stays as it was."""
        indices = self.choose(data.labels, generator)
        perturbed = self.perturb(to_pixels(data.images[indices]), data.labels[indices])
        images = data.images.clone()
        images[indices] = to_uint8(self.trigger(perturbed))
        return ImageData(images, data.labels.clone(), data.classes), indices
