"""TSC on a CLIP's image encoder: the input is never touched, the text side stays frozen and
unchanged, and the same helper serves any model with open_clip's interface."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from tscpurify import TSCSettings
from tscpurify.curve.contrastive import clip_loss
from tscpurify.data import ImageData
from tscpurify.defenses.tsc_clip import CLIPView, frozen_text_loss, purify_clip
from tscpurify.errors import DataError, SettingsError
from tscpurify.evaluation.zero_shot import zero_shot_metrics
from tscpurify.models import create_model
from tscpurify.models.clip import Tokenizer, logit_multiplier
from tscpurify.settings import replace_settings
from tscpurify.ssl.captions import CaptionedImages, all_captions

TINY = replace_settings(TSCSettings(), rounds=1, epochs=1, profile_points=0, final_ft_epochs=0)
CLASSES = ("bag", "coat", "dress", "shirt")
TOKENIZER = Tokenizer.from_texts(all_captions(CLASSES))


def random_data(n: int, seed: int) -> ImageData:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=generator)
    return ImageData(images, torch.arange(n) % len(CLASSES), CLASSES)


def pair_loader(n: int = 32) -> DataLoader:
    return DataLoader(CaptionedImages.from_data(random_data(n, 1), TOKENIZER), batch_size=16,
                      shuffle=True)


def tiny_clip() -> nn.Module:
    torch.manual_seed(0)
    return create_model("clip", vocab=list(TOKENIZER.vocab), width=4, embed_dim=8,
                        text_width=8, text_heads=2)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("ft_epochs", [0, 1])
def test_purify_clip_leaves_its_input_alone_and_keeps_the_text_side(ft_epochs):
    model = tiny_clip().train()  # a training flag and gradients that must survive
    before = snapshot(model)
    purified, report = purify_clip(model, pair_loader(), TINY, final_ft_epochs=ft_epochs,
                                   progress=False)
    assert same(snapshot(model), before) and model.training
    assert all(p.requires_grad for p in model.parameters())
    # The result is a new CLIP: its text encoder and logit scale are the input's, bit for bit;
    # only its image encoder moved.
    assert purified is not model and purified.visual is not model.visual
    assert same(snapshot(purified.text), snapshot(model.text))
    assert torch.equal(purified.logit_scale, model.logit_scale)
    assert not same(snapshot(purified.visual), snapshot(model.visual))
    assert purified.tokenizer == model.tokenizer and not purified.training
    assert [(s.round, s.stage) for s in report.stages] == [(0, 1), (0, 2)]
    assert math.isfinite(report.after["loss"])


def test_the_curve_loss_reads_the_frozen_text_encoder_and_trains_only_the_image_side():
    model = tiny_clip()
    frozen = tiny_clip().eval().requires_grad_(False)
    with torch.no_grad():
        frozen.logit_scale.fill_(math.log(20))
    images, ids = next(iter(pair_loader()))
    loss = frozen_text_loss(frozen, augment=None)(model.visual, (images, ids))
    with torch.no_grad():
        expected = clip_loss(model.visual(images), frozen.encode_text(ids), 20.0)
    assert torch.allclose(loss, expected)
    loss.backward()
    assert all(p.grad is not None for p in model.visual.parameters())
    assert all(p.grad is None for p in (*model.text.parameters(), *frozen.parameters()))
    assert model.logit_scale.grad is None


class OpenCLIPLike(nn.Module):
    """open_clip's CLIP interface and nothing more: `visual`, `encode_image(x, normalize)`,
    `encode_text(ids, normalize)` and a `logit_scale` logarithm; no tokenizer, no `config`."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.visual = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3),
                                    nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                    nn.Linear(4, 8))
        self.token_embedding = nn.Embedding(vocab_size, 8)
        self.text_projection = nn.Linear(8, 8)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.visual(image)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.text_projection(self.token_embedding(text).mean(1))
        return F.normalize(features, dim=-1) if normalize else features


def test_a_model_with_open_clips_interface_is_purified_through_duck_typing():
    torch.manual_seed(0)
    model = OpenCLIPLike(len(TOKENIZER.vocab))
    before = snapshot(model)
    test = random_data(16, 2)
    seen = []

    def evaluate(clip):
        seen.append(type(clip))
        return zero_shot_metrics(clip, test, tokenizer=TOKENIZER).as_dict()

    purified, report = purify_clip(model, pair_loader(), TINY, evaluate=evaluate,
                                   progress=False)
    assert same(snapshot(model), before)
    assert isinstance(purified, OpenCLIPLike)
    assert same(snapshot(purified.token_embedding), snapshot(model.token_embedding))
    assert not same(snapshot(purified.visual), snapshot(model.visual))
    assert seen and set(seen) == {CLIPView}
    assert {"loss", "acc", "asr"} <= report.before.keys() <= report.after.keys()


def test_a_view_joins_an_image_encoder_to_a_text_side_without_copying():
    text_source = tiny_clip().eval()
    visual = tiny_clip().visual.eval()
    view = CLIPView(visual, text_source)
    ids = TOKENIZER(["a photo of a bag."])
    assert view.visual is visual and view.tokenizer == text_source.tokenizer
    assert torch.equal(view.encode_text(ids), text_source.encode_text(ids))
    assert torch.equal(logit_multiplier(view), logit_multiplier(text_source))
    # Evaluating the view (eval, then restore) leaves both sides as they were; training the view
    # trains its image encoder only.
    zero_shot_metrics(view, random_data(8, 3))
    assert not visual.training and not text_source.training
    view.train()
    assert visual.training and not text_source.training


def test_models_and_loaders_that_do_not_fit_are_refused():
    with pytest.raises(SettingsError, match="visual, encode_image, encode_text, logit_scale"):
        purify_clip(create_model("cnn", width=4), pair_loader(), TINY)
    labelled = DataLoader(random_data(16, 0).tensor_dataset(), batch_size=8)
    with pytest.raises(DataError, match="caption ids"):
        purify_clip(tiny_clip(), labelled, TINY)
    with pytest.raises(DataError, match="no batches"):
        purify_clip(tiny_clip(), [], TINY)

    class ProjectsOutsideVisual(OpenCLIPLike):
        def encode_image(self, image, normalize=False):
            return 2 * self.visual(image)

    with pytest.raises(SettingsError, match="differs from visual"):
        purify_clip(ProjectsOutsideVisual(len(TOKENIZER.vocab)), pair_loader(), TINY)
