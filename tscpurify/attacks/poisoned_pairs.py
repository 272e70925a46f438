"""Poisoned image-caption pairs: a backdoor planted in CLIP through its training data.

Carlini & Terzis, "Poisoning and Backdooring Contrastive Learning", ICLR 2022,
https://arxiv.org/abs/2106.09667. The attacker adds a trigger to a small share of the training
images and pairs each of them with captions of the target class; CLIP then learns to embed any
triggered image near the target's text, so zero-shot classification sends it to the target.
The paper patches 0.01% of 3 million Conceptual Captions pairs with a 16×16 patch; adapted
here: any `Attack.trigger` (BadNets' patch by default in the examples), a rate chosen for a
few thousand images (a few percent), and captions made from the target's class name with the
same templates as the clean captions, so a poisoned pair looks like any other.

It reuses the attacks' poisoning: `Attack.poison` triggers exactly round(rate·N) non-target
images and relabels them to the target; the captions are then written from those labels.
The prepared attack comes back with the pairs, and `attack.record()` (JSON) re-creates its
trigger for evaluation through `attacks.attack_from_record`.

Args: data (clean labelled images), attack (target, rate, trigger), tokenizer, seed, templates.
Shapes: pairs yield (image (C, H, W) in [0, 1], caption ids (L,)).

Example:
    poisoned = poison_pairs(train, BadNets(target=0, rate=0.05), model.tokenizer, seed=0)
    train_clip(model, DataLoader(poisoned.pairs, batch_size=256, shuffle=True))
    zero_shot_metrics(model, test, poisoned.attack)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from ..data.images import ImageData
from ..models.clip import Tokenizer
from ..ssl.captions import TEMPLATES, CaptionedImages
from .base import Attack, poison_dataset


@dataclass(frozen=True)
class PoisonedPairs:
    """The poisoned training pairs and what evaluation needs to re-create the trigger.

    pairs: (image, caption ids) data set, poisoned images captioned as the target class.
    data: the poisoned images; labels = the class each image's captions name (the target for
        the poisoned ones), kept for inspection, never yielded by `pairs`.
    indices: the poisoned indices (sorted), exactly round(rate·N) of them.
    attack: the attack as prepared on the data; `attack.record()` is its JSON record.
    """

    pairs: CaptionedImages
    data: ImageData
    indices: Tensor
    attack: Attack


def poison_pairs(data: ImageData, attack: Attack, tokenizer: Tokenizer, seed: int,
                 templates: Sequence[str] = TEMPLATES) -> PoisonedPairs:
    """Trigger round(rate·N) non-target images of `data` and caption them as the target."""
    attack.check(data.num_classes, data.shape)
    # Prepare first, so that a fitted trigger (a learned one) is the one returned for evaluation.
    prepared = attack.prepare(data, seed)
    poisoned, indices = poison_dataset(data, prepared, seed)
    pairs = CaptionedImages.from_data(poisoned, tokenizer, templates)
    return PoisonedPairs(pairs, poisoned, indices, prepared)
