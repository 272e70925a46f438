"""concerns: the sentences a purification's numbers must not hide (CLI warnings, report.md)."""

from tscpurify.report.concerns import concerns
from tscpurify.report.markdown import render_markdown
from tscpurify.report.schema import PurifyReport


def report_with(**fields):
    return PurifyReport(tool_version="test", defense="tsc", settings={}, seed=0, **fields)


def profile(asr):
    return {"epochs": [1, 2, 5], "images": 1000, "poisoned": 50, "asr": asr, "acc": asr}


def test_a_run_within_every_bound_raises_none():
    fine = report_with(before={"acc": 91.44, "asr": 100.0}, after={"acc": 88.68, "asr": 0.86},
                       retune={"after": profile([8.6, 15.0, 94.5]),
                               "floor": profile([9.0, 9.2, 50.6])})
    assert concerns(fine) == []
    assert "Warning" not in render_markdown(fine)


def test_a_working_trigger_a_large_drop_and_a_dormant_backdoor_are_each_named():
    bad = report_with(before={"acc": 84.51, "asr": 100.0}, after={"acc": 50.09, "asr": 51.94},
                      retune={"after": profile([8.6, 61.0, 94.5]),
                              "floor": profile([9.0, 9.2, 50.6])})
    found = concerns(bad)
    assert len(found) == 3
    assert "still works on 51.94%" in found[0] and "did not remove" in found[0]
    assert "fell by 34.42 points" in found[1]
    assert "back at 61.0% after 2 epoch(s)" in found[2] and "9.2%" in found[2]
    text = render_markdown(bad)
    assert text.count("**Warning:**") == 3 and "**Warning:** The trigger still works" in text


def test_the_retune_is_not_read_when_its_floor_cannot_tell():
    # A floor that learns the trigger at once says nothing about dormancy (report.md says so).
    blended = report_with(retune={"after": profile([97.0, 98.0, 99.0]),
                                  "floor": profile([96.0, 98.3, 99.7])})
    assert concerns(blended) == []
    assert concerns(report_with(retune={"after": profile([97.0, 98.0, 99.0])})) == []
    # An encoder's metrics carry no ASR of their own kind here: nothing is guessed.
    assert concerns(report_with(before={"acc": 80.0}, after={"acc": 79.0})) == []
