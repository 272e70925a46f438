"""The bench grid on tiny data: cells, budget, variants, reference rows, tuning, caching,
resume equality, table and plots."""

import json

import pytest

from tscpurify.bench import grid as grid_module
from tscpurify.bench.executors import run_serial
from tscpurify.bench.grid import Cell, finished_rows, read_grid, run_grid, tuning_choice
from tscpurify.bench.plan import plan
from tscpurify.bench.tables import markdown_table, plot_bench, stage_points, summary
from tscpurify.errors import OutputBusyError, SettingsError

TSC_ARGS = """[defense_args.tsc]
rounds = 1
epochs = 1
profile_points = 0
final_ft_epochs = 0
ft_epochs = 0
batch_size = 32"""


def write_grid(path, root, attacks=("badnets", "blended"), extra="", defenses=("ft", "tsc")):
    path.write_text(f"""
seeds = [0]
attacks = {list(attacks)}
defenses = {list(defenses)}
{extra}
[data]
name = "fashion-mnist"
root = "{root}"
clean_fraction = 0.1
batch_size = 32
[models.cnn]
width = 4
epochs = 2
[defense_args.ft]
epochs = 1
{TSC_ARGS if any(d.startswith("tsc") for d in defenses) else ""}
""")
    return path


def test_grid_cells_and_errors(tmp_path, fmnist_root):
    cells = read_grid(write_grid(tmp_path / "g.toml", fmnist_root)).cells
    assert [(c.attack, c.defense) for c in cells] == [
        ("badnets", "ft"), ("badnets", "tsc"), ("blended", "ft"), ("blended", "tsc")]
    assert len({c.key for c in cells}) == 4
    with pytest.raises(SettingsError, match="no grid"):
        read_grid("nonexistent-grid")
    for text, message in [
        ("defenses = ['tscc']", "did you mean 'tsc'"),
        ("defences = ['tsc']", "unknown key"),
        ("defenses = ['ft']\n[defense_args.ft]\nepoch = 3",
         "no setting 'epoch'; its settings: epochs"),
        ("defenses = ['ft']\n[defense_args.ft]\nepochs = 'three'",
         "epochs must be int, got 'three'"),
        ("seeds = 0", "seeds must be a list"),
        ("budget_steps = 0", "budget_steps"),
        ("settings = ['tuned']", "need a \\[tuning\\] section"),
        ("defenses = ['x']\n[variants.x]\ndefense = 'ft'\ntune_as = 'y'", "tune_as"),
    ]:
        (tmp_path / "bad.toml").write_text(text)
        with pytest.raises(SettingsError, match=message):
            read_grid(tmp_path / "bad.toml")
    # A variant may take its own share of clean data; only its rows change.
    extra = "[variants.ft_small]\ndefense = 'ft'\nclean_fraction = 0.01"
    varied = read_grid(write_grid(tmp_path / "v.toml", fmnist_root, attacks=("badnets",),
                                  extra=extra, defenses=("ft", "ft_small"))).cells
    assert [(c.defense, c.clean_fraction) for c in varied] == [("ft", 0.1), ("ft_small", 0.01)]
    assert varied[0].key == cells[0].key
    (tmp_path / "bad.toml").write_text("defenses = ['x']\n[variants.x]\ndefense = 'ft'\n"
                                       "clean_fraction = 0")
    with pytest.raises(SettingsError, match="clean_fraction must be > 0"):
        read_grid(tmp_path / "bad.toml")
    shipped_grids = sorted(p.stem for p in grid_module.GRIDS.glob("*.toml"))
    assert {"quick", "full", "fair", "deep", "ablations", "vit"} <= set(shipped_grids)
    for shipped in shipped_grids:  # every grid we ship parses
        assert len(read_grid(shipped).cells) > 0


def test_shipped_fair_grid_tunes_every_defense_alike():
    grid = read_grid("fair")
    assert grid.tuning is not None
    counts = {len(c) for c in grid.tuning.candidates.values()}
    assert len(counts) == 1 and counts.pop() <= 4
    assert "paper" in grid.tuning.candidates["tsc"]
    # The ablation rows take TSC's tuned settings, with only the permutation changed.
    assert grid.tuning.tuned_as["tsc_identity"] == "tsc"
    assert {c.defense_args.get("permutation") for c in grid.cells
            if c.defense == "tsc_identity"} == {"identity"}
    cells = {(c.attack, c.model, c.seed) for c in grid.cells}
    assert ("badnets", "preactresnet18", 0) in cells and ("wanet", "preactresnet18", 0) not in cells
    assert len(cells) == 14


def test_budget_variants_references_and_retune(tmp_path, fmnist_root):
    extra = """budget_steps = 40
[variants.ft_ls]
defense = "ft"
label_smoothing = 0.1
[variants.tsc_identity]
defense = "tsc"
permutation = "identity"
[retune]
images = 200
poisoned = 20
epochs = [1, 2]"""
    grid = write_grid(tmp_path / "g.toml", fmnist_root, attacks=("badnets",), extra=extra,
                      defenses=("none", "clean_floor", "ft", "ft_ls", "tsc", "tsc_identity"))
    rows = run_grid(grid, tmp_path / "out", progress=False)
    by = {r["cell"]["defense"]: r for r in rows}
    # Where each row ran is part of its provenance (CPU and GPU sums differ), as its threads.
    assert {r["device"] for r in rows} == {"cpu"}
    # Every training defense at the same budget: 54 clean images in batches of 32 → 2 a step
    # epoch; ft: 20 epochs; tsc (2 curves + nothing else per round): 10 epochs a curve.
    assert {by[d]["steps"] for d in ("ft", "ft_ls", "tsc", "tsc_identity")} == {40}
    assert by["tsc"]["settings"]["curve"]["epochs"] == 10 and by["ft"]["settings"]["epochs"] == 20
    assert by["ft_ls"]["settings"]["label_smoothing"] == 0.1
    assert by["tsc_identity"]["settings"]["permutation"] == "identity"
    # TSC's rows record ACC / ASR at each stage (the harness's evaluator); others have none.
    assert [(s["round"], s["stage"]) for s in by["tsc"]["stages"]] == [(0, 1), (0, 2)]
    assert {"acc", "asr", "loss"} <= set(by["tsc"]["stages"][0]["metrics"])
    assert "stages" not in by["ft"]
    assert by["none"]["after"] == by["none"]["before"] and by["none"]["steps"] == 0
    assert by["none"]["distance"] == {"raw": 0.0, "aligned": 0.0}
    assert 0 < by["ft"]["distance"]["aligned"] <= by["ft"]["distance"]["raw"] + 1e-9
    clean = [p for p in (tmp_path / "out" / "models").iterdir() if p.name.startswith("clean-")]
    assert len(clean) == 1 and json.loads((clean[0] / "model.json").read_text())["attack"] is None
    for row in rows:
        assert row["retune"]["epochs"] == [1, 2] and len(row["retune"]["asr"]) == 2
    table = markdown_table(rows)
    assert "ASR after re-tune 1/2 ep" in table and "| tsc_identity |" in table
    assert [s["defense"] for s in summary(rows)][:2] == ["none", "clean_floor"]
    assert (tmp_path / "out" / "models").exists()
    assert len(list((tmp_path / "out" / "models").iterdir())) == 2  # backdoored + clean twin
    plots = plot_bench(rows, tmp_path / "plots")
    assert [p.name for p in plots] == ["asr_heatmap.png", "acc_vs_asr.png", "stages.png",
                                       "retune.png"]
    # TSC's and its ablation's stages: before, the stage-1 and stage-2 points (no fine-tunes
    # here), the last point being the result the row reports.
    assert [p[0] for p in stage_points(by["tsc"])] == ["before", "R1 S1", "R1 S2"]
    assert stage_points(by["tsc"])[-1][1:] == (by["tsc"]["after"]["acc"],
                                                by["tsc"]["after"]["asr"])
    assert stage_points(by["ft"]) == []
    assert "| tsc (default) | cells | before | R1 S1 | R1 S2 |" in table
    assert "| tsc_identity (default) |" in table


def test_tuning_picks_by_the_rule_and_tuned_rows_share_identical_runs(tmp_path, fmnist_root):
    extra = """settings = ["default", "tuned"]
budget_steps = 4
[variants.ft_identity_twin]
defense = "ft"
tune_as = "ft"
augment = false
[tuning]
models = [{attack = "badnets", seed = 100}]
[tuning.candidates.ft]
default = {}
hot = {lr = 0.2}"""
    grid = write_grid(tmp_path / "g.toml", fmnist_root, attacks=("badnets",), extra=extra,
                      defenses=("ft", "ft_identity_twin"))
    out = tmp_path / "out"
    # --plan before anything ran: every run left, tuned rows only possible; nothing written.
    before = {(p["part"], p["defense"]): p for p in plan(grid, out)}
    assert before[("tuning", "ft")]["left"] == 2 and before[("tuning", "ft")]["done"] == 0
    assert before[("default", "ft")]["left"] == 1 and before[("tuned", "ft")]["possible"]
    assert not out.exists()
    assert run_grid(grid, out, progress=False, phase="tune") == []
    after_tuning = {(p["part"], p["defense"]): p for p in plan(grid, out)}
    assert after_tuning[("tuning", "ft")]["left"] == 0
    assert after_tuning[("tuning", "ft")]["median_seconds"] > 0
    # A training row that has not run yet is estimated from its budget and the model's pace.
    twin = after_tuning[("default", "ft_identity_twin")]
    assert twin["median_seconds"] is None and twin["estimated_seconds"] > 0
    assert before[("default", "ft_identity_twin")]["estimated_seconds"] is None
    # The models too: the tuning trained its model (badnets:100), which times the benchmark's.
    models = ("models", "(train models)")
    assert (before[models]["done"], before[models]["left"]) == (0, 2)
    assert (after_tuning[models]["done"], after_tuning[models]["left"]) == (1, 1)
    assert after_tuning[models]["median_seconds"] > 0
    assert not any(p["possible"] for p in after_tuning.values())
    tuning = json.loads((out / "tuning.json").read_text())
    assert set(tuning["choice"]["ft"]) == {"candidate", "overrides", "table"}
    assert not (out / "results.jsonl").exists()
    chosen = tuning["choice"]["ft"]["overrides"]
    # Rendering a grid whose tuning alone has run: the tuning table, no benchmark table.
    from tscpurify.cli import main

    assert main(["bench", str(grid), "--out", str(out), "--render", "--quiet"]) == 0
    assert (out / "tuning.md").exists() and not (out / "results.md").exists()
    assert main(["bench", str(grid), "--out", str(out), "--plan"]) == 0
    rows = run_grid(grid, out, progress=False)
    tuned = {r["cell"]["defense"]: r for r in rows if r["cell"]["setting"] == "tuned"}
    assert tuned["ft"]["settings"]["lr"] == chosen.get("lr", 0.01)
    # The variant takes the tuned choice but keeps its own override.
    assert tuned["ft_identity_twin"]["settings"]["augment"] is False
    assert tuned["ft_identity_twin"]["settings"]["lr"] == chosen.get("lr", 0.01)
    keys = [json.loads(line)["key"] for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(keys) == len(set(keys))  # a tuned row equal to its default row ran once
    assert len(finished_rows(grid, out)) == 4
    assert all(p["left"] == 0 for p in plan(grid, out))
    assert (out / "tuned.toml").read_text().startswith("# Chosen on tuning models badnets:100")
    # --render writes the tables of what has finished and runs nothing.
    assert not (out / "results.md").exists()  # the API writes rows; the CLI renders them
    before = (out / "results.jsonl").read_text()
    assert main(["bench", str(grid), "--out", str(out), "--render", "--quiet"]) == 0
    assert (out / "results.jsonl").read_text() == before
    assert "### tuned settings" in (out / "results.md").read_text()
    assert "**yes**" in (out / "tuning.md").read_text()
    assert main(["bench", str(grid), "--out", str(tmp_path / "none"), "--render"]) == 2


def test_a_defense_whose_tuning_is_done_runs_its_tuned_rows_while_another_waits(
        tmp_path, fmnist_root, capsys):
    extra = """settings = ["default", "tuned"]
budget_steps = 4
[tuning]
models = [{attack = "badnets", seed = 100}]
[tuning.candidates.ft]
default = {}
hot = {lr = 0.2}
[tuning.candidates.nad]
default = {}
hot = {lr = 0.2}"""
    grid = write_grid(tmp_path / "g.toml", fmnist_root, attacks=("badnets",), extra=extra,
                      defenses=("ft", "nad"))
    out = tmp_path / "out"
    # Only FT's candidates run (as `--rows ft` would): FT is chosen for, NAD is not.
    assert run_grid(grid, out, progress=False, phase="tune", only_rows="ft") == []
    choice = tuning_choice(read_grid(grid), out)
    assert set(choice) == {"ft"} and not (out / "tuning.json").exists()
    tuned = {(p["defense"], p["possible"]) for p in plan(grid, out) if p["part"] == "tuned"}
    assert ("nad", True) in tuned and ("nad", False) not in tuned
    rows = run_grid(grid, out, progress=False, phase="tuned", only_rows="ft")
    assert [(r["cell"]["defense"], r["cell"]["setting"]) for r in rows] == [("ft", "tuned")]
    assert rows[0]["settings"]["lr"] == choice["ft"]["overrides"].get("lr", 0.01)
    # The benchmark cell alone (no tuning model in the selection): NAD's tuned row waits,
    # and says so; FT's is not run again.
    # It reads the tuning without locking it: another process may be running candidates.
    from tscpurify.outputs import output_lock

    capsys.readouterr()
    with output_lock(out / "tuning.jsonl"):
        rows = run_grid(grid, out, progress=False, phase="tuned", only_cells="badnets:cnn:0")
    assert "the tuned rows of nad wait for their tuning" in capsys.readouterr().err
    assert [(r["cell"]["defense"], r["cell"]["setting"]) for r in rows] == [("ft", "tuned")]
    # The whole grid finishes NAD's tuning first, then its tuned row, and writes the choice.
    rows = run_grid(grid, out, progress=False, phase="tuned")
    assert [(r["cell"]["defense"], r["cell"]["setting"]) for r in rows] == [("ft", "tuned"),
                                                                          ("nad", "tuned")]
    assert set(json.loads((out / "tuning.json").read_text())["choice"]) == {"ft", "nad"}
    assert {r["cell"]["defense"] for r in finished_rows(grid, out)} == {"ft", "nad"}
    # With nothing chosen, asking for tuned rows alone is refused, as before.
    other = tmp_path / "other"
    with pytest.raises(SettingsError, match="tuning of ft is unfinished"):
        run_grid(grid, other, progress=False, phase="tuned", only_rows="ft", shard="1/2")

def test_deep_tuning_retunes_candidates_against_each_tuning_models_floor(tmp_path, fmnist_root):
    extra = """settings = ["default", "tuned"]
[retune]
images = 200
poisoned = 20
epochs = [1, 2]
[tuning]
rule = "deep"
retune_epoch = 2
models = [{attack = "badnets", seed = 100}]
[tuning.candidates.ft]
default = {}
hot = {lr = 0.2}"""
    grid = write_grid(tmp_path / "g.toml", fmnist_root, attacks=("badnets",), extra=extra,
                      defenses=("ft",))
    parsed = read_grid(grid)
    assert [(c.defense, c.setting) for c in parsed.tuning_cells] == [
        ("clean_floor", "floor"), ("ft", "default"), ("ft", "hot")]
    assert all(c.retune is not None for c in parsed.tuning_cells)
    out = tmp_path / "out"
    run_grid(grid, out, progress=False, phase="tune")
    tuning = json.loads((out / "tuning.json").read_text())
    assert "re-tune" in tuning["rule"]
    table = tuning["choice"]["ft"]["table"]
    floor = [json.loads(line) for line in (out / "tuning.jsonl").read_text().splitlines()
             if json.loads(line)["cell"]["defense"] == "clean_floor"][0]
    assert all(line["floors"] == [floor["retune"]["asr"][1]] for line in table)
    assert all(len(line["retunes"]) == 1 for line in table)
    from tscpurify.bench.tables import tuning_table

    assert "floor per model" in tuning_table(tuning["choice"])


def test_cells_run_seed_by_seed_each_with_all_its_rows():
    cells = read_grid("fair").cells
    order = grid_module.seed_major(cells)
    assert sorted(order, key=lambda c: c.key) == sorted(cells, key=lambda c: c.key)
    rows = len(read_grid("fair").row_args)  # per cell and setting
    first = [(c.attack, c.model, c.seed) for c in order[:rows]]
    assert set(first) == {("badnets", "cnn", 0)}
    assert [c.setting for c in order[:2 * rows]] == ["default"] * rows + ["tuned"] * rows
    assert {c.attack for c in order[:6 * 2 * rows]} == {
        "badnets", "blended", "wanet", "trojannn", "input_aware", "sig"}
    assert {c.seed for c in order[:6 * 2 * rows]} == {0}


def interrupt_after_first_run(monkeypatch, grid, out):
    """Run `grid` into `out` and stop it (Ctrl-C) as the second run starts."""
    real_run_cell, calls = grid_module.run_cell, {"n": 0}

    def crash_on_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_run_cell(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(grid_module, "run_cell", crash_on_second)
        with pytest.raises(KeyboardInterrupt):
            run_grid(grid, out, progress=False)
    assert len((out / "results.jsonl").read_text().splitlines()) == 1


def test_a_line_being_written_is_skipped_quietly_a_broken_one_with_a_warning(tmp_path, capsys):
    from tscpurify.bench.grid import read_results

    path = tmp_path / "results.jsonl"
    path.write_text('{"key": "a"}\n{"key": "b", "cell"')  # b: another process mid-write
    assert set(read_results(path)) == {"a"}
    assert capsys.readouterr().err == ""
    path.write_text('{"key": "a"}\n{"key": "b", "cell"\n{"key": "c"}\n')  # b cut by a crash
    assert set(read_results(path)) == {"a", "c"}
    assert "results.jsonl:2 is not a result row" in capsys.readouterr().err


def test_interrupted_bench_resumes_to_the_same_table(tmp_path, fmnist_root, monkeypatch):
    grid = write_grid(tmp_path / "g.toml", fmnist_root, attacks=("badnets",))
    whole = run_grid(grid, tmp_path / "whole", progress=False)
    interrupt_after_first_run(monkeypatch, grid, tmp_path / "resumed")
    results = tmp_path / "resumed" / "results.jsonl"
    with results.open("a") as handle:  # a line cut short by a crash is run again, not fatal
        handle.write('{"key": "abc", "cell"')
    resumed = run_grid(grid, tmp_path / "resumed", progress=False)

    def untimed(rows):  # seconds differ between runs; everything else must not
        return [{**r, "seconds": 0.0} for r in rows]

    assert markdown_table(untimed(resumed)) == markdown_table(untimed(whole))
    # The backdoored model is trained once and shared by both defenses.
    assert len([p for p in (tmp_path / "whole" / "models").iterdir()]) == 1
    plots = plot_bench(whole, tmp_path / "plots")
    assert all(p.stat().st_size > 1000 for p in plots)
    rows = [json.loads(line) for line in
            (tmp_path / "whole" / "results.jsonl").read_text().splitlines()]
    assert all(0 <= r["der"] <= 1 for r in rows)


def test_shards_split_a_grid_and_their_rows_merge(tmp_path, fmnist_root, monkeypatch):
    from tscpurify.bench import cache

    grid = write_grid(tmp_path / "g.toml", fmnist_root, attacks=("badnets",),
                      defenses=("none", "ft", "tsc"))
    whole = run_grid(grid, tmp_path / "whole", progress=False)
    out = tmp_path / "sharded"
    first = run_grid(grid, out, progress=False, shard="0/2")
    assert len(first) == 2  # runs 0 and 2 of three
    second = run_grid(grid, out, progress=False, shard="1/2")
    assert sorted(p.name for p in out.glob("results*.jsonl")) == [
        "results.shard0of2.jsonl", "results.shard1of2.jsonl"]
    assert [r["after"] for r in second] == [r["after"] for r in whole]
    assert [r["after"] for r in finished_rows(grid, out)] == [r["after"] for r in whole]
    for bad in ("2/2", "one/two", "1"):
        with pytest.raises(SettingsError, match="shard"):
            run_grid(grid, out, progress=False, shard=bad)

    # A shard that finds another process training the model it needs waits for it.
    calls = []

    def busy_then_done(folder, **kwargs):
        calls.append(folder)
        if len(calls) == 1:
            raise OutputBusyError("another tscpurify run is writing it")
        (folder / "metrics.json").parent.mkdir(parents=True, exist_ok=True)
        (folder / "metrics.json").write_text("{}")

    monkeypatch.setattr(cache, "train_backdoored", busy_then_done)
    monkeypatch.setattr(cache, "WAIT_SECONDS", 0.01)
    from tscpurify.training import TrainSettings

    folder = cache.cached_backdoored(tmp_path / "cache", attack="badnets", model="cnn", seed=9,
                                     train=TrainSettings(epochs=1))
    assert len(calls) == 2 and (folder / "metrics.json").exists()


def test_rows_and_cells_run_part_of_a_grid_that_the_whole_grid_then_completes(tmp_path,
                                                                             fmnist_root):
    from tscpurify.cli import main

    extra = """[tuning]
models = [{attack = "badnets", seed = 100}, {attack = "blended", seed = 101}]
[tuning.candidates.ft]
default = {}
hot = {lr = 0.2}"""
    grid = write_grid(tmp_path / "g.toml", fmnist_root, extra=extra, defenses=("none", "ft"))
    out = tmp_path / "out"
    # Names are checked against the grid before any work: one error line, nothing written.
    for flag, bad in (("--rows", "sau"), ("--cells", "badnets:cnn:7"), ("--rows", ",")):
        assert main(["bench", str(grid), "--out", str(out), flag, bad, "--quiet"]) == 2
        assert not out.exists()
    with pytest.raises(SettingsError, match="--cells: badnets:cnn:7 is not one of"):
        run_grid(grid, out, progress=False, only_cells="badnets:cnn:7")
    # Part of the tuning: no choice until every candidate has run on every tuning model.
    run_grid(grid, out, progress=False, phase="tune", only_cells="badnets:cnn:100")
    tuned = [json.loads(line)["cell"] for line in (out / "tuning.jsonl").read_text().splitlines()]
    assert {(c["attack"], c["seed"]) for c in tuned} == {("badnets", 100)}
    assert not (out / "tuning.json").exists()
    run_grid(grid, out, progress=False, phase="tune")
    assert (out / "tuning.json").exists()
    # One row of one cell, planned and run alone; the whole grid then runs only the rest.
    selected = {(p["part"], p["defense"]): p["left"]
                for p in plan(grid, out, only_rows="ft", only_cells="blended:cnn:0")}
    assert selected == {("models", "(train models)"): 1, ("default", "ft"): 1}  # its suspect
    part = run_grid(grid, out, progress=False, phase="default", only_rows="ft",
                    only_cells="blended:cnn:0")
    assert [(r["cell"]["defense"], r["cell"]["attack"]) for r in part] == [("ft", "blended")]
    whole = run_grid(grid, out, progress=False, phase="default")
    assert len(whole) == 4
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 4  # the selected row ran once, under the whole grid's key
    assert {r["key"] for r in whole} == {json.loads(line)["key"] for line in lines}
    assert next(r for r in whole if (r["cell"]["defense"], r["cell"]["attack"])
                == ("ft", "blended"))["after"] == part[0]["after"]


def test_a_cached_model_whose_save_is_unusable_is_trained_afresh(tmp_path, fmnist_root,
                                                                monkeypatch):
    """The bench's models save each epoch aside; a save it cannot read is dropped, never a
    traceback, and none is left once the model is written."""
    from tscpurify.bench import cache
    from tscpurify.resume import FILE
    from tscpurify.training import TrainSettings

    real, calls = cache.train_backdoored, []

    def damaged_save_first(folder, **kwargs):
        calls.append(kwargs["resume_dir"])
        if len(calls) == 1:
            kwargs["resume_dir"].mkdir(parents=True)
            (kwargs["resume_dir"] / FILE).write_bytes(b"not a checkpoint")
        return real(folder, **kwargs)

    monkeypatch.setattr(cache, "train_backdoored", damaged_save_first)
    folder = cache.cached_backdoored(tmp_path / "cache", attack="badnets", model="cnn", seed=9,
                                     train=TrainSettings(epochs=1, batch_size=64),
                                     model_args={"width": 4}, data_root=str(fmnist_root))
    assert len(calls) == 2 and (folder / "metrics.json").exists()
    assert calls[0].name == f".partial-{folder.name}" and not calls[0].exists()


def test_model_and_attack_aliases_run_one_architecture_at_several_settings(tmp_path):
    """The width and poisoning-rate studies: [models.X] arch = ... and [attack_args.Y]
    attack = ... name entries of registered ones; the names label rows, never change a run."""
    path = tmp_path / "aliases.toml"
    path.write_text("""
seeds = [120]
attacks = ["badnets", "badnets_r01"]
defenses = ["ft"]
[models.cnn_w4]
arch = "cnn"
width = 4
[models.cnn_w8]
arch = "cnn"
width = 8
[attack_args.badnets_r01]
attack = "badnets"
rate = 0.01
""")
    cells = read_grid(path).cells
    assert {(c.attack, c.attack_label, c.model, c.model_label, c.model_args["width"])
            for c in cells} == {("badnets", label, "cnn", f"cnn_w{w}", w)
                                for label in ("", "badnets_r01") for w in (4, 8)}
    assert len({c.key for c in cells}) == 4
    rate = [c for c in cells if c.attack_label][0]
    assert rate.attack_args == {"rate": 0.01}
    # A label names a run; it is not part of it: the same cell without labels is the same run.
    import dataclasses

    assert dataclasses.replace(rate, attack_label="", model_label="").key == rate.key
    rows = [{"cell": dataclasses.asdict(c), "before": {"acc": 90.0, "asr": 100.0},
             "after": {"acc": 89.0, "asr": 1.0, "ra": 80.0}, "der": 0.9} for c in cells]
    table = markdown_table(rows)
    assert "| badnets_r01 | cnn_w8 | 120 | ft |" in table and "| badnets | cnn_w4 |" in table
    # --plan keeps the widths apart, each timed by its own rows (a width-8 run costs more).
    out = tmp_path / "out"
    out.mkdir()
    (out / "bench.json").write_text('{"grid": "aliases"}')
    (out / "results.jsonl").write_text(json.dumps(
        {**rows[0], "key": cells[0].key, "steps": 10, "seconds": 5.0}) + "\n")
    lines = {(p["model"], p["defense"]): p for p in plan(path, out) if p["part"] != "models"}
    assert set(lines) == {("cnn_w4", "ft"), ("cnn_w8", "ft")}
    assert lines[(cells[0].model_name, "ft")]["median_seconds"] == 5.0
    assert lines[({"cnn_w4", "cnn_w8"} - {cells[0].model_name}).pop(), "ft"]["done"] == 0
    path.write_text(path.read_text().replace('arch = "cnn"\nwidth = 8', 'arch = "cnn9"'))
    with pytest.raises(SettingsError, match="cnn9"):
        read_grid(path)
    path.write_text('attacks = ["nope"]\ndefenses = ["ft"]\n')
    with pytest.raises(SettingsError, match="nope"):
        read_grid(path)


def test_a_model_entry_may_set_its_training(tmp_path, fmnist_root):
    """[models.X.train] (a ViT's AdamW): part of the model's cache name and of the cell's key
    only when set, so the rows and models of grids without it keep theirs."""
    import dataclasses

    grid = write_grid(tmp_path / "g.toml", fmnist_root, attacks=("badnets",), defenses=("ft",))
    plain = read_grid(grid).cells[0]
    assert plain.train_args == {}
    text = grid.read_text().replace("[models.cnn]\nwidth = 4\nepochs = 2",
                                    '[models.cnn]\nwidth = 4\nepochs = 2\n'
                                    '[models.cnn.train]\noptimizer = "adamw"\nlr = 0.001')
    grid.write_text(text)
    tuned = read_grid(grid).cells[0]
    assert tuned.train_args == {"optimizer": "adamw", "lr": 0.001}
    assert tuned.key != plain.key == dataclasses.replace(tuned, train_args={}).key
    assert grid_module.models_needed(tuned) != grid_module.models_needed(plain)
    rows = run_grid(grid, tmp_path / "out", progress=False)
    sidecar = json.loads(next((tmp_path / "out" / "models").glob("badnets-*/model.json"))
                         .read_text())
    assert sidecar["train"]["optimizer"] == "adamw" and rows[0]["steps"] > 0
    grid.write_text(text.replace('"adamw"', '"lamb"'))
    with pytest.raises(SettingsError, match=r"\[models.cnn.train\].*optimizer must be one of"):
        read_grid(grid)


def test_a_tsc_row_cut_short_resumes_at_its_last_finished_stage(tmp_path, fmnist_root,
                                                                monkeypatch):
    from tscpurify.defenses import tsc as tsc_module

    grid = write_grid(tmp_path / "g.toml", fmnist_root, attacks=("badnets",),
                      defenses=("ft", "tsc"))
    grid.write_text(grid.read_text().replace("rounds = 1", "rounds = 2")
                    .replace("defenses = ['ft', 'tsc']", "defenses = ['tsc']")
                    .replace("[defense_args.ft]\nepochs = 1\n", ""))
    uninterrupted = run_grid(grid, tmp_path / "whole", progress=False)[0]

    real = tsc_module._Stages.stage_one

    def stop_in_round_two(self, current, round_):
        if round_ == 1:
            raise KeyboardInterrupt  # the session stops
        return real(self, current, round_)

    monkeypatch.setattr(tsc_module._Stages, "stage_one", stop_in_round_two)
    with pytest.raises(KeyboardInterrupt):
        run_grid(grid, tmp_path / "cut", progress=False)
    partial = tmp_path / "cut" / "partial"
    assert sorted(p.name for p in next(partial.iterdir()).iterdir() if p.suffix == ".json") == [
        "round0_stage1.json", "round0_stage2.json", "settings.json"]
    monkeypatch.setattr(tsc_module._Stages, "stage_one", real)
    resumed = run_grid(grid, tmp_path / "cut", progress=False)[0]
    assert resumed["resumed_stages"] == [[0, 1], [0, 2]]
    assert resumed["after"] == uninterrupted["after"]  # the same weights, to the last digit
    assert resumed["stages"] == [
        {**s, "seconds": r["seconds"]} for s, r in
        zip(uninterrupted["stages"], resumed["stages"], strict=True)]
    assert resumed["seconds"] > 0 and not list(partial.iterdir())


def test_a_baseline_row_cut_short_resumes_at_its_last_saved_epoch(tmp_path, fmnist_root,
                                                                  monkeypatch):
    from tscpurify import resume

    grid = write_grid(tmp_path / "g.toml", fmnist_root, attacks=("badnets",), defenses=("ibau",),
                      extra="[defense_args.ibau]\nrounds = 3")
    grid.write_text(grid.read_text().replace("[defense_args.ft]\nepochs = 1\n", ""))
    uninterrupted = run_grid(grid, tmp_path / "whole", progress=False)[0]

    monkeypatch.setattr(resume, "SAVE_INTERVAL", 0.0)
    real = resume.EpochCheckpoints.save

    def stop_after_round_two(self, epochs, *args, **kwargs):
        real(self, epochs, *args, **kwargs)
        if epochs == 2 and self.identity.get("defense") == "ibau":  # not the models' training
            raise KeyboardInterrupt  # the session stops

    monkeypatch.setattr(resume.EpochCheckpoints, "save", stop_after_round_two)
    with pytest.raises(KeyboardInterrupt):
        run_grid(grid, tmp_path / "cut", progress=False)
    partial = tmp_path / "cut" / "partial"
    assert [p.name for p in next(partial.iterdir()).iterdir()] == [resume.FILE]
    monkeypatch.setattr(resume.EpochCheckpoints, "save", real)
    resumed = run_grid(grid, tmp_path / "cut", progress=False)[0]
    assert resumed["after"] == uninterrupted["after"]  # the same weights, to the last digit
    assert resumed["steps"] == uninterrupted["steps"]
    assert 0 < resumed["resumed_seconds"] < resumed["seconds"]
    assert "resumed_seconds" not in uninterrupted and not list(partial.iterdir())


def test_a_serial_grid_names_the_run_in_progress_and_prints_each_finished_one(capsys):
    # A row can take hours: the bar must say which one runs, and each finished one its result.
    running = Cell(attack="badnets", model="cnn", seed=120, defense="tsc", base="tsc")
    other = Cell(attack="blended", model="cnn_w32", seed=121, defense="ft", base="ft",
                 model_label="cnn_w32", setting="tuned")
    skipped = Cell(attack="sig", model="cnn", seed=120, defense="nad", base="nad")
    written = []

    def run(cell):
        return {"after": {"acc": 88.971, "asr": 1.19}, "steps": 2460, "seconds": 1131.4}

    run_serial([running, other, skipped], run, lambda key: key == skipped.key, written.append,
               progress=True, desc="bench")
    err = capsys.readouterr().err
    assert len(written) == 2  # the run another writer finished is neither run nor printed
    assert "done tsc on badnets:cnn:120 (default): ACC 88.97 ASR 1.19, 2460 steps, 1131 s" in err
    assert "done ft on blended:cnn_w32:121 (tuned)" in err
    assert "nad on sig" not in err
    # the name shows in the bar while the run is in progress, before its "done" line
    assert err.index("tsc on badnets:cnn:120") < err.index("done tsc on badnets:cnn:120")

    run_serial([running], run, lambda key: False, written.append, progress=False, desc="bench")
    assert capsys.readouterr().err == ""  # progress=False: silent


def test_the_tuning_table_shows_a_staged_candidate_along_its_stages(tmp_path, fmnist_root):
    extra = """[tuning]
models = [{attack = "badnets", seed = 100}]
[tuning.candidates.tsc]
default = {}"""
    grid = write_grid(tmp_path / "g.toml", fmnist_root, attacks=("badnets",), extra=extra)
    out = tmp_path / "out"
    run_grid(grid, out, progress=False, phase="tune")
    from tscpurify.cli import main

    assert main(["bench", str(grid), "--out", str(out), "--render", "--quiet",
                 "--phase", "tune"]) == 0
    text = (out / "tuning.md").read_text()
    assert "**yes**" in text  # the rule's table, then where the candidate's stages went
    assert text.index("**yes**") < text.index("Along the stages")
    assert "| tsc (default) | cells | before | R1 S1 | R1 S2 |" in text
    assert "| badnets:cnn:100 | 1 |" in text
