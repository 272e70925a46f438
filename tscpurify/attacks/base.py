"""What every data-poisoning attack shares: target relabelling, exact poison counts, records,
and the two hooks `prepare` (fit a learned trigger to the data) and `poison` (build the set)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..data.images import ImageData
from ..errors import SettingsError

log = logging.getLogger(__name__)


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 images → float pixels in [0, 1]."""
    return images.float() / 255


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """Float pixels in [0, 1] → uint8 images (rounded, as a saved image would be)."""
    return (pixels * 255).round().clamp(0, 255).to(torch.uint8)


def frozen(value: Any) -> Any:
    """Nested lists (as JSON gives them back) → nested tuples, so learned tensors stored in a
    dataclass field stay hashable and compare equal after a record round trip."""
    if isinstance(value, (list, tuple)):
        return tuple(frozen(v) for v in value)
    return value


def transient(**kwargs: Any) -> Any:
    """A dataclass field for fitted state that is neither recorded nor compared (a surrogate
    model): it helps poisoning but the trigger never depends on it."""
    return dataclasses.field(default=None, compare=False, repr=False,
                             metadata={"transient": True}, **kwargs)


@dataclass(frozen=True)
class Attack:
    """Base of all attacks. Subclasses implement `trigger` and set `name`.

    Args:
        target: the class triggered inputs go to (all-to-one).
        rate: share of the training set that is poisoned, in (0, 1).
        all_to_all: if True, a triggered input of class y goes to (y + 1) mod C.
    """

    name: ClassVar[str] = "attack"
    # Clean-label attacks poison target-class samples only and keep every training label;
    # the trigger must then teach "trigger → target" without a single wrong label.
    clean_label: ClassVar[bool] = False
    target: int = 0
    rate: float = 0.1
    all_to_all: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.rate < 1:
            raise SettingsError(f"poison rate must be in (0, 1), got {self.rate}")
        if self.target < 0:
            raise SettingsError(f"target class must be ≥ 0, got {self.target}")
        if self.clean_label and self.all_to_all:
            raise SettingsError(f"{self.name} is a clean-label attack: it poisons one target "
                                f"class and cannot be all-to-all")

    def check(self, num_classes: int, image_shape: tuple[int, ...]) -> None:
        """Raise if the attack does not fit a data set (target out of range, wrong shape)."""
        if not self.all_to_all and self.target >= num_classes:
            raise SettingsError(f"target class {self.target} is out of range for "
                                f"{num_classes} classes (0..{num_classes - 1})")

    def trigger(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) pixels in [0, 1] → triggered pixels in [0, 1]; never in place."""
        raise NotImplementedError

    def relabel(self, y: torch.Tensor, num_classes: int) -> torch.Tensor:
        """Where the trigger must send inputs of class y. Used both to label poisoned training
        samples and to score ASR; for clean-label attacks the poisoned samples already belong
        to the target, so relabelling them leaves their labels unchanged."""
        if self.all_to_all:
            return (y + 1) % num_classes
        return torch.full_like(y, self.target)

    def victims(self, y: torch.Tensor) -> torch.Tensor:
        """Boolean mask of samples that count for ASR: those the trigger must move."""
        if self.all_to_all:
            return torch.ones_like(y, dtype=torch.bool)
        return y != self.target

    def choose(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Exactly round(rate·N) poisoned indices, drawn among victims (non-target samples).

        Clean-label attacks draw among target-class samples instead, and poison
        min(round(rate·N), target-class size): the rate stays a share of the whole set, as
        for every attack, and cannot exceed the target class's share (a warning says so).
        """
        pool = labels == self.target if self.clean_label else self.victims(labels)
        candidates = pool.nonzero().flatten()
        count = round(self.rate * len(labels))
        if count > len(candidates) and self.clean_label:
            log.warning("%s: poison rate %s asks for %d samples but the target class has %d; "
                        "poisoning all of them", self.name, self.rate, count, len(candidates))
            count = len(candidates)
        if count > len(candidates):
            raise SettingsError(f"poison rate {self.rate} needs {count} samples but only "
                                f"{len(candidates)} are outside the target class")
        if count == 0:  # a "backdoored" model trained on clean data, recorded as attacked
            raise SettingsError(f"poison rate {self.rate} of {len(labels)} samples poisons none; "
                                f"raise the rate")
        order = torch.randperm(len(candidates), generator=generator)
        return candidates[order[:count]].sort().values

    def prepare(self, data: ImageData, seed: int) -> Attack:
        """The attack fitted to clean training data (a learned trigger, a surrogate model).

        Most attacks need nothing and return self. Fitted attacks return a fitted copy and
        return it unchanged when asked again, so a caller that needs the fitted trigger later
        (record, evaluation) prepares first and hands the result to `poison_dataset`.
        """
        return self

    def poison(self, data: ImageData, generator: torch.Generator) -> tuple[ImageData, torch.Tensor]:
        """The poisoned training set and the backdoor indices: choose → trigger → relabel.

        Attacks that also alter other samples (WaNet's noise mode) or perturb before
        triggering (Label-Consistent) override this; the indices stay the backdoor samples.
        """
        indices = self.choose(data.labels, generator)
        images = data.images.clone()
        labels = data.labels.clone()
        images[indices] = to_uint8(self.trigger(to_pixels(data.images[indices])))
        labels[indices] = self.relabel(labels[indices], data.num_classes)
        return ImageData(images, labels, data.classes), indices

    def record(self) -> dict[str, Any]:
        """JSON-ready description from which `attack_from_record` rebuilds this attack."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if not f.metadata.get("transient")}
        return {"name": self.name, **fields}


def draw_besides(size: int, taken: torch.Tensor, count: int, generator: torch.Generator,
                 what: str) -> torch.Tensor:
    """`count` indices drawn uniformly among the `size` samples not in `taken`: the extra samples
    (WaNet's noise mode, Input-Aware's cross triggers) an attack alters besides its backdoor
    set. Draws nothing from `generator` when count is 0."""
    rest = torch.ones(size, dtype=torch.bool)
    rest[taken] = False
    candidates = rest.nonzero().flatten()
    if count > len(candidates):
        raise SettingsError(f"{what}: {count} samples asked for, but only {len(candidates)} "
                            f"samples are not backdoored; lower rate or cross_ratio")
    if count == 0:
        return candidates[:0]
    return candidates[torch.randperm(len(candidates), generator=generator)[:count]]


def poison_dataset(data: ImageData, attack: Attack, seed: int) -> tuple[ImageData, torch.Tensor]:
    """The poisoned training set and the poisoned indices (recorded, never given to defenses).

    Calls `attack.prepare(data, seed)` first; prepare the attack yourself beforehand if you
    need the fitted attack afterwards (its record, or to evaluate a learned trigger).
    """
    attack.check(data.num_classes, data.shape)
    prepared = attack.prepare(data, seed)
    return prepared.poison(data, torch.Generator().manual_seed(seed))
