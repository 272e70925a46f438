"""Training a CLIP, zero-shot classification and its metrics, and poisoned image-caption pairs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader

from tscpurify.attacks import attack_from_record
from tscpurify.attacks.badnets import BadNets
from tscpurify.attacks.base import Attack
from tscpurify.attacks.poisoned_pairs import poison_pairs
from tscpurify.data import ImageData
from tscpurify.errors import DataError, SettingsError
from tscpurify.evaluation.zero_shot import class_embeddings, zero_shot_classifier, zero_shot_metrics
from tscpurify.models import create_model
from tscpurify.models.clip import Tokenizer, logit_multiplier
from tscpurify.ssl.captions import CaptionedImages, all_captions, captions
from tscpurify.ssl.clip import CLIPSettings, image_text, train_clip

SHADES = ("black", "grey", "silver", "white")


def shades(n: int, seed: int) -> ImageData:
    """Trivially separable 28×28 images: class c is a flat grey level (c + 0.5)/4, plus noise.

    Brightness survives the trunk's global average pooling, so a tiny CLIP separates it fast.
    """
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % len(SHADES)
    pixels = ((labels.float() + 0.5) / len(SHADES))[:, None, None, None] + 0.05 * torch.randn(
        n, 1, 28, 28, generator=generator)
    return ImageData((pixels.clamp(0, 1) * 255).round().to(torch.uint8), labels, SHADES)


TOKENIZER = Tokenizer.from_texts(all_captions(SHADES))


def tiny_clip() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("clip", vocab=list(TOKENIZER.vocab), width=4, embed_dim=16,
                        text_width=16, text_heads=2)


@pytest.fixture(scope="module")
def trained():
    """A tiny CLIP trained on 128 shade pairs (about 3 s on one thread), and its test set."""
    model = tiny_clip()
    loader = DataLoader(CaptionedImages.from_data(shades(128, 0), TOKENIZER), batch_size=32,
                        shuffle=True)
    history = train_clip(model, loader, epochs=10, lr=5e-3, augment=False, progress=False)
    return model, shades(64, 1), history


def test_the_clip_loss_falls_on_a_tiny_batch():
    model = tiny_clip()
    batch = next(iter(DataLoader(CaptionedImages.from_data(shades(16, 0), TOKENIZER),
                                 batch_size=16)))
    history = train_clip(model, [batch], epochs=8, lr=1e-2, augment=False, progress=False)
    assert history[-1] < 0.8 * history[0]
    assert not model.training


def test_zero_shot_accuracy_is_high_on_separable_images(trained):
    model, test, history = trained
    assert history[-1] < history[0]
    assert zero_shot_metrics(model, test).acc >= 90


def test_zero_shot_logits_are_scaled_cosines_to_averaged_prompts(trained):
    model, test, _ = trained
    weights = class_embeddings(model, SHADES)
    assert torch.allclose(weights.norm(dim=1), torch.ones(len(SHADES)))
    with torch.no_grad():
        prompts = F.normalize(model.encode_text(TOKENIZER(captions("grey"))), dim=1).mean(0)
        assert torch.allclose(weights[1], F.normalize(prompts, dim=0), atol=1e-6)
        x = test.floats()[:5]
        expected = logit_multiplier(model) * F.normalize(model.encode_image(x), dim=1) @ weights.T
        assert torch.allclose(zero_shot_classifier(model, SHADES)(x), expected, atol=1e-5)


@dataclass(frozen=True)
class Blackout(Attack):
    """A trigger that turns every image black: a trained shades CLIP must call it 'black'."""

    name: ClassVar[str] = "blackout"

    def trigger(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def test_asr_counts_triggered_non_target_images_sent_to_the_target(trained):
    model, test, _ = trained
    metrics = zero_shot_metrics(model, test, Blackout(target=0))
    assert metrics.asr == 100 and metrics.ra == 0
    assert zero_shot_metrics(model, test, Blackout(target=3)).asr < 10


def test_the_tokenizer_is_taken_from_the_model_or_must_be_given(trained):
    model, test, _ = trained
    assert zero_shot_metrics(model, test, tokenizer=TOKENIZER) == zero_shot_metrics(model, test)
    bare = torch.nn.Module()
    with pytest.raises(SettingsError, match="tokenizer="):
        class_embeddings(bare, SHADES)


def test_poisoned_pairs_are_exactly_the_chosen_count_and_captioned_as_the_target():
    data = shades(200, 0)
    attack = BadNets(target=2, rate=0.1, size=3)
    poisoned = poison_pairs(data, attack, TOKENIZER, seed=0)
    indices = poisoned.indices
    assert len(indices) == 20 and (data.labels[indices] != 2).all()
    target_captions = TOKENIZER(captions("silver"))
    others = torch.ones(len(data), dtype=torch.bool)
    others[indices] = False
    for i in range(len(data)):
        want = target_captions if not others[i] else TOKENIZER(captions(SHADES[data.labels[i]]))
        assert torch.equal(poisoned.pairs.caption_ids[i], want)
    # Only the poisoned images changed, and by exactly the trigger.
    images = poisoned.pairs.images
    assert torch.equal(images[others], data.floats()[others])
    assert torch.allclose(images[indices], attack.trigger(data.floats()[indices]), atol=1 / 255)
    # The record re-creates the trigger for evaluation; the seed fixes the choice.
    rebuilt = attack_from_record(poisoned.attack.record())
    assert torch.equal(rebuilt.trigger(images[:3]), attack.trigger(images[:3]))
    assert torch.equal(poison_pairs(data, attack, TOKENIZER, seed=0).indices, indices)
    assert not torch.equal(poison_pairs(data, attack, TOKENIZER, seed=1).indices, indices)


def test_batches_must_be_images_and_caption_ids():
    images = torch.rand(4, 1, 28, 28)
    assert image_text((images, TOKENIZER(["a bag"] * 4)))[0] is images
    for bad in ((images, torch.zeros(4, dtype=torch.long)), (images,), images,
                (images, torch.rand(4, 16))):
        with pytest.raises(DataError, match="caption ids"):
            image_text(bad)


def test_clip_settings_are_checked():
    with pytest.raises(SettingsError):
        CLIPSettings(lr=0)
    with pytest.raises(SettingsError, match="train_clip"):
        train_clip(tiny_clip(), [], momentum=0.9)
    with pytest.raises(DataError, match="no batches"):
        train_clip(tiny_clip(), [], epochs=1, progress=False)
