"""The bench tables' re-tune readings (the distance diagnostic, floors that cannot tell) and the
per-row curve profiles."""

import pytest

from tscpurify.bench.tables import (
    distance_vs_retune,
    markdown_table,
    plot_bench,
    stages_table,
    summary,
)


def row(defense, distance, retune, base="ft"):
    return {"cell": {"attack": "badnets", "model": "cnn", "seed": 0, "defense": defense,
                     "base": base, "setting": "default"},
            "before": {"acc": 90.0, "asr": 100.0, "ra": 0.0},
            "after": {"acc": 89.0, "asr": 1.0, "ra": 80.0}, "der": 0.9, "steps": 10,
            "seconds": 1.0, "distance": {"raw": distance, "aligned": distance},
            "retune": {"epochs": [1, 2, 5], "asr": [0.0, retune, 100.0], "images": 1000,
                       "poisoned": 50}}


def test_the_diagnostic_ranks_distance_against_retune_asr_over_defenses_only():
    rows = [row("none", 0.0, 100.0, base=""), row("a", 0.2, 100.0), row("b", 0.5, 60.0),
            row("c", 0.9, 10.0)]
    found = distance_vs_retune(rows)
    assert found == {"rows": 3, "spearman": pytest.approx(-1.0)}
    assert "Spearman rank correlation" in markdown_table(rows) and "-1.00" in markdown_table(rows)
    assert distance_vs_retune(rows[:3]) is None  # two defended rows say nothing
    flat = [row(name, 0.5, 100.0) for name in "abc"]
    assert distance_vs_retune(flat) == {"rows": 3, "spearman": None}
    assert "Spearman" not in markdown_table(flat)


def test_a_row_recorded_with_a_matched_distance_above_its_raw_one_counts_the_raw_one():
    # Rows written before 2026-12-05 could hold such a distance (model_distances now keeps the
    # smaller): the identity is a permutation too.
    old = row("a", 0.3, 50.0)
    old["distance"] = {"raw": 0.3, "aligned": 0.5}
    rows = [old, row("b", 0.4, 40.0), row("c", 0.2, 60.0)]
    assert summary([old])[0]["distance"] == pytest.approx(0.3)
    assert distance_vs_retune(rows)["spearman"] == pytest.approx(-1.0)  # 0.5 would say -0.5


def test_cells_whose_floor_learns_the_trigger_at_once_are_named():
    fast = row("clean_floor", 0.9, 98.3, base="")
    fast["retune"]["asr"] = [96.0, 98.3, 99.7]
    slow = row("clean_floor", 0.9, 9.2, base="")
    slow["cell"] = {**slow["cell"], "attack": "blended", "seed": 1}
    slow["retune"]["asr"] = [9.0, 9.2, 50.6]
    table = markdown_table([fast, slow, row("a", 0.2, 100.0)])
    assert "Re-tune uninformative in badnets:cnn:0:" in table
    assert "blended:cnn:1" not in table.split("Re-tune uninformative")[1].split("\n")[0]
    assert "Re-tune uninformative" not in markdown_table([slow, row("a", 0.2, 100.0)])


def test_a_row_that_profiled_its_curves_gets_its_own_figure(tmp_path):
    profile = [{"t": t, "loss": 0.5, "acc": 80.0, "asr": 5.0} for t in (0.0, 0.5, 1.0)]
    profiled = row("tsc", 0.8, 20.0, base="tsc")
    profiled["stages"] = [{"round": 0, "stage": stage, "t": 0.4, "metrics": {}, "profile": profile}
                          for stage in (1, 2)]
    unprofiled = row("tsc", 0.8, 20.0, base="tsc")
    unprofiled["cell"] = {**unprofiled["cell"], "seed": 1}
    unprofiled["stages"] = [{**s, "profile": []} for s in profiled["stages"]]
    names = [p.name for p in plot_bench([profiled, unprofiled, row("a", 0.2, 100.0)], tmp_path)]
    assert [n for n in names if n.startswith("profiles-")] == [
        "profiles-tsc-badnets-cnn-s0-default.png"]
    assert (tmp_path / "profiles-tsc-badnets-cnn-s0-default.png").stat().st_size > 0


def test_the_stage_means_keep_model_entries_apart():
    def staged(seed, width, acc):
        r = row("tsc", 0.8, 20.0, base="tsc")
        r["cell"] = {**r["cell"], "seed": seed, "model_args": {"width": width},
                     "model_label": f"cnn_w{width}"}
        r["stages"] = [{"round": 0, "stage": 1, "t": 0.4, "metrics": {"acc": acc, "asr": 1.0}}]
        return r

    # One width: one mean over both seeds, named by the row alone.
    one = stages_table([staged(0, 16, 80.0), staged(1, 16, 90.0)])
    assert "| tsc (default) | cells |" in one
    assert "| mean | 2 | 90.00 / 100.00 | 85.00 / 1.00 |" in one
    # Two widths: a mean per width, never one across them.
    two = stages_table([staged(0, 16, 80.0), staged(0, 32, 90.0)])
    assert "| mean | 2 |" not in two and two.count("| mean | 1 |") == 2
    assert "| tsc (default) · cnn_w16 |" in two and "| tsc (default) · cnn_w32 |" in two


def test_stage_labels_sort_in_run_order_across_layouts():
    from tscpurify.bench.tables import _stage_order

    # The paper preset ends without a fine-tune, the default with one: one axis holds both.
    labels = {"R3 FT", "R10 S1", "R1 S2", "before", "R1 FT", "R1 S1", "R3 S2"}
    assert sorted(labels, key=_stage_order) == ["before", "R1 S1", "R1 S2", "R1 FT", "R3 S2",
                                                "R3 FT", "R10 S1"]
