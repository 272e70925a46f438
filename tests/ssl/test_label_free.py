"""The purification path never reads a label: the clean data holds none, and every batch
raises if anything reaches past its images."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from tscpurify import TSCSettings, purify
from tscpurify.curve.contrastive import simclr_loss
from tscpurify.data.views import SimCLRAugment
from tscpurify.defenses.base import loader_has_labels
from tscpurify.models import create_model
from tscpurify.settings import replace_settings

TINY = replace_settings(TSCSettings(), rounds=1, epochs=1, profile_points=0, final_ft_epochs=0)


class LabelRead(Exception):
    """Something tried to read a label from a label-free batch."""


class ImagesOnly(tuple):
    """A 1-tuple batch (images,). Index 0 (or -1) is the images; any index or slice that would
    reach position 1, where labels sit in (images, labels) batches, raises LabelRead."""

    reads = 0

    def __getitem__(self, index):
        if isinstance(index, slice):
            if 1 in range(*index.indices(2)):
                raise LabelRead(f"batch[{index}] reaches past the images")
        elif index not in (0, -1):
            raise LabelRead(f"batch[{index}] asks for a label")
        type(self).reads += 1
        return super().__getitem__(index)


class BareImages(Dataset):
    """Images only: the data set holds no labels at all, and yields 1-tuples."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor]:
        return (self.images[i],)


def guarded_collate(samples: list) -> ImagesOnly:
    if any(len(sample) != 1 for sample in samples):
        raise LabelRead("a sample of the label-free data set has more than the image")
    return ImagesOnly((torch.stack([sample[0] for sample in samples]),))


@pytest.fixture
def encoder_and_loader():
    torch.manual_seed(0)
    model = create_model("simclr", width=4).eval()
    images = torch.rand(32, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    loader = DataLoader(BareImages(images), batch_size=16, shuffle=True,
                        collate_fn=guarded_collate)
    return model, loader


def test_the_guard_catches_label_reads(encoder_and_loader):
    _, loader = encoder_and_loader
    batch = next(iter(loader))
    assert not loader_has_labels(loader) and len(batch) == 1 and batch[0].shape[0] == 16
    for read in (lambda b: b[1], lambda b: b[:2], lambda b: b[-2]):
        with pytest.raises((LabelRead, IndexError)):
            read(batch)
    with pytest.raises(ValueError):
        _, _ = batch  # unpacking (x, y) fails on a 1-tuple


@pytest.mark.parametrize("ft_epochs, profile_points", [(0, 0), (1, 2)])
def test_purify_runs_label_free_end_to_end(encoder_and_loader, ft_epochs, profile_points):
    model, loader = encoder_and_loader
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ImagesOnly.reads = 0
    settings = replace_settings(TSCSettings(), rounds=1, epochs=1, profile_points=profile_points,
                           final_ft_epochs=ft_epochs)
    purified, report = purify(model, loader, settings, progress=False,
                              loss_fn=simclr_loss(SimCLRAugment()))
    x = torch.rand(5, 1, 28, 28)
    assert purified(x).shape == model(x).shape == (5, 64)
    assert ImagesOnly.reads > 0  # the guarded batches were really used
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"purify changed the input's {key}"
    changed = [k for k, v in purified.state_dict().items()
               if v.is_floating_point() and not torch.equal(v, before[k])]
    assert changed
    assert [(s.round, s.stage) for s in report.stages] == [(0, 1), (0, 2)]
    assert torch.isfinite(torch.tensor(report.after["loss"]))
    assert (report.seconds["finetune"] > 0) == (ft_epochs > 0)
