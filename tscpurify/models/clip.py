"""A small CLIP: an image encoder and a text encoder trained to agree on (image, caption) pairs.

Radford et al., "Learning Transferable Visual Models From Natural Language Supervision",
ICML 2021, https://arxiv.org/abs/2103.00020. Adapted to a CPU and to captions made from class
names (`tscpurify.ssl.captions`): the image encoder is the SimCLR encoder's trunk (the small CNN
or ResNet-18, `models.encoder`) plus a linear projection, the text encoder a word-level
embedding, a tiny pre-norm transformer (0 layers = a bag of words) mean-pooled over the tokens,
and a linear projection; a learnable logit scale starts at 1/0.07 and is capped at 100, as in
CLIP.

The layout follows open_clip, so code written against one serves the other: `model.visual`
maps images to image features, `encode_image(x)` and `encode_text(ids)` return unnormalised
features, `logit_scale` is the logarithm of the multiplier, and `forward(images, ids)` returns
(normalised image features, normalised text features, multiplier). `model.visual` is a plain
module call (trunk → projection), so `derive_spec` traces it like any classifier, and the
projection, its output, is never permuted.

The tokenizer is a fixed word-level vocabulary stored in the model's own arguments (a list of
words, JSON in the sidecar), so a saved model rebuilds it without any pickle.

Example:
    tokenizer = Tokenizer.from_texts(captions)
    model = create_model("clip", vocab=list(tokenizer.vocab), width=16)
    image_features, text_features, scale = model(images, tokenizer(["a photo of a bag"] * n))
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..errors import DataError, SettingsError
from .encoder import CNNTrunk, ResNetTrunk
from .registered import MODELS

PAD, UNKNOWN, END = "<pad>", "<unk>", "<end>"
SPECIALS = (PAD, UNKNOWN, END)
# CLIP's initial temperature 0.07 and its cap on the multiplier: beyond 100 training turns
# unstable (Radford et al., section 2.5).
INITIAL_LOGIT_SCALE = math.log(1 / 0.07)
MAX_LOGIT_SCALE = math.log(100)
_WORD = re.compile(r"[a-z0-9]+")


@dataclass(frozen=True)
class Tokenizer:
    """Words → ids over a fixed vocabulary; `tokenizer(texts)` gives (N, context_length) ids.

    A text is lower-cased and split into runs of letters and digits ("T-shirt/top" → t, shirt,
    top), unknown words become `<unk>`, and every text ends with `<end>`, so no row is empty
    (an all-padding row would have nothing to pool). Rows are padded with `<pad>` (id 0) and
    truncated to `context_length` tokens, `<end>` included.

    Args:
        vocab: the words, specials first: ("<pad>", "<unk>", "<end>", ...).
        context_length: tokens per row (captions here have at most 8 words).
    """

    vocab: tuple[str, ...]
    context_length: int = 16

    def __post_init__(self) -> None:
        object.__setattr__(self, "vocab", tuple(self.vocab))  # a JSON list in, a tuple kept
        if self.vocab[:len(SPECIALS)] != SPECIALS:
            raise SettingsError(f"a vocabulary must start with {SPECIALS}, got "
                                f"{self.vocab[:len(SPECIALS)]}")
        if len(set(self.vocab)) != len(self.vocab):
            raise SettingsError("the vocabulary lists a word twice")
        if self.context_length < 2:
            raise SettingsError(f"context_length must be ≥ 2 (a word and <end>), got "
                                f"{self.context_length}")

    @staticmethod
    def words(text: str) -> list[str]:
        return _WORD.findall(text.lower())

    @classmethod
    def from_texts(cls, texts: Iterable[str], context_length: int = 16) -> Tokenizer:
        """The vocabulary of `texts`: specials, then every word in order of first appearance."""
        seen = dict.fromkeys(word for text in texts for word in cls.words(text))
        return cls((*SPECIALS, *seen), context_length)

    @property
    def ids(self) -> dict[str, int]:
        return {word: i for i, word in enumerate(self.vocab)}

    def encode(self, texts: Sequence[str]) -> Tensor:
        """(N, context_length) int64 token ids."""
        if isinstance(texts, str):
            raise DataError("encode takes a list of texts, not one string")
        ids, unknown, end = self.ids, SPECIALS.index(UNKNOWN), SPECIALS.index(END)
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            tokens = [ids.get(w, unknown) for w in self.words(text)][:self.context_length - 1]
            out[row, :len(tokens) + 1] = torch.tensor([*tokens, end])
        return out

    __call__ = encode

    def decode(self, ids: Tensor) -> list[str]:
        """Token ids back to texts of known words (specials dropped), joined by spaces."""
        return [" ".join(self.vocab[i] for i in row.tolist() if i >= len(SPECIALS))
                for row in ids]


class ImageEncoder(nn.Module):
    """Trunk features → linear projection (no bias, as in CLIP) into the shared embedding."""

    def __init__(self, trunk: nn.Module, embed_dim: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.proj = nn.Linear(int(trunk.out_dim), embed_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.trunk(x))


class TextEncoder(nn.Module):
    """Token + position embeddings → `layers` pre-norm transformer layers → LayerNorm → mean
    over the non-padding tokens → linear projection.

    Mean pooling rather than CLIP's end-of-text token: with 0 layers the encoder is then a bag
    of words, which already separates class-name captions.
    """

    def __init__(self, vocab_size: int, context_length: int, width: int, layers: int,
                 heads: int, embed_dim: int) -> None:
        super().__init__()
        self.token = nn.Embedding(vocab_size, width, padding_idx=0)
        self.position = nn.Parameter(torch.randn(context_length, width) * 0.01)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True,
                                       norm_first=True) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim, bias=False)

    def forward(self, ids: Tensor) -> Tensor:
        if ids.dim() != 2 or ids.shape[1] > len(self.position):
            raise DataError(f"token ids must be (N, L) with L ≤ {len(self.position)}, got "
                            f"{tuple(ids.shape)}")
        padding = ids == 0
        x = self.token(ids) + self.position[:ids.shape[1]]
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=padding)
        keep = (~padding).unsqueeze(-1).to(x.dtype)
        pooled = (self.norm(x) * keep).sum(1) / keep.sum(1).clamp(min=1)
        return self.proj(pooled)


class CLIP(nn.Module):
    """Image encoder `visual`, text encoder `text`, learnable `logit_scale` (a logarithm).

    `config` holds the arguments that built it, the sidecar's `kwargs`:
        save_model(model, folder, {"arch": "clip", "kwargs": model.config})
    """

    def __init__(self, visual: nn.Module, text: nn.Module, tokenizer: Tokenizer,
                 config: dict[str, Any]) -> None:
        super().__init__()
        self.visual, self.text, self.tokenizer = visual, text, tokenizer
        self.logit_scale = nn.Parameter(torch.tensor(INITIAL_LOGIT_SCALE))
        self.config = config

    def encode_image(self, images: Tensor) -> Tensor:
        return self.visual(images)

    def encode_text(self, ids: Tensor) -> Tensor:
        return self.text(ids)

    def forward(self, images: Tensor, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return (F.normalize(self.encode_image(images), dim=-1),
                F.normalize(self.encode_text(ids), dim=-1), logit_multiplier(self))


def logit_multiplier(model: nn.Module) -> Tensor:
    """exp(model.logit_scale) capped at 100, as in CLIP; any model with a `logit_scale`
    logarithm (this CLIP, open_clip's CLIP)."""
    return model.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()


@MODELS.register("clip")
def clip(vocab: Sequence[str], trunk: str = "cnn", in_channels: int = 1, width: int = 16,
         embed_dim: int = 64, text_width: int = 64, text_layers: int = 1, text_heads: int = 4,
         context_length: int = 16, mean: Sequence[float] | None = None,
         std: Sequence[float] | None = None) -> CLIP:
    """A small CLIP. `vocab` is the tokenizer's word list (`Tokenizer.from_texts(...).vocab`);
    `trunk`, `in_channels`, `width`, `mean` and `std` are the SimCLR encoder's; the text
    encoder has `text_layers` transformer layers of `text_width` with `text_heads` heads.

    At the defaults (width 16, text width 64, one layer) it holds about 75,000 parameters.
    """
    tokenizer = Tokenizer(tuple(vocab), context_length)
    if min(width, embed_dim, text_width, text_heads) < 1 or text_layers < 0:
        raise SettingsError(f"clip needs width, embed_dim, text_width, text_heads ≥ 1 and "
                            f"text_layers ≥ 0; got {width}, {embed_dim}, {text_width}, "
                            f"{text_heads}, {text_layers}")
    if text_width % text_heads:
        raise SettingsError(f"text_width {text_width} is not divisible by text_heads "
                            f"{text_heads}")
    trunks = {"cnn": CNNTrunk, "resnet18": ResNetTrunk}
    if trunk not in trunks:
        raise SettingsError(f"unknown clip trunk {trunk!r}; choices: {', '.join(trunks)}")
    visual = ImageEncoder(trunks[trunk](in_channels, width, mean, std), embed_dim)
    text = TextEncoder(len(tokenizer.vocab), context_length, text_width, text_layers,
                       text_heads, embed_dim)
    config = {"vocab": list(tokenizer.vocab), "trunk": trunk, "in_channels": in_channels,
              "width": width, "embed_dim": embed_dim, "text_width": text_width,
              "text_layers": text_layers, "text_heads": text_heads,
              "context_length": context_length,
              "mean": None if mean is None else list(mean),
              "std": None if std is None else list(std)}
    return CLIP(visual, text, tokenizer, config)
