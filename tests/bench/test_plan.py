"""bench --plan's estimate for a row that has not run yet (the runs-left counts are checked
where grids run, in test_grid.py)."""

import pytest

from tscpurify.bench.plan import estimated_seconds


def test_a_row_that_has_not_run_is_estimated_from_its_own_cost_per_step_elsewhere():
    # Seconds a step of finished rows: SAU costs ten times FT on the CNN; the ResNet's steps
    # cost three times the CNN's (FT and TSC agree on the ratio).
    per_step = {("ft", "cnn"): [0.35], ("tsc", "cnn"): [0.5], ("sau", "cnn"): [3.5],
                ("ft", "resnet"): [1.05], ("tsc", "resnet"): [1.5]}
    # SAU on the ResNet: its own CNN pace scaled by the models' ratio, not the ResNet's average.
    assert estimated_seconds("sau", "resnet", 100, per_step) == pytest.approx(100 * 3.5 * 3)
    # A defense that has run nowhere: the median pace of the rows on that model.
    assert estimated_seconds("nad", "cnn", 100, per_step) == pytest.approx(100 * 0.5)
    # Nothing has run on the model: no estimate.
    assert estimated_seconds("ft", "vit", 100, per_step) is None
