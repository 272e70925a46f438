"""The one tuning rule (tscpurify/bench/tuning.py) and the [tuning] section's checks."""

import pytest

from tscpurify.bench.tables import tuning_table
from tscpurify.bench.tuning import TuningSpec, choose, parse_tuning, pick, tuned_toml
from tscpurify.errors import SettingsError

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib


def line(name, drop, asr):
    return {"candidate": name, "overrides": {}, "mean_drop": drop, "mean_asr": asr,
            "drops": [drop], "asrs": [asr]}


def rule(max_drop=3.0, **deep):
    return TuningSpec(model="cnn", models=(), max_drop=max_drop, count=2, candidates={},
                      tuned_as={}, kind="deep" if deep else "asr", **deep)


def test_lowest_asr_within_the_drop_bound_wins():
    lines = [line("default", 1.0, 40.0), line("a", 2.9, 5.0), line("b", 3.5, 0.1)]
    assert pick(lines, rule(3.0)) == "a"  # b removes more but costs more than 3 points
    assert pick(lines, rule(4.0)) == "b"


def test_ties_go_to_the_smaller_drop_then_to_the_first_listed():
    assert pick([line("default", 2.0, 1.004), line("a", 1.0, 1.0)], rule(3.0)) == "a"
    assert pick([line("default", 1.0, 1.0), line("a", 1.0, 1.0)], rule(3.0)) == "default"
    assert pick([line("default", 2.0, 1.02), line("a", 1.0, 1.0)], rule(3.0)) == "a"
    assert pick([line("default", 2.0, 0.98), line("a", 1.0, 1.0)], rule(3.0)) == "default"


def test_when_no_candidate_keeps_accuracy_the_smallest_drop_wins():
    assert pick([line("default", 5.0, 1.0), line("a", 4.0, 50.0)], rule(3.0)) == "a"


def test_a_choice_needs_every_candidate_on_every_tuning_model():
    with pytest.raises(SettingsError, match="before every candidate"):
        pick([line("default", 1.0, 1.0), {**line("a", None, None)}], rule(3.0))


def spec(retune_epochs=None, **section):
    base = {"models": [{"attack": "badnets", "seed": 100}, {"attack": "blended", "seed": 101}],
            "candidates": {"ft": {"default": {}, "fast": {"lr": 0.1}}}}
    return parse_tuning({**base, **section}, {"ft": "ft", "tsc": "tsc", "ft_ls": "ft",
                                             "none": None},
                        {"cnn": {}}, [0, 1], lambda row, overrides: None, retune_epochs)


def test_section_checks():
    tuning = spec()
    assert tuning.count == 2 and tuning.max_drop == 3.0 and tuning.model == "cnn"
    assert tuning.tuned_as == {"ft": "ft", "tsc": "", "ft_ls": "ft"}
    for bad, message in [
        ({"models": [{"attack": "badnets", "seed": 1}]}, "must be ≥ 100"),
        ({"models": [{"attack": "wanet", "seed": 100}]}, "badnets or blended"),
        ({"candidates": {"ft": {"default": {}, "a": {}},
                         "tsc": {"default": {}}}}, "same number of candidates"),
        ({"candidates": {"ft": {"a": {}, "b": {"lr": 1.0}}}}, "must include default"),
        ({"candidates": {"ft": {f"c{i}": {} for i in range(5)} | {"default": {}}}},
         "count must be"),
        ({"candidates": {"nad": {"default": {}}}}, "no tunable defense"),
        ({"max_drop": -1}, "max_drop"),
        ({"modles": []}, "unknown"),
    ]:
        with pytest.raises(SettingsError, match=message):
            spec(**bad)


def test_choice_from_rows_and_the_written_preset_round_trips():
    tuning = spec()

    def row(candidate, attack, seed, acc, asr):
        return {"cell": {"defense": "ft", "setting": candidate, "attack": attack, "seed": seed},
                "before": {"acc": 91.0}, "after": {"acc": acc, "asr": asr}}

    rows = [row("default", "badnets", 100, 90.5, 99.0), row("default", "blended", 101, 90.0, 98.0),
            row("fast", "badnets", 100, 89.0, 20.0), row("fast", "blended", 101, 88.5, 30.0)]
    choice = choose(rows, tuning)
    assert choice["ft"]["candidate"] == "fast" and choice["ft"]["overrides"] == {"lr": 0.1}
    table = choice["ft"]["table"]
    assert table[1]["mean_drop"] == pytest.approx(2.25) and table[1]["mean_asr"] == 25.0
    assert tomllib.loads(tuned_toml(choice, tuning)) == {"ft": {"lr": 0.1}}
    with pytest.raises(SettingsError, match="incomplete"):
        choose(rows[:3], tuning)
    # Partial: a row chooses once its own candidates are all in, whatever the others'.
    assert choose(rows[:3], tuning, partial=True) == {}
    two = spec(candidates={"ft": {"default": {}, "fast": {"lr": 0.1}},
                           "tsc": {"default": {}, "t_05": {"t": 0.5}}})
    partial = choose(rows, two, partial=True)
    assert set(partial) == {"ft"} and partial["ft"] == choose(rows, tuning)["ft"]


def test_per_model_columns_follow_the_tuning_models_whichever_finished_first():
    from tscpurify.bench.tuning import summarise

    def row(candidate, attack, seed, acc, asr):
        return {"cell": {"defense": "ft", "setting": candidate, "attack": attack, "seed": seed},
                "before": {"acc": 91.0}, "after": {"acc": acc, "asr": asr}}

    # Blended landed first for the default; `fast` has only Blended so far.
    rows = [row("default", "blended", 101, 90.0, 98.0), row("default", "badnets", 100, 90.5, 99.0),
            row("fast", "blended", 101, 88.5, 30.0)]
    choice = {"ft": {"candidate": None, "table": summarise(rows, spec())["ft"]}}
    table = tuning_table(choice)
    assert "ACC drop per model (badnets:100 / blended:101)" in table
    assert "| ft | default | defaults | 0.50 / 1.00 | 99.00 / 98.00 |" in table
    assert "| ft | fast | lr=0.1 | – / 2.50 | – / 30.00 |" in table


def deep_line(name, drops, asrs, retunes, floors):
    return {"candidate": name, "overrides": {}, "drops": drops, "asrs": asrs,
            "retunes": retunes, "floors": floors, "mean_drop": sum(drops) / len(drops),
            "mean_asr": sum(asrs) / len(asrs), "mean_retune": sum(retunes) / len(retunes)}


def test_the_deep_rule_needs_every_bound_on_every_model():
    deep = rule(retune_epoch=2, max_asr=2.0, floor_margin=10.0)
    floors = [5.0, 8.0]
    lines = [deep_line("default", [2.0, 2.0], [1.0, 1.0], [60.0, 90.0], floors),
             deep_line("a", [2.5, 2.9], [1.5, 0.5], [14.0, 17.0], floors),
             deep_line("b", [1.0, 1.0], [0.5, 0.5], [10.0, 19.0], floors),  # 19 > 8 + 10
             deep_line("c", [1.0, 3.1], [0.5, 0.5], [5.0, 5.0], floors),  # drop > 3 once
             deep_line("d", [1.0, 1.0], [2.5, 0.1], [5.0, 5.0], floors)]  # ASR > 2 once
    assert pick(lines, deep) == "a"
    assert pick(lines[:1] + lines[2:], deep) == "default"  # none passes: the published default
    assert pick(lines, rule(retune_epoch=2, max_asr=2.0, floor_margin=11.0)) == "b"
    pending = deep_line("a", [1.0], [1.0], [1.0], [None])
    with pytest.raises(SettingsError, match="before every candidate"):
        pick([lines[0], pending], deep)


def test_the_deep_rule_needs_the_retune_epoch_in_the_grid():
    assert spec(rule="deep", retune_epoch=2, retune_epochs=(1, 2)).deep
    assert "re-tune" in spec(rule="deep", retune_epochs=(2,)).rule
    for bad, message in [({"rule": "deep", "retune_epochs": None}, "must include it"),
                         ({"rule": "deep", "retune_epochs": (1, 5)}, "must include it"),
                         ({"rule": "deeper"}, "rule must be one of"),
                         ({"rule": "deep", "retune_epochs": (2,), "max_asr": "2"}, "max_asr")]:
        with pytest.raises(SettingsError, match=message):
            spec(**bad)


def test_deep_choice_reads_the_floor_rows_of_the_same_tuning_models():
    tuning = spec(rule="deep", retune_epochs=(1, 2))

    def row(defense, setting, attack, seed, acc, asr, retune):
        return {"cell": {"defense": defense, "setting": setting, "attack": attack, "seed": seed},
                "before": {"acc": 91.0}, "after": {"acc": acc, "asr": asr},
                "retune": {"epochs": [1, 2], "asr": [0.0, retune]}}

    rows = [row("clean_floor", "floor", "badnets", 100, 91.0, 1.0, 10.0),
            row("clean_floor", "floor", "blended", 101, 91.0, 1.0, 4.0),
            row("ft", "default", "badnets", 100, 90.0, 1.0, 15.0),
            row("ft", "default", "blended", 101, 90.0, 1.0, 15.0),  # 15 > 4 + 10
            row("ft", "fast", "badnets", 100, 89.0, 1.5, 19.0),
            row("ft", "fast", "blended", 101, 89.0, 0.5, 13.0)]
    choice = choose(rows, tuning)
    assert choice["ft"]["candidate"] == "fast"
    assert choice["ft"]["table"][0]["floors"] == [10.0, 4.0]
    assert [line["passes"] for line in choice["ft"]["table"]] == [False, True]
    table = tuning_table(choice)
    assert "| passes every bound |" in table and "| no |" in table and "| yes |" in table
    # When none passes, the default is kept and the table says it did not pass.
    kept = choose(rows[:4] + [row("ft", "fast", "badnets", 100, 85.0, 1.5, 19.0),
                              row("ft", "fast", "blended", 101, 89.0, 0.5, 13.0)], tuning)
    assert kept["ft"]["candidate"] == "default"
    assert "**yes** (none passes: the default stays)" in tuning_table(kept)
    with pytest.raises(SettingsError, match="before every candidate"):
        choose(rows[1:], tuning)  # a floor missing
    assert choose(rows[1:], tuning, partial=True) == {}  # the deep rule waits for its floors
