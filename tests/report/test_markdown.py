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
    assert "After 2 epoch(s): purified 61.00%, trained without poison 9.20% (+51.80 points)" in slow
    alone = render_markdown(report_with(retune={"after": profile([97.0, 98.0, 99.0])}))
    assert "cannot tell" not in alone and "--retune-floor RUN" in alone  # no floor: say so


def test_the_distance_moved_is_shown_when_measured():
    text = render_markdown(report_with(distance={"raw": 0.644, "aligned": 0.589}))
    assert "0.644 raw, 0.589 with its units aligned" in text
    assert "Moved from the suspect" not in render_markdown(report_with())


def test_the_summary_gives_the_accuracy_drop_and_rounds_count_from_one():
    from tscpurify.report.schema import StageRecord

    text = render_markdown(report_with(
        before={"acc": 91.44, "asr": 100.0, "ra": 0.0}, after={"acc": 88.68, "asr": 0.86},
        stages=[StageRecord(0, 1, 0.4, {"acc": 85.0}, [{"t": 0.4, "acc": 85.0}]),
                StageRecord(0, 2, 0.4, {"acc": 88.0})],
        seconds={"curve": 10.0, "total": 12.0, "retune": 3.0}))
    assert "91.44% → 88.68% (a drop of 2.76 points)" in text
    assert "0.86% of the poisoned test images to the target, 100.00% before" in text
    assert "| 1 | 1 | 0.4 |" in text and "Round 1, stage 1:" in text and "Round 0" not in text
    assert "| **total** of the purification | 12.0 |" in text
    assert "a drop of" not in render_markdown(report_with(after={"acc": 88.0}))
