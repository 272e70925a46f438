"""One run folder, one set of settings, one seed: the CLI, `purify_run` and the bench give
bit-identical weights (classifier), and the CLI and `purify_run` do for an encoder, whose
settings start from the SSL preset on both paths."""

import json

import torch
from safetensors.torch import load_file

from tscpurify.bench import grid as grid_module
from tscpurify.bench.grid import Cell
from tscpurify.cli import main
from tscpurify.job import JobSettings
from tscpurify.purification import purify_run

from .test_cli import backdoored_run  # noqa: F401 - a fixture
from .test_cli_encoder import encoder_run  # noqa: F401 - a fixture

OVERRIDES = {"rounds": 1, "epochs": 1, "final_ft_epochs": 1, "profile_points": 0}
FLAGS = ["--rounds", "1", "--epochs", "1", "--final-ft-epochs", "1", "--profile-points", "0",
         "--clean-fraction", "0.2", "--no-retune", "--quiet"]


def weights(folder):
    return load_file(str(folder / "weights.safetensors"))


def assert_identical(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_cli_api_and_bench_purify_a_classifier_alike(backdoored_run, fmnist_root,  # noqa: F811
                                                     tmp_path, monkeypatch):
    assert main(["purify", str(backdoored_run), "--out", str(tmp_path / "cli"), *FLAGS]) == 0
    purify_run(backdoored_run, tmp_path / "api", overrides=OVERRIDES,
               job=JobSettings(clean_fraction=0.2), retune=None, progress=False)
    assert_identical(weights(tmp_path / "cli"), weights(tmp_path / "api"))
    recorded = json.loads((tmp_path / "cli" / "model.json").read_text())["purified_by"]
    report = json.loads((tmp_path / "cli" / "report.json").read_text())
    assert recorded["settings"] == report["settings"]  # what ran, recorded once

    # The bench's path (its own clean subset, loader and defend("tsc")) on the same folder.
    seen = {}
    real_evaluate = grid_module.evaluate

    def capture(model, test, attack):
        seen["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return real_evaluate(model, test, attack)

    monkeypatch.setattr(grid_module, "evaluate", capture)
    monkeypatch.setattr(grid_module, "_models", lambda *args: (backdoored_run, None))
    cell = Cell(attack="badnets", model="cnn", seed=0, defense="tsc", base="tsc",
                defense_args=OVERRIDES, data_root=str(fmnist_root), clean_fraction=0.2,
                batch_size=32)
    grid_module.run_cell(cell, tmp_path / "bench", "cpu", progress=False)
    assert_identical(weights(tmp_path / "cli"), seen["state"])


def test_cli_and_api_purify_an_encoder_alike(encoder_run, tmp_path):  # noqa: F811
    flags = [f for f in FLAGS if f != "--no-retune"] + ["--profile-train", "100",
                                                          "--profile-test", "50"]
    assert main(["purify", str(encoder_run), "--out", str(tmp_path / "cli"), *flags]) == 0
    purify_run(encoder_run, tmp_path / "api", overrides=OVERRIDES,
               job=JobSettings(clean_fraction=0.2, profile_train=100, profile_test=50),
               progress=False)
    assert_identical(weights(tmp_path / "cli"), weights(tmp_path / "api"))
    settings = json.loads((tmp_path / "api" / "report.json").read_text())["settings"]
    # the SSL preset, then the overrides
    assert settings["t"] == 0.25 and settings["curve"]["epochs"] == 1
