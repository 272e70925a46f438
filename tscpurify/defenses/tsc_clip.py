"""TSC for CLIP: purifying a CLIP's image encoder against its frozen clean text encoder.

TSC (Peng et al., ICML 2025, arXiv 2506.07467), self-supervised variant: the image encoder lies
on the curve and the curve's loss is CLIP's contrastive objective (Radford et al., ICML 2021;
`curve.contrastive.clip_loss`) between the curve's image features and the **frozen clean** text
encoder's features of the captions, with the frozen model's logit scale, so the curve can
neither move the text side nor rescale its way out.

Example:
    purified, report = purify_clip(model, DataLoader(clean_pairs, batch_size=256, shuffle=True))
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..curve.contrastive import Augment, clip_loss
from ..curve.train import LossFn, ModelFn, device_of
from ..data.augment import random_crop_flip
from ..errors import DataError, SettingsError
from ..models.clip import logit_multiplier
from ..report.schema import PurifyReport
from ..ssl.clip import image_text
from .tsc import PRESETS, TSCSettings, purify

Evaluate = Callable[[nn.Module], dict[str, float]]


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
