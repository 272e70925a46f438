"""Output folders: nothing the user did not ask to replace is lost, and nothing is left behind."""

import json
import os
import subprocess
import sys

import pytest

from tscpurify.errors import OutputError
from tscpurify.outputs import (
    atomic_folder,
    check_out,
    is_tscpurify_folder,
    output_lock,
    save_figure_atomic,
    write_atomic,
)


def run_folder(path):
    path.mkdir(parents=True)
    (path / "model.json").write_text("{}")
    (path / "weights.safetensors").write_text("old")
    return path


def test_atomic_folder_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "deep" / "er" / "run"
    with pytest.raises(RuntimeError), atomic_folder(out) as folder:
        (folder / "half.txt").write_text("x")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == [], "no temporary folder, lock or created parent"
    with atomic_folder(out) as folder:
        (folder / "done.txt").write_text("x")
    assert (out / "done.txt").exists() and sorted(p.name for p in out.parent.iterdir()) == ["run"]


@pytest.mark.parametrize("case, message", [
    ("dot", "current folder"),
    ("cwd", "current folder or one of its parents"),
    ("parent", "current folder or one of its parents"),
    ("symlink", "symbolic link"),
    ("dangling", "symbolic link"),
    ("file", "not a folder"),
    ("under_a_file", "it is a file, not a folder"),  # once "permission denied", misleading
    ("exists", "already exists"),
    ("foreign", "not written by tscpurify"),
    ("input", "overlaps the input"),
    ("inside_input", "overlaps the input"),
    ("around_input", "overlaps the input"),
])
def test_outputs_that_could_lose_data_are_refused(case, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    source = run_folder(tmp_path / "source")
    overwrite, inputs = True, [source]
    out = {"dot": ".", "cwd": str(tmp_path), "parent": str(tmp_path.parent),
           "input": str(source), "inside_input": str(source / "sub")}.get(case)
    if case in ("symlink", "dangling"):
        out = tmp_path / "link"
        out.symlink_to(work if case == "symlink" else tmp_path / "nowhere")
    elif case == "file":
        out = tmp_path / "a-file"
        out.write_text("keep me")
    elif case == "under_a_file":
        (tmp_path / "a-file").write_text("keep me")
        out = tmp_path / "a-file" / "run"
    elif case == "exists":
        out, overwrite = run_folder(tmp_path / "old"), False
    elif case == "foreign":
        out = tmp_path / "photos"
        out.mkdir()
        (out / "holiday.jpg").write_text("keep me")
    if case == "around_input":  # the input lies inside the output
        out, inputs = tmp_path / "wrap", [run_folder(tmp_path / "wrap" / "src")]
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(OutputError, match=message):
        check_out(out, overwrite, inputs)
    with pytest.raises(OutputError, match=message), atomic_folder(out, overwrite, inputs):
        pytest.fail("the block must not run")
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before, "nothing created or deleted"


def test_a_read_only_parent_is_refused_before_any_work(tmp_path, monkeypatch):
    # As root the permission bits do not stop writes, so the check is exercised directly.
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(OutputError, match="permission denied"):
        check_out(tmp_path / "new" / "run")
    from tscpurify.bench.grid import run_grid

    with pytest.raises(OutputError, match="permission denied"):
        run_grid("quick", tmp_path / "bench", progress=False)
    assert not (tmp_path / "new").exists() and not (tmp_path / "bench").exists()


def test_overwrite_swaps_a_run_folder_only_once_the_new_one_is_complete(tmp_path):
    out = run_folder(tmp_path / "run")
    with pytest.raises(RuntimeError), atomic_folder(out, overwrite=True) as folder:
        (folder / "model.json").write_text("{}")
        assert (out / "weights.safetensors").read_text() == "old", "still there while working"
        raise RuntimeError("boom")
    assert (out / "weights.safetensors").read_text() == "old", "a failed run replaces nothing"
    with atomic_folder(out, overwrite=True) as folder:
        (folder / "model.json").write_text("{}")
        (folder / "weights.safetensors").write_text("new")
    assert (out / "weights.safetensors").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert is_tscpurify_folder(out) and not is_tscpurify_folder(tmp_path)


def test_a_folder_that_appears_meanwhile_is_never_replaced(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(OutputError, match="appeared while"), atomic_folder(out) as folder:
        (folder / "model.json").write_text("{}")
        out.mkdir()
        (out / "theirs.txt").write_text("keep me")
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_second_writer_to_the_same_out_is_refused(tmp_path):
    out = tmp_path / "run"
    with output_lock(out), pytest.raises(OutputError, match="another tscpurify run is writing"), \
            atomic_folder(out):
        pytest.fail("the block must not run")
    assert not (tmp_path / ".run.lock").exists(), "the lock is removed on release"
    with atomic_folder(out) as folder:
        (folder / "model.json").write_text("{}")
    assert out.exists()


LOCK_HOLDER = """
import sys
from pathlib import Path
from tscpurify.outputs import output_lock
with output_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_two_processes_same_out_one_refused_the_others_result_intact(tmp_path, fmnist_root,
                                                                       capsys):
    from tscpurify.cli import main

    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(out)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        argv = ["attack", "--data-root", str(fmnist_root), "--out", str(out), "--epochs", "1",
                "--width", "4", "--batch-size", "64", "--quiet"]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: another tscpurify run is writing") and "\n" not in err
        assert not out.exists()
    finally:
        holder.communicate("")
    assert main(argv) == 0  # the lock went with its process
    assert json.loads((out / "model.json").read_text())["attack"]["name"] == "badnets"


def test_demo_overwrite_keeps_the_old_folder_until_the_new_one_is_complete(tmp_path,
                                                                            monkeypatch, capsys):
    import tscpurify.purification as purification
    import tscpurify.runs as runs
    from tscpurify.cli import main
    from tscpurify.evaluation import Metrics
    from tscpurify.report.schema import PurifyReport

    old = tmp_path / "demo"
    for name in ("backdoored", "purified"):
        run_folder(old / name)

    def fake_attack(out, **kwargs):
        with atomic_folder(out) as folder:
            (folder / "model.json").write_text("{}")
        assert (old / "purified" / "weights.safetensors").read_text() == "old"
        return Metrics(90.0, 100.0, 0.0)

    def failing_purify(run, out, *args, **kwargs):
        raise OutputError("disk full")

    monkeypatch.setattr(runs, "train_backdoored", fake_attack)
    monkeypatch.setattr(purification, "purify_run", failing_purify)
    assert main(["demo", "--out", str(old), "--overwrite", "--quiet"]) == 2
    assert (old / "purified" / "weights.safetensors").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]

    def fake_purify(run, out, *args, source=None, **kwargs):
        with atomic_folder(out) as folder:
            (folder / "model.json").write_text(json.dumps({"source": source}))
        return PurifyReport("0", "tsc", {}, 0, before={"acc": 90.0}, after={"acc": 89.0},
                            source={"run": source})

    monkeypatch.setattr(purification, "purify_run", fake_purify)
    assert main(["demo", "--out", str(old), "--overwrite", "--quiet"]) == 0
    assert json.loads((old / "purified" / "model.json").read_text())["source"] == str(
        old / "backdoored"), "the report names the final folder, not the temporary one"
    assert not (old / "purified" / "weights.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_a_terminated_run_leaves_no_temporary_folder_or_lock(tmp_path, fmnist_root):
    import signal
    import time

    out = tmp_path / "run"
    argv = [sys.executable, "-m", "tscpurify", "attack", "--data-root", str(fmnist_root),
            "--out", str(out), "--epochs", "500", "--width", "4", "--batch-size", "64", "--quiet"]
    process = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".run.tmp-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(tmp_path.glob(".run.tmp-*")), "the run should be building its folder"
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    # Under `python -m` CPython now and then ends a process whose KeyboardInterrupt was caught
    # by re-raising SIGINT (-2 here); a shell sees 130 either way. The console script gives
    # 130 every time. Accepting both keeps this test from failing on a busy machine.
    assert process.returncode in (130, -signal.SIGINT) and "interrupted" in err
    assert list(tmp_path.iterdir()) == [], "no temporary folder, lock or half-written run"


def test_a_stale_temporary_folder_from_a_killed_run_is_cleared_by_the_next(tmp_path):
    out = tmp_path / "run"
    stale = tmp_path / ".run.tmp-abc123"
    stale.mkdir()
    (stale / "weights.safetensors").write_text("half")
    with atomic_folder(out) as folder:
        (folder / "model.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_bench_adds_only_to_its_own_folders(tmp_path):
    from tscpurify.bench.grid import run_grid

    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "a.jpg").write_text("keep")
    with pytest.raises(OutputError, match="not a bench folder"):
        run_grid("quick", foreign, progress=False)
    # Nor to a run folder (tscpurify's, but not a bench's): results and models were mixed in.
    run = run_folder(tmp_path / "run")
    with pytest.raises(OutputError, match="not a bench folder"):
        run_grid("quick", run, progress=False)
    assert sorted(p.name for p in run.iterdir()) == ["model.json", "weights.safetensors"]
    with pytest.raises(OutputError, match="symbolic link"):
        (tmp_path / "link").symlink_to(tmp_path / "nowhere")
        run_grid("quick", tmp_path / "link", progress=False)
    assert sorted(p.name for p in foreign.iterdir()) == ["a.jpg"]


def test_an_empty_folder_may_be_the_output(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with atomic_folder(out) as folder:
        (folder / "model.json").write_text("{}")
    assert (out / "model.json").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_file_written_in_place_is_whole_or_untouched(tmp_path, monkeypatch):
    target = tmp_path / "results.md"
    write_atomic(target, "old\n")
    assert target.read_text() == "old\n"

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)  # the crash comes after the text is written
    with pytest.raises(OSError):
        write_atomic(target, "new, but never finished\n")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["results.md"]  # no temporary left


def test_a_figure_is_saved_whole_in_the_format_of_its_name(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, _ = plt.subplots()
    save_figure_atomic(figure, tmp_path / "plot.png", dpi=20)
    plt.close(figure)
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]


def test_results_get_the_permissions_the_umask_allows(tmp_path):
    """mkdtemp's 0700 and safetensors' 0600 would hide a result from everyone else on a shared
    machine; a finished folder and a file replaced in place read like plain mkdir/open output."""
    import torch
    from safetensors.torch import save_file

    mask = os.umask(0o027)
    try:
        with atomic_folder(tmp_path / "run") as folder:
            (folder / "plots").mkdir()
            save_file({"w": torch.zeros(2)}, str(folder / "weights.safetensors"))
            (folder / "model.json").write_text("{}")
        write_atomic(tmp_path / "results.md", "table\n")
    finally:
        os.umask(mask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in [tmp_path / "run",
                                                        *(tmp_path / "run").rglob("*")]}
    assert modes == {"run": 0o750, "plots": 0o750, "weights.safetensors": 0o640,
                     "model.json": 0o640}
    assert (tmp_path / "results.md").stat().st_mode & 0o777 == 0o640
