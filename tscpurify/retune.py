"""Post-purification robustness: the re-tuning attack (RA) as an evaluation.

Min, Qin, Zhang, Shen & Cheng, "Uncovering, Explaining, and Mitigating the Superficial Safety of
Backdoor Defense", NeurIPS 2024, https://arxiv.org/abs/2410.09838, show that most purified
models with a low ASR get their backdoor back after a short fine-tuning on a small set that
holds a few poisoned samples, while a model that never learned the backdoor does not. This
module measures that: it fine-tunes a copy of a model on such a set and reports ACC and ASR
(as `evaluation.evaluate` defines them) after given epochs. It knows the attack, so it is an
evaluation and never part of a defense. The floor to compare against is a model trained
without poison and re-tuned the same way; the caller provides it (any model works here).

Our settings, fixed in advance and scaled to our Fashion-MNIST (60k train / 10k test):
- 1,000 training images drawn at random with a seed, 50 of them (5%) triggered and relabelled
  to the target. Min et al.'s code (AISafety-HKUST/stable_backdoor_purification,
  fine_tune/ft_poison.py and its README) draws `split_ratio` = 2% of CIFAR-10's 50k training
  images, i.e. also 1,000, at random, and overwrites `poison_num` of them with poisoned
  training samples (5 in the README's command). We keep their 1,000 images and use more
  poison, 50, so that re-learning shows within our few epochs on our small models; the
  clean-model floor, measured the same way, says how much of it any model would learn.
- SGD, lr 0.01, momentum 0.9, no weight decay, constant lr, plain cross-entropy: as their
  code. Batch 64 (theirs: 128) gives ~16 steps per epoch instead of 8. No augmentation (their
  clean samples get BackdoorBench's random crop and flip, their poisoned ones none).
- ACC/ASR after epochs 1, 2 and 5 (their command runs 5 epochs and measures at the end). One
  5-epoch run measured at those checkpoints: with a constant lr, "after 2 epochs" of a 5-epoch
  run is exactly a 2-epoch run, so the checkpoints stand for separate runs.
- The model is in train mode while re-tuned (BatchNorm statistics update, as in any
  fine-tuning) and in eval mode when measured.

The poisoned samples are drawn among the attack's victims (the inputs ASR counts), triggered
with `attack.trigger` and labelled with `attack.relabel`. For clean-label attacks (SIG, LC)
this makes a dirty-label poison: it teaches the same trigger → target association that ASR
measures, which is what re-activation needs; LC's adversarial perturbation is not applied.
Pass the attack as the run folder records it (`runs.load_run`): learned triggers (TrojanNN,
Input-Aware) must be fitted already.

Example:
    profile = retune_profile(purified, train, test, attack, seed=0)
    profile["asr"]   # ASR after epochs 1, 2 and 5, e.g. [12.0, 47.5, 93.1]
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .attacks.base import Attack, to_pixels, to_uint8
from .data.images import ImageData
from .errors import DataError, SettingsError
from .evaluation import evaluate
from .seeding import derive_seed
from .training import device_of

# A floor (the model trained without poison) at this ASR or above after its first re-tune epoch
# learnt the trigger from the poisoned images alone: the re-tune then cannot tell a dormant
# backdoor from none (a Blended trigger does at 50 of 1,000: docs/deep-purification.md).
UNINFORMATIVE_FLOOR = 90.0


def uninformative_floor(floor_asr: list[float]) -> bool:
    """Whether a floor's re-tune ASR (per checkpoint epoch) says the check cannot separate."""
    return bool(floor_asr) and floor_asr[0] >= UNINFORMATIVE_FLOOR


@dataclass(frozen=True)
class RetuneSettings:
    images: int = field(default=1000, metadata={
        "help": "re-tuning images, drawn at random from the training split (Min et al.'s code: "
                "2% of CIFAR-10, also 1,000)"})
    poisoned: int = field(default=50, metadata={
        "help": "of those, images triggered and relabelled to the target, drawn among the "
                "attack's victims (Min et al.'s README: 5)"})
    lr: float = field(default=0.01, metadata={"help": "SGD learning rate, constant"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    weight_decay: float = field(default=0.0, metadata={"help": "SGD weight decay"})
    batch_size: int = field(default=64, metadata={"help": "mini-batch size"})
    epochs: tuple[int, ...] = field(default=(1, 2, 5), metadata={
        "help": "epochs after which ACC and ASR are measured, increasing; one run lasts the "
                "last of them"})

    def __post_init__(self) -> None:
        # A JSON record gives the checkpoints back as a list; keep the dataclass hashable.
        if isinstance(self.epochs, list):
            object.__setattr__(self, "epochs", tuple(self.epochs))
        epochs = self.epochs
        if not isinstance(epochs, tuple) or not epochs or not all(
                isinstance(e, int) and not isinstance(e, bool) for e in epochs):
            raise SettingsError(f"retune epochs must be a non-empty tuple of integers, "
                                f"got {epochs!r}")
        if epochs[0] < 1 or any(b <= a for a, b in zip(epochs, epochs[1:], strict=False)):
            raise SettingsError(f"retune epochs must be positive and strictly increasing, "
                                f"got {epochs}")
        if self.images < 1 or not 0 <= self.poisoned <= self.images:
            raise SettingsError(f"retuning needs images ≥ 1 and 0 ≤ poisoned ≤ images, got "
                                f"images={self.images}, poisoned={self.poisoned}")
        if self.lr <= 0 or not 0 <= self.momentum < 1 or self.weight_decay < 0 \
                or self.batch_size < 1:
            raise SettingsError(f"retuning needs lr > 0, 0 ≤ momentum < 1, weight_decay ≥ 0 "
                                f"and batch_size ≥ 1; got lr={self.lr}, momentum="
                                f"{self.momentum}, weight_decay={self.weight_decay}, "
                                f"batch_size={self.batch_size}")

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (epochs as a list, so a record compares equal after a round trip)."""
        return {**asdict(self), "epochs": list(self.epochs)}


def _draw(labels: torch.Tensor, attack: Attack, settings: RetuneSettings, seed: int
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Training indices of the re-tuning set, and a mask over them of the ones to poison."""
    if settings.images > len(labels):
        raise DataError(f"the re-tuning set needs {settings.images} images, the training split "
                        f"has {len(labels)}")
    # Separate derived seeds: changing `poisoned` does not change which images are drawn.
    draw = torch.Generator().manual_seed(derive_seed(seed, "retune", "draw"))
    indices = torch.randperm(len(labels), generator=draw)[:settings.images].sort().values
    candidates = attack.victims(labels[indices]).nonzero().flatten()
    if settings.poisoned > len(candidates):
        raise DataError(f"{settings.poisoned} poisoned images asked for, but only "
                        f"{len(candidates)} of the {settings.images} drawn images are victims "
                        f"of the attack (not of target class {attack.target}); lower "
                        f"poisoned or raise images")
    pick = torch.Generator().manual_seed(derive_seed(seed, "retune", "poison"))
    chosen = candidates[torch.randperm(len(candidates), generator=pick)[:settings.poisoned]]
    poison = torch.zeros(len(indices), dtype=torch.bool)
    poison[chosen] = True
    return indices, poison


def retune_set(train: ImageData, attack: Attack, settings: RetuneSettings = RetuneSettings(),
               seed: int = 0) -> ImageData:
    """The re-tuning set: `settings.images` training images drawn with `seed`, of which
    `settings.poisoned`, drawn among the attack's victims, carry the trigger and the label
    `attack.relabel` gives them; the others are untouched. Sorted by training index."""
    attack.check(train.num_classes, train.shape)
    indices, poison = _draw(train.labels, attack, settings, seed)
    data = train.subset(indices)
    images, labels = data.images.clone(), data.labels.clone()
    if poison.any():
        # Through [0, 1] pixels and back to uint8, as the attack's own poisoning stores them.
        images[poison] = to_uint8(attack.trigger(to_pixels(images[poison])))
        labels[poison] = attack.relabel(labels[poison], train.num_classes)
    return ImageData(images, labels, train.classes)


def retune_profile(model: nn.Module, train: ImageData, test: ImageData, attack: Attack,
                   settings: RetuneSettings = RetuneSettings(), seed: int = 0,
                   device: str | torch.device | None = None, progress: bool = False
                   ) -> dict[str, Any]:
    """Fine-tune a copy of `model` on `retune_set(train, attack, settings, seed)` and measure
    ACC, ASR and RA on `test` after each of `settings.epochs`. `model` is never modified.

    Deterministic for a seed: the set, the shuffle and any randomness in the model (dropout)
    come from seeds derived from `seed`; the caller's global RNG is neither read nor advanced.
    Returns {"epochs", "acc", "asr", "ra", "images", "poisoned", "steps", "seconds", "seed",
    "settings"}, JSON-ready; acc/asr/ra are percentages, one per checkpoint.
    """
    began = time.perf_counter()
    net = copy.deepcopy(model)
    if device is not None:
        net.to(device)
    where = device_of(net)
    data = retune_set(train, attack, settings, seed)
    shuffle = torch.Generator().manual_seed(derive_seed(seed, "retune", "shuffle"))
    loader = DataLoader(data.tensor_dataset(), batch_size=settings.batch_size, shuffle=True,
                        generator=shuffle)
    optimizer = torch.optim.SGD(net.parameters(), lr=settings.lr, momentum=settings.momentum,
                                weight_decay=settings.weight_decay)
    checkpoints = set(settings.epochs)
    results: dict[str, list[float]] = {"acc": [], "asr": [], "ra": []}
    steps = 0
    # Dropout and other in-model randomness draw from the global generator: fork it, so the
    # numbers do not depend on the caller's RNG state and the caller's state is left as it was.
    with torch.random.fork_rng(devices=[] if where.type != "cuda" else None):
        torch.manual_seed(derive_seed(seed, "retune", "train"))
        for epoch in tqdm(range(1, settings.epochs[-1] + 1), desc="retune",
                          disable=not progress, leave=False):
            net.train()
            for x, y in loader:
                loss = F.cross_entropy(net(x.to(where)), y.to(where))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                steps += 1
            if epoch in checkpoints:
                metrics = evaluate(net, test, attack)  # eval mode inside, restored after
                results["acc"].append(metrics.acc)
                results["asr"].append(metrics.asr)
                results["ra"].append(metrics.ra)
    return {"epochs": list(settings.epochs), **results, "images": len(data),
            "poisoned": settings.poisoned, "steps": steps,
            "seconds": time.perf_counter() - began, "seed": seed,
            "settings": settings.as_dict()}



def retune_profiles(models: dict[str, nn.Module | None], train: ImageData, test: ImageData,
                    attack: Attack, settings: RetuneSettings = RetuneSettings(), seed: int = 0,
                    progress: bool = False) -> dict[str, dict[str, Any]]:
    """`retune_profile` of each named model (None entries skipped), all with one seed: the same
    images, poison and shuffles, so a purified model and its floor are comparable."""
    return {name: retune_profile(model, train, test, attack, settings, seed=seed,
                                 progress=progress)
            for name, model in models.items() if model is not None}
