"""Distil's defining properties: the student starts from a fresh initialisation, learns the
suspect's outputs without ever reading a label, and does not learn a trigger that clean images
never show."""

import copy

import torch
from torch.utils.data import DataLoader, TensorDataset

from tscpurify.defenses import defend
from tscpurify.training import TrainSettings, train_classifier

from .conftest import CLASSES


def test_the_student_starts_fresh_and_seeded(trained_cnn, loader):
    result = defend("distill", trained_cnn, loader, progress=False, seed=5, epochs=0)
    again = defend("distill", trained_cnn, loader, progress=False, seed=5, epochs=0)
    suspect = trained_cnn.state_dict()
    for key, value in result.model.state_dict().items():
        assert torch.equal(value, again.model.state_dict()[key]), key
        if key.endswith("weight") and value.dim() > 1:
            assert not torch.equal(value, suspect[key]), key


def test_labels_are_never_read(trained_cnn, band_data):
    """Wrong labels, or none at all, give the very same student."""
    images, labels = band_data.tensors

    def run(dataset):
        loader = DataLoader(dataset, batch_size=32, shuffle=True,
                            generator=torch.Generator().manual_seed(1))
        return defend("distill", trained_cnn, loader, progress=False, seed=0, epochs=2)

    right = run(band_data).model.state_dict()
    wrong = run(TensorDataset(images, (labels + 1) % CLASSES)).model.state_dict()
    bare = run(TensorDataset(images)).model.state_dict()
    assert all(torch.equal(right[k], wrong[k]) and torch.equal(right[k], bare[k]) for k in right)


def with_trigger(images):
    triggered = images.clone()
    triggered[:, :, -3:, -3:] = 1.0  # a bright corner, where the band images stay dark
    return triggered


def test_the_student_learns_the_clean_task_but_not_the_trigger(trained_cnn, band_data):
    images, labels = band_data.tensors
    # A suspect that maps the corner trigger to class 0, trained on a quarter of poisoned images.
    poisoned = torch.cat([images, with_trigger(images[:40])])
    targets = torch.cat([labels, torch.zeros(40, dtype=torch.long)])
    suspect = copy.deepcopy(trained_cnn)
    torch.manual_seed(0)
    train_classifier(suspect, DataLoader(TensorDataset(poisoned, targets), batch_size=32,
                                         shuffle=True),
                     TrainSettings(epochs=10, lr=0.05, augment=False), progress=False)
    victims = with_trigger(images[labels != 0])

    def rates(model):
        with torch.no_grad():
            model.eval()
            return ((model(images).argmax(1) == labels).float().mean(),
                    (model(victims).argmax(1) == 0).float().mean())

    acc, asr = rates(suspect)
    assert acc > 0.9 and asr > 0.9  # the backdoor took
    clean = DataLoader(TensorDataset(images), batch_size=32, shuffle=True,
                       generator=torch.Generator().manual_seed(1))
    student = defend("distill", suspect, clean, progress=False, seed=0, epochs=30, mixup=0.0,
                     augment=False).model
    acc, asr = rates(student)
    assert acc > 0.9 and asr < 0.5
