from tscpurify.report.markdown import render_markdown
from tscpurify.report.schema import PurifyReport


def report_with(**fields):
    return PurifyReport(tool_version="test", defense="tsc", settings={}, seed=0, **fields)


def profile(asr):
    return {"epochs": [1, 2, 5], "images": 1000, "poisoned": 50, "asr": asr, "acc": asr}


def test_a_floor_that_learns_the_trigger_at_once_is_called_uninformative():
    learnt = render_markdown(report_with(retune={"after": profile([97.0, 98.0, 99.0]),
                                                 "floor": profile([96.0, 98.3, 99.7])}))
    assert "cannot tell a dormant backdoor from none" in learnt
    assert "--retune-poisoned" in learnt
    slow = render_markdown(report_with(retune={"after": profile([8.6, 61.0, 94.5]),
                                               "floor": profile([9.0, 9.2, 50.6])}))
    assert "cannot tell" not in slow and "| trained without poison | 9.00 |" in slow
    assert "cannot tell" not in render_markdown(report_with(
        retune={"after": profile([97.0, 98.0, 99.0])}))  # no floor, nothing to judge by


def test_the_distance_moved_is_shown_when_measured():
    text = render_markdown(report_with(distance={"raw": 0.644, "aligned": 0.589}))
    assert "0.644 raw, 0.589 with its units aligned" in text
    assert "Moved from the suspect" not in render_markdown(report_with())
