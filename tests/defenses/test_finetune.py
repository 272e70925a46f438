"""FT's defining properties beyond the contract tests: `reinit` trains from scratch."""

import torch

from tscpurify.defenses import defend
from tscpurify.models import create_model

from .conftest import CLASSES, SIZE


def test_reinit_starts_from_a_fresh_seeded_initialisation(trained_cnn, loader):
    """With no training steps, reinit returns exactly the architecture's fresh initialisation
    (parameters and BatchNorm statistics), the same for the same seed and nothing of the
    suspect weights."""
    result = defend("ft", trained_cnn, loader, progress=False, seed=5, epochs=0, reinit=True)
    again = defend("ft", trained_cnn, loader, progress=False, seed=5, epochs=0, reinit=True)
    other = defend("ft", trained_cnn, loader, progress=False, seed=6, epochs=0, reinit=True)
    state, suspect = result.model.state_dict(), trained_cnn.state_dict()
    fresh = create_model("cnn", num_classes=CLASSES, width=4, image_size=SIZE).state_dict()
    for key, value in state.items():
        assert torch.equal(value, again.model.state_dict()[key]), key
        if "running_mean" in key:
            assert torch.equal(value, fresh[key])  # reset, not the suspect's statistics
        if key.endswith("weight") and value.dim() > 1:
            assert not torch.equal(value, suspect[key]), key
            assert not torch.equal(value, other.model.state_dict()[key]), key


def test_reinit_then_training_learns_the_clean_task(trained_cnn, loader, band_data):
    result = defend("ft", trained_cnn, loader, progress=False, seed=0, epochs=8, lr=0.05,
                    augment=False, reinit=True)
    images, labels = band_data.tensors
    with torch.no_grad():
        accuracy = (result.model.eval()(images).argmax(1) == labels).float().mean()
    assert accuracy > 0.9
