"""nt_xent and clip_loss against slow loop references; simclr_loss's behaviour on batches."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tscpurify.curve.contrastive import bare_images, clip_loss, nt_xent, simclr_loss
from tscpurify.data.views import SimCLRAugment
from tscpurify.errors import DataError, SettingsError


def nt_xent_loop(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> float:
    """NT-Xent written out from the SimCLR paper's definition, one anchor at a time."""
    z = [v / v.norm() for v in torch.cat([z1, z2])]
    n = len(z1)
    total = 0.0
    for i in range(2 * n):
        partner = (i + n) % (2 * n)
        sims = [float(z[i] @ z[k]) / temperature for k in range(2 * n)]
        denominator = sum(math.exp(s) for k, s in enumerate(sims) if k != i)
        total += -math.log(math.exp(sims[partner]) / denominator)
    return total / (2 * n)


def clip_loop(image: torch.Tensor, text: torch.Tensor, scale: float) -> float:
    image = [v / v.norm() for v in image]
    text = [v / v.norm() for v in text]
    n = len(image)
    logits = [[scale * float(image[i] @ text[j]) for j in range(n)] for i in range(n)]
    image_to_text = sum(-logits[i][i] + math.log(sum(math.exp(v) for v in logits[i]))
                        for i in range(n)) / n
    text_to_image = sum(-logits[j][j] + math.log(sum(math.exp(logits[i][j]) for i in range(n)))
                        for j in range(n)) / n
    return (image_to_text + text_to_image) / 2


@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("n", [1, 2, 7])
def test_nt_xent_equals_the_loop_reference(n, temperature):
    g = torch.Generator().manual_seed(n)
    z1 = torch.randn(n, 5, generator=g, dtype=torch.float64)
    z2 = z1 + 0.5 * torch.randn(n, 5, generator=g, dtype=torch.float64)
    got = float(nt_xent(z1, z2, temperature))
    assert got == pytest.approx(nt_xent_loop(z1, z2, temperature), rel=1e-10, abs=1e-12)


def test_nt_xent_rewards_agreeing_views_and_ignores_scale():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(16, 8, generator=g)
    agree = nt_xent(z, z + 0.01 * torch.randn(16, 8, generator=g))
    disagree = nt_xent(z, z[torch.randperm(16, generator=g)])
    assert agree < disagree - 1.0
    assert float(nt_xent(3 * z, z)) == pytest.approx(float(nt_xent(z, z)), rel=1e-5)


def test_nt_xent_refuses_bad_input():
    with pytest.raises(DataError, match="one shape"):
        nt_xent(torch.zeros(4, 3), torch.zeros(5, 3))
    with pytest.raises(SettingsError, match="temperature"):
        nt_xent(torch.ones(4, 3), torch.ones(4, 3), temperature=0)


@pytest.mark.parametrize("scale", [1.0, 14.3])
def test_clip_loss_equals_the_loop_reference_and_is_symmetric(scale):
    g = torch.Generator().manual_seed(1)
    image = torch.randn(6, 4, generator=g, dtype=torch.float64)
    text = image + torch.randn(6, 4, generator=g, dtype=torch.float64)
    got = float(clip_loss(image, text, scale))
    assert got == pytest.approx(clip_loop(image, text, scale), rel=1e-10)
    assert float(clip_loss(text, image, scale)) == pytest.approx(got, rel=1e-12)
    assert float(clip_loss(image, image, scale)) < got  # matching pairs lower it


def test_bare_images_takes_a_tensor_or_a_one_tuple_and_refuses_labels():
    x = torch.rand(2, 1, 4, 4)
    assert bare_images(x) is x and bare_images((x,)) is x and bare_images([x]) is x
    with pytest.raises(DataError, match="bare images"):
        bare_images((x, torch.tensor([0, 1])))
    with pytest.raises(DataError, match="bare images"):
        bare_images({"images": x})


class FlipInvariant(nn.Module):
    """A fixed random projection of (x + mirrored x): both views of a flip pair agree."""

    def __init__(self, invariant: bool) -> None:
        super().__init__()
        self.invariant = invariant
        self.proj = nn.Linear(28 * 28, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.invariant:
            x = x + x.flip(-1)
        return self.proj(x.flatten(1))


def test_simclr_loss_is_lower_for_a_model_whose_two_views_agree():
    flip_only = SimCLRAugment(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=0.5, jitter=0.0)
    x = torch.rand(32, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    loss = simclr_loss(flip_only)
    torch.manual_seed(0)
    agree, disagree = FlipInvariant(True), FlipInvariant(False)
    disagree.load_state_dict(agree.state_dict())
    with torch.no_grad():
        torch.manual_seed(1)
        agreeing = float(loss(agree, (x,)))
        torch.manual_seed(1)  # the same flips for both models
        disagreeing = float(loss(disagree, (x,)))
        # Identical views: each embedding's partner is itself, the loss floor for these images.
        floor = float(nt_xent(agree(x), agree(x)))
    assert agreeing == pytest.approx(floor, rel=1e-5)
    assert agreeing < disagreeing - 0.5


def test_simclr_loss_refuses_labelled_batches_and_a_bad_temperature():
    x = torch.rand(4, 1, 28, 28)
    with pytest.raises(DataError, match="labels=False"):
        simclr_loss()(FlipInvariant(True), (x, torch.zeros(4, dtype=torch.long)))
    with pytest.raises(SettingsError, match="temperature"):
        simclr_loss(temperature=-1.0)
