"""The small CLIP: captions, a tokenizer that round-trips and rebuilds from the sidecar, an image
encoder whose symmetry traces, and a text encoder that ignores padding."""

from __future__ import annotations

import json

import pytest
import torch

from tscpurify.checkpoint import load_model, save_model
from tscpurify.data import ImageData
from tscpurify.data.images import FASHION_MNIST_CLASSES
from tscpurify.errors import DataError, SettingsError
from tscpurify.models import MODELS, create_model
from tscpurify.models.clip import SPECIALS, Tokenizer
from tscpurify.permutation import derive_spec, max_output_change, random_permutation, verify_spec
from tscpurify.sidecar import Sidecar
from tscpurify.ssl.captions import TEMPLATES, CaptionedImages, all_captions, captions

TOKENIZER = Tokenizer.from_texts(all_captions(FASHION_MNIST_CLASSES))


def tiny_clip(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("clip", vocab=list(TOKENIZER.vocab), width=4, embed_dim=8,
                        text_width=8, text_heads=2, **kwargs).eval()


def test_captions_fill_every_template_in_order():
    assert captions("Bag") == [t.format("Bag") for t in TEMPLATES]
    assert len(all_captions(("a", "b"), ("x {}", "y {}"))) == 4
    with pytest.raises(SettingsError, match="'\\{\\}'"):
        captions("Bag", ["no placeholder"])


def test_every_caption_round_trips_through_the_tokenizer():
    texts = all_captions(FASHION_MNIST_CLASSES)
    ids = TOKENIZER(texts)
    assert ids.shape == (len(texts), 16) and ids.dtype == torch.long
    assert TOKENIZER.decode(ids) == [" ".join(Tokenizer.words(t)) for t in texts]
    assert Tokenizer.words("A photo of a T-shirt/top.") == ["a", "photo", "of", "a", "t", "shirt",
                                                            "top"]
    # Every row: its words, then <end>, then padding.
    end = SPECIALS.index("<end>")
    for text, row in zip(texts, ids, strict=True):
        n = len(Tokenizer.words(text))
        assert row[n] == end and (row[:n] >= len(SPECIALS)).all() and (row[n + 1:] == 0).all()


def test_unknown_words_and_long_texts():
    row = TOKENIZER(["a zebra bag"])[0]
    assert row[1] == SPECIALS.index("<unk>") and TOKENIZER.decode(row[None]) == ["a bag"]
    short = Tokenizer(TOKENIZER.vocab, context_length=4)
    long = short(["a photo of a bag in a box"])[0]
    assert long.tolist() == [*TOKENIZER(["a photo of"])[0, :3].tolist(), SPECIALS.index("<end>")]
    with pytest.raises(DataError, match="list of texts"):
        TOKENIZER("a bag")


def test_a_vocabulary_must_start_with_the_specials_and_be_unique():
    with pytest.raises(SettingsError, match="start with"):
        Tokenizer(("a", "b"))
    with pytest.raises(SettingsError, match="twice"):
        Tokenizer((*SPECIALS, "a", "a"))


def test_a_saved_clip_rebuilds_its_tokenizer_from_the_sidecar(tmp_path):
    model = tiny_clip()
    save_model(model, tmp_path, Sidecar(arch="clip", kwargs=model.config, kind="clip"))
    sidecar = json.loads((tmp_path / "model.json").read_text())
    assert sidecar["kwargs"]["vocab"] == list(TOKENIZER.vocab)  # plain JSON, no pickle
    loaded, _ = load_model(tmp_path)
    assert loaded.tokenizer == model.tokenizer
    x, ids = torch.rand(3, 1, 28, 28), TOKENIZER(all_captions(("Bag",))[:3])
    for got, want in zip(loaded(x, ids), model(x, ids), strict=True):
        assert torch.equal(got, want)


def test_the_image_encoder_traces_and_never_moves_its_projection():
    visual = tiny_clip().visual
    x = torch.rand(4, 1, 28, 28)
    spec = derive_spec(visual, x[:2])
    verify_spec(visual, spec, x, generator=torch.Generator().manual_seed(0))
    moved = {(a.key, a.dim) for g in spec.groups.values() for a in g.params}
    assert ("proj.weight", 1) in moved and ("proj.weight", 0) not in moved
    perm = random_permutation(spec, torch.Generator().manual_seed(1))
    assert max_output_change(visual, spec, perm, x) < 1e-4
    # A half-applied permutation (the last group's producer without its consumer) must break it.
    name, group = list(spec.groups.items())[-1]
    partial = type(spec)({name: type(group)(group.name, group.size, group.params[:1])})
    assert max_output_change(visual, partial, {name: perm[name]}, x) > 1e-3


@pytest.mark.parametrize("layers", [0, 1])
def test_the_text_encoder_ignores_padding(layers):
    model = tiny_clip(text_layers=layers)
    ids = TOKENIZER(["a photo of a bag.", "a picture of the ankle boot."])
    trimmed = ids[:, :8]  # the same texts with fewer padding columns
    assert torch.allclose(model.encode_text(ids), model.encode_text(trimmed), atol=1e-5)
    assert not torch.allclose(model.encode_text(ids)[0], model.encode_text(ids)[1])


def test_clip_arguments_are_checked():
    assert "clip" in MODELS
    with pytest.raises(SettingsError, match="choices: cnn, resnet18"):
        create_model("clip", vocab=list(TOKENIZER.vocab), trunk="vit")
    with pytest.raises(SettingsError, match="divisible"):
        create_model("clip", vocab=list(TOKENIZER.vocab), text_width=10, text_heads=4)
    with pytest.raises(SettingsError, match="vocab"):
        create_model("clip")


def test_captioned_images_pair_each_image_with_one_of_its_class_captions():
    data = ImageData(torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8),
                     torch.tensor([0, 1, 2, 0, 1, 2]), ("Bag", "Coat", "Dress"))
    pairs = CaptionedImages.from_data(data, TOKENIZER)
    assert pairs.caption_ids.shape == (6, len(TEMPLATES), 16)
    torch.manual_seed(0)
    for i in range(6):
        image, ids = pairs[i]
        assert torch.equal(image, data.floats()[i]) and ids.shape == (16,)
        own = TOKENIZER(captions(data.classes[data.labels[i]]))
        assert (own == ids).all(1).any()
    with pytest.raises(DataError, match="caption_ids"):
        CaptionedImages(data.floats(), pairs.caption_ids[:3])
