"""The README is for users: short, every docs link in it resolves, and every command in it runs."""

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_the_readme_stays_a_users_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200  # detail and history go to docs/
    for linked in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / linked).exists(), linked


# Every command the README shows, and how the suite exercises it: ("run", extra flags) runs it
# here, scaled down (the extra flags come last, so they win over the README's), in a fresh
# folder holding the run folders it reads; ("test", "file::function") names the test that runs
# its path on tiny data. A command added to the README without an entry here fails the check.
SMALL_TRAIN = ["--width", "4", "--epochs", "1", "--batch-size", "32", "--quiet"]
SMALL_PURIFY = ["--rounds", "1", "--epochs", "1", "--profile-points", "0", "--final-ft-epochs",
                "1", "--retune-images", "200", "--retune-poisoned", "20", "--retune-epochs", "1",
                "--clean-fraction", "0.2", "--batch-size", "32", "--profile-test", "50",
                "--quiet"]
SMALL_RETUNE = ["--retune-images", "200", "--retune-poisoned", "20", "--retune-epochs", "1",
                "--quiet"]
COMMANDS = {
    "tscpurify attack --attack badnets --model cnn --width 16 --epochs 5 --out runs/bd":
        ("run", SMALL_TRAIN),
    "tscpurify evaluate runs/bd": ("run", ["--quiet"]),
    "tscpurify purify runs/bd --out runs/bd-tsc": ("run", SMALL_PURIFY),
    "tscpurify purify runs/bd --out runs/bd-paper --preset paper": ("run", SMALL_PURIFY),
    "tscpurify purify runs/bd --out runs/bd-tsc --resume": ("run", SMALL_PURIFY),
    "tscpurify purify --weights my.safetensors --arch mymodels:make_net --data folder "
    "--data-root DIR --out runs/mine":
        ("test", "tests/test_own_model.py::test_cli_purifies_a_model_from_its_weights_and_factory"),
    "tscpurify attack --attack none --model cnn --width 16 --epochs 5 --out runs/clean":
        ("run", SMALL_TRAIN),
    "tscpurify purify runs/bd --out runs/bd-tsc --retune-floor runs/clean": ("run", SMALL_PURIFY),
    "tscpurify evaluate runs/other-defense --retune --retune-floor runs/clean":
        ("run", SMALL_RETUNE),
    "tscpurify bench quick": ("test", "tests/bench/test_grid.py::test_grid_cells_and_errors"),
    "tscpurify bench fair --out runs/fair --executor ray":
        ("test", "tests/bench/test_executors.py::"
                 "test_ray_rows_equal_serial_rows_and_resume_across_executors"),
    "tscpurify bench my_grid.toml --out runs/my-bench --render":
        ("test", "tests/bench/test_grid.py::test_interrupted_bench_resumes_to_the_same_table"),
}


def readme_commands() -> list[str]:
    """The `tscpurify ...` lines of the README's code blocks, without their comments."""
    commands, in_block = [], False
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("```"):
            in_block = not in_block
        elif in_block and line.startswith("tscpurify "):
            commands.append(line.split("  #")[0].strip())
    return commands


def test_every_readme_command_is_exercised():
    assert sorted(readme_commands()) == sorted(COMMANDS)
    for how, target in COMMANDS.values():
        if how == "test":
            path, name = target.split("::")
            assert f"def {name}(" in (ROOT / path).read_text(), target


def test_the_readme_commands_run_scaled_down(fmnist_root, tmp_path):
    import shutil

    from tscpurify.cli import build_parser, main

    made = tmp_path / "made"  # the run folders the commands make, in README order
    (made / "runs").mkdir(parents=True)
    for command, (how, extra) in COMMANDS.items():
        argv = command.split()[1:]
        build_parser().parse_args(argv)  # every flag the README shows exists
        if how != "run":
            continue
        here = tmp_path / f"step{len(list(tmp_path.iterdir()))}"
        shutil.copytree(made, here)
        if "runs/other-defense" in argv:  # any run folder: the backdoored one stands in
            shutil.copytree(here / "runs" / "bd", here / "runs" / "other-defense")
        argv = [str(here / a) if a.startswith("runs/") else a for a in argv]
        if argv[0] == "attack":
            extra = [*extra, "--data-root", str(fmnist_root)]
        assert main([*argv, *extra]) == 0, command
        out = argv[argv.index("--out") + 1] if "--out" in argv else None
        if argv[0] == "attack":  # later commands read it
            shutil.copytree(out, made / "runs" / Path(out).name)
        if out is not None:
            assert (Path(out) / "model.json").exists(), command
