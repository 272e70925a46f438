"""Captions for a labelled image set, and (image, caption) pairs for CLIP.

A labelled image set has no captions, so each image gets captions made from its class name and
a handful of prompt templates, CLIP's zero-shot recipe (Radford et al., ICML 2021,
arXiv 2103.00020, section 3.1.4) turned into training text. `CaptionedImages` holds each
image's captions as token ids and yields (image, caption ids) pairs, one of its captions drawn
at random per access: what CLIP trains on, and what a defender holding clean image-text pairs
purifies with. The labels are read once, to write the captions, and never yielded.

Example:
    tokenizer = Tokenizer.from_texts(all_captions(data.classes))
    pairs = CaptionedImages.from_data(data, tokenizer)
    loader = DataLoader(pairs, batch_size=256, shuffle=True)      # batches: (images, ids)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..data.images import ImageData
from ..errors import DataError, SettingsError
from ..models.clip import Tokenizer

# A few of CLIP's ImageNet prompts that suit grey 28×28 product photos; "{}" is the class name.
TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a picture of the {}.",
    "a black and white photo of a {}.",
    "a low resolution photo of the {}.",
    "a blurry photo of a {}.",
    "an image of a {}.",
)


def captions(class_name: str, templates: Sequence[str] = TEMPLATES) -> list[str]:
    """Every template filled with one class name, in template order."""
    if not templates or any("{}" not in t for t in templates):
        raise SettingsError(f"templates must be a non-empty list of strings each holding "
                            f"'{{}}', got {list(templates)}")
    return [template.format(class_name) for template in templates]


def all_captions(classes: Sequence[str], templates: Sequence[str] = TEMPLATES) -> list[str]:
    """The captions of every class: the texts a vocabulary is built from."""
    return [text for name in classes for text in captions(name, templates)]


class CaptionedImages(Dataset):
    """(image, caption ids) pairs: image i with one of its K captions, drawn per access.

    Args:
        images: (N, C, H, W) float pixels in [0, 1].
        caption_ids: (N, K, L) token ids, K captions per image (K = 1: a fixed caption).

    The draw uses the global torch RNG, so `seed_everything` fixes it (with loader workers 0).
    """

    def __init__(self, images: Tensor, caption_ids: Tensor) -> None:
        if images.dim() != 4 or not images.is_floating_point():
            raise DataError(f"images must be float (N, C, H, W), got {images.dtype} "
                            f"{tuple(images.shape)}")
        if caption_ids.dim() != 3 or len(caption_ids) != len(images):
            raise DataError(f"caption_ids must be (N, K, L) with N = {len(images)} images, got "
                            f"{tuple(caption_ids.shape)}")
        self.images, self.caption_ids = images, caption_ids

    @classmethod
    def from_data(cls, data: ImageData, tokenizer: Tokenizer,
                  templates: Sequence[str] = TEMPLATES) -> CaptionedImages:
        """Each image captioned with every template filled with its class name."""
        per_class = torch.stack([tokenizer(captions(name, templates)) for name in data.classes])
        # long(): indexing with a uint8 tensor would be read as a boolean mask.
        return cls(data.floats(), per_class[data.labels.long()])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        choices = self.caption_ids[index]
        pick = int(torch.randint(len(choices), ())) if len(choices) > 1 else 0
        return self.images[index], choices[pick]
