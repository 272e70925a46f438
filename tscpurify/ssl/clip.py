"""CLIP's contrastive objective on (image, caption) pairs, and training a CLIP with it (the
attack side: a backdoored CLIP is trained here; `defenses/tsc_clip.py` purifies one).

Radford et al., "Learning Transferable Visual Models From Natural Language Supervision",
ICML 2021, https://arxiv.org/abs/2103.00020: the loss is the symmetric cross-entropy over the
scaled cosine similarities of a batch's image and text features (`losses.clip_loss`).

Batches are (images, caption token ids): images (N, C, H, W) in [0, 1], ids (N, L) int64, as
`captions.CaptionedImages` yields them. Captions of one class repeat within a batch (several
images share "a photo of a bag."); as in CLIP, each pair's own caption is the positive and the
identical ones count as negatives, which bounds the loss from below but still pulls every image
towards its class's captions.

Example:
    model = create_model("clip", vocab=list(Tokenizer.from_texts(all_captions(classes)).vocab))
    train_clip(model, DataLoader(pairs, batch_size=256, shuffle=True), epochs=10)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..curve.contrastive import Augment, clip_loss
from ..curve.train import device_of
from ..data.augment import random_crop_flip
from ..errors import DataError, SettingsError
from ..models.clip import logit_multiplier
from .simclr import train_on_loss


def image_text(batch: Any) -> tuple[Tensor, Tensor]:
    """(images, caption ids) of a pair batch; DataError for anything else (e.g. labels)."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        images, ids = batch
        if (isinstance(images, Tensor) and isinstance(ids, Tensor) and images.dim() == 4
                and ids.dim() == 2 and not ids.is_floating_point() and len(ids) == len(images)):
            return images, ids
    shapes = ([tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__ for b in batch]
              if isinstance(batch, (tuple, list)) else type(batch).__name__)
    raise DataError(f"CLIP needs batches of (images (N, C, H, W), caption ids (N, L)), got "
                    f"{shapes}; build the loader from captions.CaptionedImages, not from "
                    f"(images, labels)")


# --- training ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class CLIPSettings:
    epochs: int = field(default=10, metadata={
        "help": "passes over the pairs (10 × 5,000 pairs: about 95 s on one thread at "
                "width 16)"})
    lr: float = field(default=2e-3, metadata={
        "help": "initial AdamW learning rate, annealed to 0 by a cosine over all steps"})
    weight_decay: float = field(default=1e-4, metadata={
        "help": "AdamW weight decay (CLIP: 0.2 at 400M pairs; small data needs little)"})
    augment: bool = field(default=True, metadata={
        "help": "random crop (pad 2) and horizontal flip of the images, as in supervised "
                "training here"})

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.lr <= 0 or self.weight_decay < 0:
            raise SettingsError(f"CLIP training needs epochs ≥ 0, lr > 0 and weight_decay ≥ 0; "
                                f"got {self.epochs}, {self.lr}, {self.weight_decay}")


def clip_pair_loss(augment: Augment | None = None) -> Callable[[nn.Module, Any], Tensor]:
    """CLIP's own training objective on a pair batch: both encoders and the logit scale learn."""
    def loss(model: nn.Module, batch: Any) -> Tensor:
        images, ids = image_text(batch)
        device = device_of(model)
        images = images.to(device, non_blocking=True)
        image_features = model.encode_image(augment(images) if augment else images)
        text_features = model.encode_text(ids.to(device, non_blocking=True))
        return clip_loss(image_features, text_features, logit_multiplier(model))
    return loss


def train_clip(model: nn.Module, pairs: Iterable[Any], settings: CLIPSettings | None = None, *,
               callbacks: Sequence[Callable[[int, nn.Module], None]] = (),
               progress: bool = True, **overrides: Any) -> list[float]:
    """Train a CLIP in place on (images, caption ids) batches; returns each epoch's mean loss.

    Args:
        model: `create_model("clip", ...)` or any model with encode_image, encode_text and a
            `logit_scale` logarithm.
        pairs: a loader of (images, caption ids) batches, e.g. of `CaptionedImages`.
        settings: CLIPSettings (default: CLIPSettings()); `overrides` replace single fields,
            e.g. `train_clip(model, loader, epochs=5)`.
        callbacks: `callback(epoch, model)` after each epoch (zero-shot evaluation, checkpoints).

    AdamW with a cosine from `lr` to 0 over all steps; the multiplier exp(logit_scale) is capped
    at 100 inside the loss, as CLIP clips it. The model ends in eval mode. Randomness (caption
    draws, augmentation, loader order) comes from the global RNG and the loader.
    """
    try:
        settings = dataclasses.replace(settings or CLIPSettings(), **overrides)
    except TypeError as err:
        raise SettingsError(f"train_clip: {err}") from None
    objective = clip_pair_loss(random_crop_flip if settings.augment else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr,
                                  weight_decay=settings.weight_decay)
    return train_on_loss(model, pairs, objective, optimizer, settings.epochs,
                         callbacks=callbacks, progress=progress, desc="clip")
