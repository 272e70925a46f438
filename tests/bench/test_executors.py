"""The Ray executor (tscpurify/bench/executors.py) against the serial one, on a local Ray
instance: the same rows, resume across executors, a failing run recorded while the grid goes
on, and one error line without Ray."""

import json
import os
import sys

import pytest
import torch

from tscpurify.bench.executors import FAILED, RayOptions
from tscpurify.bench.grid import run_grid
from tscpurify.cli import main

from .test_grid import interrupt_after_first_run, write_grid

ray = pytest.importorskip("ray")
NICENESS = "RAY_worker_niceness"  # Ray's own spelling of the setting


@pytest.fixture(scope="module")
def local_ray():
    # Ray starts its workers at niceness 15; beside other work on the machine (a benchmark,
    # another test process) they would barely run. This instance's workers take their turn.
    os.environ[NICENESS] = "0"
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 1024 * 1024,
             log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()
    del os.environ[NICENESS]


@pytest.fixture
def one_thread():
    """Ray runs each cell with one torch thread; the serial reference must too, since float
    sums (and so the rows) depend on the thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def comparable(rows):
    return sorted(json.dumps({k: v for k, v in r.items() if k != "seconds"}, sort_keys=True)
                   for r in rows)


def grid_file(tmp_path, root):
    # 2 attacks × (FT and the re-tune floor row, whose clean model both attacks share).
    return write_grid(tmp_path / "g.toml", root, defenses=("clean_floor", "ft"))


def test_ray_rows_equal_serial_rows_and_resume_across_executors(
        local_ray, one_thread, tmp_path, fmnist_root, monkeypatch):
    grid = grid_file(tmp_path, fmnist_root)
    serial = run_grid(grid, tmp_path / "serial", progress=False)
    on_ray = run_grid(grid, tmp_path / "ray", progress=False, ray=RayOptions())
    assert len(on_ray) == len(serial) == 4
    assert comparable(on_ray) == comparable(serial)
    assert all(r["threads"] == 1 for r in on_ray)
    # Each model is trained once, by one task: 2 backdoored and the clean twin they share.
    assert len(list((tmp_path / "ray" / "models").iterdir())) == 3

    # Killed after one run (serial), resumed on Ray: the rest finishes, the first is not redone.
    interrupt_after_first_run(monkeypatch, grid, tmp_path / "resumed")
    first = (tmp_path / "resumed" / "results.jsonl").read_text().splitlines()
    resumed = run_grid(grid, tmp_path / "resumed", progress=False, ray=RayOptions())
    lines = (tmp_path / "resumed" / "results.jsonl").read_text().splitlines()
    assert lines[0] == first[0] and len(lines) == 4
    assert comparable(resumed) == comparable(serial)


def test_a_failing_run_is_recorded_and_the_grid_goes_on(local_ray, tmp_path, fmnist_root,
                                                        capsys):
    grid = write_grid(tmp_path / "g.toml", fmnist_root, attacks=("badnets",), defenses=("ft",),
                      extra="[models.mlp]\nhidden = -3\nepochs = 1")
    rows = run_grid(grid, tmp_path / "out", progress=False, ray=RayOptions())
    assert [r["cell"]["model"] for r in rows] == ["cnn"]  # the good cell finished
    failed = [json.loads(line) for line in (tmp_path / "out" / FAILED).read_text().splitlines()]
    assert [f["cell"]["model"] for f in failed] == ["mlp"] and "Error" in failed[0]["error"]
    # From the CLI, a run that failed again says so and the exit code is 1.
    assert main(["bench", str(grid), "--out", str(tmp_path / "out"), "--executor", "ray",
                 "--quiet"]) == 1
    assert "1 run(s) failed twice" in capsys.readouterr().err


def test_without_ray_the_executor_is_one_error_line(tmp_path, fmnist_root, monkeypatch, capsys):
    grid = write_grid(tmp_path / "g.toml", fmnist_root, attacks=("badnets",), defenses=("ft",))
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    assert main(["bench", str(grid), "--out", str(tmp_path / "o"), "--executor", "ray"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'tscpurify[ray]'" in err
    assert main(["bench", str(grid), "--out", str(tmp_path / "o"), "--cpus-per-cell", "2"]) == 2
    assert "need --executor ray" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # resolve_device's check
    assert main(["bench", str(grid), "--out", str(tmp_path / "o"), "--executor", "ray",
                 "--device", "cuda"]) == 2
    assert "needs --gpus-per-cell" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_the_throughput_script_runs_serially(monkeypatch, capsys, one_thread):
    """scripts/grid_throughput.py at toy size in this process, serial executor only (Ray's part
    is the same run_grid call with ray= options, which the tests above cover)."""
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).parents[2] / "scripts" / "grid_throughput.py"
    monkeypatch.setattr(sys, "argv", ["grid_throughput.py", "--ray-workers", "",
                                      "--train-images", "300", "--epochs", "1"])
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert "| serial | 1 |" in out and "cells per hour" in out
