"""Label-free curve objectives for TSC's self-supervised variant (SimCLR and CLIP).

TSC (Peng et al., ICML 2025, arXiv 2506.07467) purifies encoders by training its curves with the
encoder's own pre-training loss instead of cross-entropy, so no label is used anywhere:
- SimCLR (Chen et al., ICML 2020, arXiv 2002.05709): NT-Xent / InfoNCE between the projections
  of two augmented views of each clean image, temperature 0.5 as in the TSC reference;
- CLIP (Radford et al., ICML 2021, arXiv 2103.00020): the symmetric image-text contrastive loss.

`simclr_loss` returns a `LossFn` (`loss_fn(model_fn, batch) -> scalar`) for `tscpurify.purify`
and for `pretrain_simclr`; its batches are bare images and it reads nothing else.

Example:
    purified, report = tscpurify.purify(encoder, bare_image_loader, loss_fn=simclr_loss())
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from ..data.views import SimCLRAugment
from ..errors import DataError, SettingsError
from .train import LossFn, ModelFn, device_of

Augment = Callable[[Tensor], Tensor]


def nt_xent(z1: Tensor, z2: Tensor, temperature: float = 0.5) -> Tensor:
    """NT-Xent (normalised temperature-scaled cross-entropy), SimCLR's loss.

    z1[i] and z2[i] (each (N, D)) are the two views of image i. Each of the 2N embeddings must
    pick its partner out of the 2N − 1 others by cosine similarity / temperature; the result is
    the mean cross-entropy over all 2N of them.
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise DataError(f"nt_xent needs two (N, D) tensors of one shape, got "
                        f"{tuple(z1.shape)} and {tuple(z2.shape)}")
    if temperature <= 0:
        raise SettingsError(f"temperature must be > 0, got {temperature}")
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.T / temperature
    # An embedding is never its own candidate: -inf on the diagonal removes it from the softmax.
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, partner)


def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale: Tensor | float
              ) -> Tensor:
    """CLIP's symmetric contrastive loss over N matching (image, text) pairs.

    Args:
        image_features, text_features: (N, D); row i of each describes the same pair.
            Both are L2-normalised here, as in CLIP.
        logit_scale: the multiplier of the cosine similarities, i.e. CLIP's
            `model.logit_scale.exp()` (about 100 for trained models), not its logarithm.
            In TSC it is the frozen clean model's, so the curve cannot rescale its way out.

    Returns: mean of the image→text and text→image cross-entropies.
    """
    if image_features.shape != text_features.shape or image_features.dim() != 2:
        raise DataError(f"clip_loss needs two (N, D) tensors of one shape, got "
                        f"{tuple(image_features.shape)} and {tuple(text_features.shape)}")
    image = F.normalize(image_features, dim=1)
    text = F.normalize(text_features, dim=1)
    logits = logit_scale * image @ text.T
    target = torch.arange(len(image), device=image.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def bare_images(batch: Any) -> Tensor:
    """The images of a label-free batch: a tensor, or a 1-tuple/list holding one.

    Only element 0 is ever touched, so a label-free loss cannot read a label even by accident;
    a longer tuple is refused rather than silently truncated, because a loader yielding
    (images, labels) means the caller believes labels are in play.
    """
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and len(batch) == 1 and isinstance(batch[0], Tensor):
        return batch[0]
    kind = f"a {type(batch).__name__} of length {len(batch)}" if isinstance(
        batch, (tuple, list)) else f"a {type(batch).__name__}"
    raise DataError(f"a label-free loss needs batches of bare images (a tensor or a 1-tuple), "
                    f"got {kind}; build the loader with ImageData.tensor_dataset(labels=False)")


def simclr_loss(augment: Augment | None = None, temperature: float = 0.5) -> LossFn:
    """SimCLR's objective as a `LossFn`: NT-Xent between model(view 1) and model(view 2).

    Args:
        augment: makes one random view of a batch (default: `SimCLRAugment()`); it is called
            twice per batch, after the move to the model's device.
        temperature: NT-Xent temperature (TSC reference and SimCLR on CIFAR-10: 0.5).

    Both views go through the model in one forward pass, so BatchNorm (in train mode on the
    curve) normalises them with shared statistics, as SimCLR does.
    """
    if temperature <= 0:
        raise SettingsError(f"temperature must be > 0, got {temperature}")
    make_view = augment if augment is not None else SimCLRAugment()

    def loss(model_fn: ModelFn, batch: Any) -> Tensor:
        x = bare_images(batch).to(device_of(model_fn), non_blocking=True)
        z1, z2 = model_fn(torch.cat([make_view(x), make_view(x)])).chunk(2)
        return nt_xent(z1, z2, temperature)

    return loss
