"""JobSettings: how a purification runs around the defense, declared once for CLI and API."""

import dataclasses

import pytest
import torch

from tscpurify.cli import build_parser
from tscpurify.data import CLEAN_FRACTION
from tscpurify.errors import SettingsError
from tscpurify.job import JobSettings, resolve_device
from tscpurify.settings import settings_from_args


def test_defaults_are_the_documented_ones():
    job = JobSettings()
    assert (job.clean_fraction, job.loss, job.seed, job.device, job.threads) == (
        CLEAN_FRACTION, "auto", 0, "auto", None)


@pytest.mark.parametrize("changes, message", [
    ({"loss": "mse"}, "unknown loss 'mse'"),
    ({"clean_fraction": 0}, "a fraction in \\(0, 1\\) or a whole count"),
    ({"clean_fraction": float("nan")}, "a fraction in \\(0, 1\\) or a whole count"),
    ({"clean_fraction": 2.5}, "a fraction in \\(0, 1\\) or a whole count"),
    ({"profile_test": -1}, "profile sizes must be ≥ 0"),
    ({"threads": 0}, "threads must be ≥ 1"),
    ({"threads": 100_000}, "more than 4 × this machine's"),  # was an mmap out-of-memory error
])
def test_bad_values_are_refused_by_name(changes, message):
    with pytest.raises(SettingsError, match=message):
        JobSettings(**changes)


def test_auto_device_follows_the_hardware(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    with pytest.raises(SettingsError, match="no CUDA device"):
        resolve_device("cuda:1")
    with pytest.raises(SettingsError, match="must be auto, cpu"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda"
    # An absent MPS device is refused like an absent GPU, not met mid-run as a traceback.
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(SettingsError, match="no MPS device"):
        resolve_device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("mps") == "mps"


def test_the_purify_flags_are_generated_from_job_settings():
    parser = build_parser()
    args = parser.parse_args(["purify", "run", "--out", "x", "--clean-fraction", "0.1",
                              "--loss", "ce", "--threads", "2", "--seed", "7",
                              "--device", "cpu"])
    assert settings_from_args(JobSettings, args) == JobSettings(
        clean_fraction=0.1, loss="ce", threads=2, seed=7, device="cpu")
    unset = parser.parse_args(["purify", "run", "--out", "x"])
    assert settings_from_args(JobSettings, unset) == JobSettings()
    help_text = parser._subparsers._group_actions[0].choices["purify"].format_help()
    for field in dataclasses.fields(JobSettings):
        assert "--" + field.name.replace("_", "-") in help_text


def test_other_commands_share_the_device_and_seed_defaults():
    args = build_parser().parse_args(["attack", "--out", "x"])
    assert (args.device, args.seed) == (JobSettings().device, JobSettings().seed)


def test_threads_are_applied(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    JobSettings().apply_threads()
    JobSettings(threads=3).apply_threads()
    assert calls == [3]


def test_a_bad_flag_value_is_one_error_line(capsys):
    from tscpurify.cli import main

    assert main(["purify", "nowhere", "--out", "x", "--threads", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "threads must be ≥ 1" in err and err.count("\n") == 1


def test_the_library_entry_points_default_to_the_same_device_as_the_cli():
    import inspect

    from tscpurify.bench.grid import run_grid
    from tscpurify.purification import purify_run
    from tscpurify.runs import evaluate_run, retune_run, train_backdoored, train_encoder

    assert purify_run.__kwdefaults__["job"] is None  # JobSettings() inside: device "auto"
    for entry in (run_grid, evaluate_run, retune_run, train_backdoored, train_encoder):
        default = inspect.signature(entry).parameters["device"].default
        assert default == JobSettings().device, entry.__name__
