"""Zero-shot classification with a CLIP, and its backdoor metrics (ACC, ASR, RA).

Radford et al., ICML 2021, arXiv 2103.00020, section 3.1.4: each class is the average of the
normalised text embeddings of its name in several prompt templates ("a photo of a {}."),
renormalised; an image goes to the class whose embedding is most similar to its own. As in the
TSC paper's CLIP evaluation and Carlini & Terzis's: ACC on clean test images, ASR on triggered
test images whose true class is not the target (classified as the target). The zero-shot model
is an ordinary classifier, so `evaluation.evaluate` scores it like every other model.

Example:
    metrics = zero_shot_metrics(model, test, BadNets(target=0))      # Metrics(acc, asr, ra)
    classifier = zero_shot_classifier(model, test.classes)           # images → class logits
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..attacks.base import Attack
from ..data.images import ImageData
from ..errors import SettingsError
from ..models.clip import logit_multiplier
from ..ssl.captions import TEMPLATES, captions
from ..training import device_of
from .metrics import Metrics, evaluate

Tokenize = Callable[[list[str]], Tensor]


def _tokenizer_of(model: nn.Module, tokenizer: Tokenize | None) -> Tokenize:
    found = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if not callable(found):
        raise SettingsError(f"{type(model).__name__} carries no tokenizer: pass tokenizer= "
                            f"(for open_clip: open_clip.get_tokenizer(model_name))")
    return found


@torch.no_grad()
def class_embeddings(model: nn.Module, classes: Sequence[str],
                     templates: Sequence[str] = TEMPLATES, tokenizer: Tokenize | None = None
                     ) -> Tensor:
    """(C, D) unit vectors: per class, the renormalised mean of its normalised prompt features.

    `tokenizer` defaults to `model.tokenizer`; the text encoder runs in eval mode (restored).
    """
    tokenize = _tokenizer_of(model, tokenizer)
    device, was_training = device_of(model), model.training
    model.eval()
    try:
        rows = []
        for name in classes:
            features = model.encode_text(tokenize(captions(name, templates)).to(device))
            rows.append(F.normalize(F.normalize(features.float(), dim=-1).mean(0), dim=0))
        return torch.stack(rows)
    finally:
        model.train(was_training)


class ZeroShotClassifier(nn.Module):
    """Images → logits over classes: exp(logit_scale) · cos(image features, class embedding)."""

    def __init__(self, model: nn.Module, weights: Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("weights", weights)
        # Start in the model's mode, so that evaluation's "eval, then restore" leaves it as it was.
        self.training = model.training

    def forward(self, images: Tensor) -> Tensor:
        features = F.normalize(self.model.encode_image(images).float(), dim=-1)
        return logit_multiplier(self.model).float() * features @ self.weights.T


def zero_shot_classifier(model: nn.Module, classes: Sequence[str],
                         templates: Sequence[str] = TEMPLATES,
                         tokenizer: Tokenize | None = None) -> ZeroShotClassifier:
    """A classifier over `classes` from the model's text encoder; the model is shared, not
    copied."""
    return ZeroShotClassifier(model, class_embeddings(model, classes, templates, tokenizer))


def zero_shot_metrics(model: nn.Module, test: ImageData, attack: Attack | None = None,
                      templates: Sequence[str] = TEMPLATES, tokenizer: Tokenize | None = None,
                      batch_size: int = 1000) -> Metrics:
    """ACC on `test`, and with an attack ASR and RA on its triggered non-target images (%).

    Classes are `test.classes`, prompted with `templates`; images go to `model.encode_image` as
    [0, 1] pixels (`evaluation.evaluate`'s convention).
    """
    classifier = zero_shot_classifier(model, test.classes, templates, tokenizer)
    return evaluate(classifier, test, attack, batch_size)
