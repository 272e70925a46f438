"""CLIP's contrastive objective on (image, caption) pairs: training a CLIP with it, and purifying
a CLIP's image encoder with TSC against the frozen clean text encoder.

Radford et al., "Learning Transferable Visual Models From Natural Language Supervision",
ICML 2021, https://arxiv.org/abs/2103.00020: the loss is the symmetric cross-entropy over the
scaled cosine similarities of a batch's image and text features (`losses.clip_loss`).
TSC (Peng et al., ICML 2025, arXiv 2506.07467), self-supervised variant: the image encoder lies
on the curve and the curve's loss is that same objective between the curve's image features and
the **frozen clean** text encoder's features of the captions, with the frozen model's logit
scale, so the curve can neither move the text side nor rescale its way out.

Batches are (images, caption token ids): images (N, C, H, W) in [0, 1], ids (N, L) int64, as
`captions.CaptionedImages` yields them. Captions of one class repeat within a batch (several
images share "a photo of a bag."); as in CLIP, each pair's own caption is the positive and the
identical ones count as negatives, which bounds the loss from below but still pulls every image
towards its class's captions.

Example:
    model = create_model("clip", vocab=list(Tokenizer.from_texts(all_captions(classes)).vocab))
    train_clip(model, DataLoader(pairs, batch_size=256, shuffle=True), epochs=10)
    purified, report = purify_clip(model, DataLoader(clean_pairs, batch_size=256, shuffle=True))
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..curve.train import LossFn, ModelFn, device_of
from ..data.augment import random_crop_flip
from ..defenses.tsc import PRESETS, TSCSettings, purify
from ..errors import DataError, SettingsError
from ..models.clip import logit_multiplier
from ..report.schema import PurifyReport
from .losses import Augment, clip_loss
from .simclr import train_on_loss

Evaluate = Callable[[nn.Module], dict[str, float]]


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


# --- purification -----------------------------------------------------------------------------

def check_clip(model: nn.Module) -> None:
    """SettingsError unless `model` looks like a CLIP: a `visual` module, `encode_image`,
    `encode_text` and a `logit_scale` tensor (this package's CLIP and open_clip's alike)."""
    missing = [name for name, ok in (
        ("visual", isinstance(getattr(model, "visual", None), nn.Module)),
        ("encode_image", callable(getattr(model, "encode_image", None))),
        ("encode_text", callable(getattr(model, "encode_text", None))),
        ("logit_scale", isinstance(getattr(model, "logit_scale", None), Tensor)),
    ) if not ok]
    if missing:
        raise SettingsError(f"{type(model).__name__} is not a CLIP model: it lacks "
                            f"{', '.join(missing)} (expected: a `visual` image encoder, "
                            f"encode_image, encode_text and a logit_scale logarithm, as in "
                            f"open_clip)")


def frozen_text_loss(frozen: nn.Module, augment: Augment | None = random_crop_flip) -> LossFn:
    """TSC's CLIP objective as a `LossFn` for curves over the image encoder.

    `clip_loss` between `model_fn(images)` (the curve's image features) and the features the
    frozen text encoder `frozen.encode_text` gives the batch's captions, with the multiplier of
    `frozen`'s logit scale. `frozen` must already be in eval mode with gradients off; it is only
    ever called under `torch.no_grad()`. `augment` (default: random crop and flip, as TSC's
    supervised loss uses) transforms the images after the move to the device; None = none.
    """
    scale = float(logit_multiplier(frozen))

    def loss(model_fn: ModelFn, batch: Any) -> Tensor:
        images, ids = image_text(batch)
        device = device_of(model_fn)
        images = images.to(device, non_blocking=True)
        with torch.no_grad():
            text_features = frozen.encode_text(ids.to(device, non_blocking=True))
        return clip_loss(model_fn(augment(images) if augment else images), text_features, scale)

    return loss


class CLIPView(nn.Module):
    """A CLIP made of another image encoder and a frozen CLIP's text side, without copying
    either: what `purify_clip` hands its `evaluate` callback for each point it measures."""

    def __init__(self, visual: nn.Module, text_source: nn.Module) -> None:
        super().__init__()
        self.visual = visual
        # Not a child module: evaluation code that switches the view to eval mode and back
        # (`evaluation.predict` restores one flag for the whole tree) must not switch the frozen
        # text side into training mode.
        object.__setattr__(self, "text_source", text_source)
        self.tokenizer = getattr(text_source, "tokenizer", None)
        self.training = visual.training

    @property
    def logit_scale(self) -> Tensor:
        return self.text_source.logit_scale

    def encode_image(self, images: Tensor) -> Tensor:
        return self.visual(images)

    def encode_text(self, ids: Tensor) -> Tensor:
        return self.text_source.encode_text(ids)


def purify_clip(model: nn.Module, clean_pairs: DataLoader, settings: TSCSettings | None = None,
                *, augment: Augment | None = random_crop_flip, evaluate: Evaluate | None = None,
                seed: int = 0, progress: bool = True, **overrides: Any
                ) -> tuple[nn.Module, PurifyReport]:
    """Purify a CLIP's image encoder with TSC; returns a new CLIP and the TSC report.

    CLIP purification uses clean image-caption pairs, as in the TSC paper, where the defender
    holds clean image-text data: the loader yields (images, caption token ids) and no class
    label reaches the defense. (Captions made from class names, as `CaptionedImages.from_data`
    makes them, did use labels to be written; real caption data need none.)

    Args:
        model: a CLIP, this package's (`create_model("clip")`) or, through the Python API,
            open_clip's: anything with a `visual` module whose output is `encode_image`'s, an
            `encode_text(ids)` and a `logit_scale` logarithm. It is not modified.
        clean_pairs: a loader of clean (images, caption ids) batches, ids from the model's own
            tokenizer (for open_clip: `open_clip.get_tokenizer(name)`), images already in the
            input form `model.visual` expects.
        settings: TSCSettings (default: the "ssl" preset); `overrides` replace single fields or pass
            `purify`'s other keywords (`resume_dir`, `spec` for encoders fx cannot trace, such
            as open_clip's vision transformers).
        augment: image augmentation inside the curve loss (default random crop and flip; None
            for none, e.g. for inputs that are not [0, 1] pixels).
        evaluate: optional `evaluate(clip) -> metrics` recorded along the curves; it receives a
            `CLIPView` (the point's image encoder with the frozen text encoder), e.g.
            `lambda clip: zero_shot_metrics(clip, test, attack).as_dict()`.

    Returns:
        (a deep copy of `model` whose `visual` is the purified image encoder, in eval mode;
        the PurifyReport of the TSC run on the image encoder)

    Example:
        purified, report = purify_clip(clip, DataLoader(CaptionedImages.from_data(
            clean, clip.tokenizer), batch_size=256, shuffle=True), rounds=1)
    """
    check_clip(model)
    # 1. A frozen clean copy: its text encoder and logit scale are the curve's fixed reference.
    frozen = copy.deepcopy(model).eval().requires_grad_(False)
    first = next(iter(clean_pairs), None)
    if first is None:
        raise DataError("purify_clip needs clean pairs: the loader gave no batches")
    images, _ = image_text(first)
    example = images[:4].to(device_of(frozen.visual))
    with torch.no_grad():
        if not torch.allclose(frozen.visual(example), frozen.encode_image(example), atol=1e-5):
            raise SettingsError(f"{type(model).__name__}.encode_image(x) differs from "
                                f"visual(x): TSC would purify a module that is not the "
                                f"image encoder")
    # 2. TSC on the image encoder alone; `purify` copies it, so `model.visual` stays as it was.
    measure = None if evaluate is None else (lambda visual: evaluate(CLIPView(visual, frozen)))
    visual, report = purify(model.visual, clean_pairs, settings or PRESETS["ssl"],
                            loss_fn=frozen_text_loss(frozen, augment), evaluate=measure,
                            seed=seed, progress=progress, **overrides)
    # 3. A copy of the input whose `visual` is the purified encoder: the memo makes deepcopy
    #    take the purified module in place of copying the old one.
    purified = copy.deepcopy(model, memo={id(model.visual): visual})
    return purified.eval(), report
