"""TrojanNN: a trigger optimised to fire one internal neuron.

Liu, Ma, Aafer, Lee, Zhai, Wang & Zhang, "Trojaning Attack on Neural Networks", NDSS 2018,
https://doi.org/10.14722/ndss.2018.23291 (no arXiv version). Instead of an arbitrary patch,
the attacker picks a neuron of an internal layer that is strongly connected to the trigger
region and shapes the trigger pixels, inside a fixed mask, by gradient ascent until that
neuron fires strongly. Retraining on inputs stamped with this trigger and labelled with the
target then only has to link an already-excited neuron to the target class.

What we adapted: the paper reverse-engineers training data and retrains the attacked model
itself; we optimise against a surrogate (a width-8 CNN trained for one epoch on at most 5000
clean training images, in `prepare`) and then poison the data set, all-to-one, like BadNets.
The neuron is the unit of the surrogate's penultimate layer (the hidden Linear layer) with
the largest summed |weight| from the feature-map cells under the mask; its pre-activation is
maximised with Adam, the patch projected to [0, 1] after every step, averaged over 32 clean
images stamped with it. The learned patch is stored in the record, rounded to 6
decimals (C × size × size numbers), so the exact trigger is rebuilt without any model.

Args (defaults; the paper tunes mask and layer per model): target 0, rate 0.1, size 5 (square
mask side, bottom-right corner), margin 0, steps 100, lr 0.1, patch_seed 0 (initial patch),
surrogate_samples 5000, surrogate_epochs 1; neuron and patch are filled by `prepare`.
Shapes: (N, C, H, W) → (N, C, H, W).

Example:
    attack = TrojanNN(size=5).prepare(train_data, seed=0)   # learns the patch
    triggered = attack.trigger(images)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from ..data.images import ImageData
from ..errors import SettingsError
from .badnets import check_corner_fits, corner_box
from .base import Attack, frozen, to_pixels, transient
from .registered import ATTACKS
from .surrogate import train_surrogate

Patch = tuple[tuple[tuple[float, ...], ...], ...]
# Clean images the neuron's activation is averaged over while the patch is optimised: enough
# to stop the patch fitting one background, few enough to keep preparing within seconds.
OPTIMISE_ON = 32


@ATTACKS.register("trojannn")
@dataclass(frozen=True)
class TrojanNN(Attack):
    """Args: size: mask side in pixels; margin: pixels from the bottom-right border; steps / lr:
    the trigger optimisation; patch_seed: seed of the initial patch; neuron / patch: the
    learned result (set by `prepare`, or given to rebuild a recorded trigger)."""

    name: ClassVar[str] = "trojannn"
    size: int = 5
    margin: int = 0
    steps: int = 100
    lr: float = 0.1
    patch_seed: int = 0
    surrogate_samples: int = 5000
    surrogate_epochs: int = 1
    neuron: int | None = None
    patch: Patch | None = None
    surrogate: nn.Module | None = transient()

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "patch", frozen(self.patch))  # JSON lists → tuples
        if self.size < 1 or self.margin < 0 or self.steps < 1 or self.lr <= 0:
            raise SettingsError(f"trojannn needs size ≥ 1, margin ≥ 0, steps ≥ 1 and lr > 0, "
                                f"got {self.size}, {self.margin}, {self.steps}, {self.lr}")
        if self.patch is not None:
            try:
                shape = tuple(torch.tensor(self.patch).shape)
            except (TypeError, ValueError):
                shape = ("ragged",)
            if len(shape) != 3 or shape[1:] != (self.size, self.size):
                raise SettingsError(f"trojannn patch must be nested lists C×{self.size}×"
                                    f"{self.size} of numbers, got shape {shape}")

    def check(self, num_classes: int, image_shape: tuple[int, ...]) -> None:
        super().check(num_classes, image_shape)
        check_corner_fits(self.size, self.margin, image_shape, "trojannn mask")

    def box(self, height: int, width: int) -> tuple[slice, slice]:
        """Rows and columns of the mask (bottom-right)."""
        return corner_box(height, width, self.size, self.margin)

    def stamp(self, x: torch.Tensor, patch: torch.Tensor) -> torch.Tensor:
        """x with the (C, size, size) patch inside the mask; differentiable in the patch."""
        height, width = x.shape[-2:]
        rows, cols = self.box(height, width)
        inside = torch.zeros_like(x[:1])
        inside[..., rows, cols] = 1
        # Padding (not slice assignment) keeps the patch in the autograd graph.
        canvas = F.pad(patch, (cols.start, width - cols.stop, rows.start, height - rows.stop))
        return x * (1 - inside) + canvas

    def trigger(self, x: torch.Tensor) -> torch.Tensor:
        if self.patch is None:
            raise SettingsError("trojannn's trigger is learned: call attack.prepare(data, seed) "
                                "first, or rebuild it from a record that holds the patch")
        patch = torch.tensor(self.patch).to(x)
        if patch.shape[0] != x.shape[1]:
            raise SettingsError(f"trojannn patch has {patch.shape[0]} channels, images have "
                                f"{x.shape[1]}")
        return self.stamp(x, patch)

    def prepare(self, data: ImageData, seed: int) -> TrojanNN:
        """A copy with the chosen neuron and the learned patch (and the surrogate used)."""
        if self.patch is not None:
            return self
        model = train_surrogate(data, seed, self.surrogate_samples, self.surrogate_epochs)
        channels, height, width = data.shape
        neuron = self.pick_neuron(model, height, width)
        generator = torch.Generator().manual_seed(self.patch_seed)
        start = torch.rand(channels, self.size, self.size, generator=generator)
        batch = torch.randperm(len(data), generator=generator)[:OPTIMISE_ON]
        patch = self.optimise(model, neuron, to_pixels(data.images[batch]), start)
        rounded = frozen(patch.double().round(decimals=6).tolist())
        return replace(self, neuron=neuron, patch=rounded, surrogate=model)

    def pick_neuron(self, model: nn.Module, height: int, width: int) -> int:
        """The hidden unit with the largest summed |weight| from feature cells under the mask."""
        hidden = penultimate_linear(model)
        cells = mask_cells(self.box(height, width), height, width)
        weights = hidden.weight.detach().abs().view(hidden.out_features, -1, *cells.shape)
        return int((weights * cells).sum(dim=(1, 2, 3)).argmax())

    def optimise(self, model: nn.Module, neuron: int, images: torch.Tensor,
                 start: torch.Tensor) -> torch.Tensor:
        """Gradient ascent on the neuron's mean pre-activation over stamped images."""
        features = nn.Sequential(*list(model)[:list(model).index(penultimate_linear(model)) + 1])
        patch = start.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([patch], lr=self.lr)
        for _ in range(self.steps):
            activation = features(self.stamp(images, patch))[:, neuron].mean()
            optimizer.zero_grad()
            (-activation).backward()
            optimizer.step()
            with torch.no_grad():
                patch.clamp_(0, 1)  # projected ascent: pixels stay valid
        return patch.detach()


def penultimate_linear(model: nn.Module) -> nn.Linear:
    """The hidden Linear layer before the classifier of the surrogate CNN."""
    return [m for m in model if isinstance(m, nn.Linear)][-2]


def mask_cells(box: tuple[slice, slice], height: int, width: int) -> torch.Tensor:
    """(H/4, W/4) indicator of the cells of the flattened feature map that hold a masked
    pixel: the surrogate CNN pools twice by 2, so pixel (r, c) lands in cell (r // 4, c // 4)."""
    rows, cols = box
    cells = torch.zeros(height // 4, width // 4)
    # Slices past the end are clipped, as the pooling drops a trailing odd row or column.
    cells[rows.start // 4:(rows.stop - 1) // 4 + 1, cols.start // 4:(cols.stop - 1) // 4 + 1] = 1
    return cells
