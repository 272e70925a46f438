"""The step budget (defenses/budget.py): every training defense reports the steps it took, they
are the steps its settings planned, and a budget resizes its settings to about that many."""

import math

import pytest
from torch.utils.data import DataLoader

from tscpurify.defenses import DEFENSES, defend
from tscpurify.defenses.budget import at_budget, epochs_for, planned_steps, scale_counts
from tscpurify.errors import SettingsError
from tscpurify.settings import replace_settings

from .test_contract import TINY

TRAINING = [name for name in sorted(TINY)
            if hasattr(DEFENSES.meta[name]["settings"], "planned_steps")]


def test_every_defense_but_the_data_free_one_takes_a_budget():
    assert set(TINY) - set(TRAINING) == {"clp"}


@pytest.mark.parametrize("name", TRAINING)
def test_steps_taken_are_the_steps_planned(name, trained_cnn, band_data):
    loader = DataLoader(band_data, batch_size=32, shuffle=True)
    settings = replace_settings(DEFENSES.meta[name]["settings"](), **TINY[name])
    result = defend(name, trained_cnn, loader, settings, progress=False, seed=0)
    own_batch = getattr(settings, "batch_size", None) or 32  # TSC re-batches to its own size
    assert result.steps == settings.planned_steps(math.ceil(len(band_data) / own_batch)) > 0


@pytest.mark.parametrize("name", TRAINING)
@pytest.mark.parametrize("steps", [100, 2460])
def test_a_budget_resizes_the_default_settings_to_about_that_many_steps(name, steps):
    settings, batches = DEFENSES.meta[name]["settings"](), 12
    resized = at_budget(settings, steps, batches)
    # Within one pass over the clean data per phase the defense has (at most three here).
    assert abs(planned_steps(resized, batches) - steps) <= 3 * batches
    assert at_budget(settings, None, batches) == settings


def test_scaling_keeps_ratios_and_phases():
    assert scale_counts({"a": 10, "b": 20, "c": 0}, {"a": 1, "b": 1, "c": 1}, 60) == {
        "a": 20, "b": 40, "c": 0}
    assert scale_counts({"a": 1, "b": 100}, {"a": 1, "b": 1}, 10) == {"a": 1, "b": 10}
    assert epochs_for(2460, 12) == 205 and epochs_for(1, 12) == 1
    with pytest.raises(SettingsError):
        epochs_for(0, 12)
    assert planned_steps(DEFENSES.meta["clp"]["settings"](), 12) == 0
