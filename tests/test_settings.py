"""Settings ⇄ flags and overrides, with nested settings (TSCSettings.curve: CurveSettings)."""

import argparse
import dataclasses

import pytest

from tscpurify.curve import CurveSettings
from tscpurify.defenses.mcr import MCRSettings
from tscpurify.defenses.tsc import PRESETS, TSC_CURVE, TSCSettings
from tscpurify.errors import SettingsError
from tscpurify.settings import (
    add_settings_flags,
    overrides_from_args,
    replace_settings,
    settings_from_args,
    validate_settings,
)


def test_a_curve_knob_named_flat_dotted_or_nested_reaches_the_curve():
    flat = replace_settings(TSCSettings(), epochs=60, rounds=2)
    dotted = replace_settings(TSCSettings(), **{"curve.epochs": 60}, rounds=2)
    nested = replace_settings(TSCSettings(), curve={"epochs": 60}, rounds=2)
    instance = replace_settings(TSCSettings(), curve=dataclasses.replace(TSC_CURVE, epochs=60),
                                rounds=2)
    assert flat == dotted == nested == instance
    assert flat.curve == CurveSettings(epochs=60, lr=0.1, cosine_t_max=None)
    assert flat.rounds == 2


def test_flat_names_apply_on_top_of_a_given_curve():
    settings = replace_settings(TSCSettings(), curve=CurveSettings(), lr=0.5)
    assert settings.curve == CurveSettings(lr=0.5)
    assert replace_settings(TSCSettings(), curve={"epochs": 3}, lr=0.5).curve == \
        dataclasses.replace(TSC_CURVE, epochs=3, lr=0.5)


def test_the_paper_preset_is_the_curve_references_defaults():
    written_flat = replace_settings(TSCSettings(), epochs=200, lr=0.02, cosine_t_max=100,
                                    mid_init="linear", ft_epochs=10, ft_lr=1e-4,
                                    final_ft_epochs=0, final_ft_label_smoothing=0.0)
    assert written_flat == PRESETS["paper"]
    assert PRESETS["paper"].curve == CurveSettings()


def test_an_unknown_or_badly_typed_setting_is_named_with_the_nested_ones_listed():
    with pytest.raises(SettingsError, match=r"no setting 'epoch'.*curve\.epochs"):
        replace_settings(TSCSettings(), epoch=3)
    with pytest.raises(SettingsError, match=r"CurveSettings\.lr must be a finite float"):
        replace_settings(TSCSettings(), lr="fast")
    # Finite but past float32 (torch's): a traceback mid-training once, refused now.
    with pytest.raises(SettingsError, match=r"CurveSettings\.lr must be a finite float within"):
        replace_settings(TSCSettings(), lr=1e300)
    with pytest.raises(SettingsError, match=r"TSCSettings\.curve must be CurveSettings"):
        replace_settings(TSCSettings(), curve=3)
    with pytest.raises(SettingsError, match="lr > 0"):  # the curve's own checks still run
        replace_settings(TSCSettings(), lr=0.0)


def test_validation_reaches_into_nested_settings():
    broken = dataclasses.replace(TSCSettings(), curve=object.__new__(CurveSettings))
    object.__setattr__(broken.curve, "__dict__", {**TSC_CURVE.__dict__, "epochs": "many"})
    with pytest.raises(SettingsError, match=r"CurveSettings\.epochs must be int"):
        validate_settings(broken)


def parse(cls, argv, defaults=None):
    parser = argparse.ArgumentParser()
    add_settings_flags(parser, cls, defaults=defaults)
    return parser, parser.parse_args(argv)


def test_nested_flags_have_a_prefixed_name_and_the_short_one():
    _, args = parse(TSCSettings, ["--curve-epochs", "7", "--lr", "0.3", "--rounds", "2"])
    assert overrides_from_args(TSCSettings, args) == {"rounds": 2,
                                                      "curve": {"epochs": 7, "lr": 0.3}}
    settings = settings_from_args(TSCSettings, args)
    assert settings.curve == dataclasses.replace(TSC_CURVE, epochs=7, lr=0.3)
    _, unset = parse(TSCSettings, [])
    assert overrides_from_args(TSCSettings, unset) == {}


def test_nested_flags_show_their_owners_defaults():
    parser, _ = parse(TSCSettings, [])
    text = parser.format_help().split("CurveSettings:")[1]  # the options, not the usage line
    # TSC's curves run 30 epochs at lr 0.1, not CurveSettings' reference 200 at 0.02.
    epochs_help = text[text.index("--curve-epochs"):text.index("--curve-lr")]
    assert "(default: 30)" in epochs_help
    parser, _ = parse(MCRSettings, [])
    text = parser.format_help().split("CurveSettings:")[1]
    assert "(default: 0.02)" in text[text.index("--curve-lr"):text.index("--curve-momentum")]


def test_mcr_shares_the_curve_settings_class():
    settings = replace_settings(MCRSettings(), epochs=5, mid_init="random", lr=0.1)
    assert settings.curve == CurveSettings(epochs=5, lr=0.1, cosine_t_max=None)
    assert settings.at_budget(120, 12).curve.epochs + settings.at_budget(120, 12).ft_epochs == 10
