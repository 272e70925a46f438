"""A model trained outside tscpurify, purified from the CLI and from Python: the README's
"purify your own model" path, walked end to end on a network defined here."""

import json
import textwrap

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader

from tscpurify import purify
from tscpurify.checkpoint import load_model
from tscpurify.cli import main
from tscpurify.data import load_dataset, select_clean_subset
from tscpurify.errors import CheckpointError, SettingsError
from tscpurify.models.factory import build_from_factory, import_factory
from tscpurify.runs import write_own_run
from tscpurify.settings import replace_settings

from .test_cli import PURIFY_TINY

# The user's own code: a module in their project folder, not a registered model.
USER_MODULE = '''
from torch import nn


class Block(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm = nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.norm(self.conv(x)).relu()


def make_net(width=4, classes=10):
    return nn.Sequential(Block(1, width), nn.MaxPool2d(2), Block(width, 2 * width),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, classes))


class Twin(nn.Module):
    """Two branches mixed by a running sum over channels: an op the symmetry tracer cannot
    follow (concatenation it can)."""

    def __init__(self, cin, half):
        super().__init__()
        self.a, self.b = nn.Conv2d(cin, half, 3, padding=1), nn.Conv2d(cin, half, 3, padding=1)

    def forward(self, x):
        import torch

        return torch.cumsum(torch.cat([self.a(x), self.b(x)], 1), dim=1).relu()


def make_twin_net(width=4, classes=10):
    return nn.Sequential(Block(1, width), Twin(width, width), Block(2 * width, width),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes))


NOT_A_MODEL = 3


def not_a_module():
    return "a string"
'''


@pytest.fixture
def user_project(tmp_path, monkeypatch):
    """The user's project folder, current, holding usernet.py and a trained model's weights."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "usernet.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.chdir(project)
    monkeypatch.syspath_prepend(str(project))
    monkeypatch.delitem(__import__("sys").modules, "usernet", raising=False)
    torch.manual_seed(0)
    model = build_from_factory("usernet:make_net", width=4)
    save_file(model.state_dict(), str(project / "model.safetensors"))
    return project


def test_cli_purifies_a_model_from_its_weights_and_factory(user_project, fmnist_root, capsys):
    weights = user_project / "model.safetensors"
    before = weights.read_bytes()
    out = user_project / "purified"
    argv = ["purify", "--weights", str(weights), "--arch", "usernet:make_net",
            "--model-arg", "width=4", "--data", "fashion-mnist", "--data-root", str(fmnist_root),
            "--out", str(out), *PURIFY_TINY]
    assert main(argv) == 0
    assert weights.read_bytes() == before  # the user's file is an input, never touched
    sidecar = json.loads((out / "model.json").read_text())
    assert sidecar["arch"] == "usernet:make_net" and sidecar["kwargs"] == {"width": 4}
    assert sidecar["attack"] is None and sidecar["purified_by"]["source"] == str(weights)
    report = json.loads((out / "report.json").read_text())
    assert report["after"].get("asr") is None and 0 <= report["after"]["acc"] <= 100
    assert "purified model written" in capsys.readouterr().out
    # The purified folder names code: it is imported again only when the user says so.
    assert main(["evaluate", str(out)]) == 2
    assert "pass --arch usernet:make_net" in capsys.readouterr().err
    assert main(["evaluate", str(out), "--arch", "usernet:make_net"]) == 0
    assert json.loads(capsys.readouterr().out)["acc"] == pytest.approx(report["after"]["acc"])
    # The output must not swallow the inputs: the weights file, nor the data.
    for inside in (weights, fmnist_root / "new"):
        assert main([*argv[:-len(PURIFY_TINY) - 2], "--out", str(inside), "--overwrite",
                     *PURIFY_TINY]) == 2
        assert "overlaps the input" in capsys.readouterr().err
    assert weights.read_bytes() == before and not (fmnist_root / "new").exists()


def test_evaluate_retune_trusts_the_arch_it_is_given(user_project, fmnist_root, capsys):
    # A folder naming the user's factory and an attack (e.g. a model they backdoored
    # themselves): --arch must reach the re-tune's loading too, not only the evaluation's.
    from tscpurify.attacks import create_attack

    run = user_project / "run"
    run.mkdir()
    write_own_run(run, user_project / "model.safetensors", "usernet:make_net",
                  model_args={"width": 4}, data="fashion-mnist", data_root=str(fmnist_root))
    sidecar = json.loads((run / "model.json").read_text())
    sidecar["attack"] = create_attack("badnets", target=0).record()
    (run / "model.json").write_text(json.dumps(sidecar))
    assert main(["evaluate", str(run), "--arch", "usernet:make_net", "--retune",
                 "--retune-images", "100", "--retune-poisoned", "10", "--retune-epochs", "1",
                 "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["retune"]["model"]["epochs"] == [1]


def test_a_registered_architecture_from_weights_and_a_pt_file(tmp_path, fmnist_root, capsys):
    from tscpurify.models import create_model

    model = create_model("cnn", width=4)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    run = tmp_path / "run"
    run.mkdir()
    write_own_run(run, tmp_path / "model.pt", "cnn", model_args={"width": 4},
                  data="fashion-mnist", data_root=str(fmnist_root))
    loaded, sidecar = load_model(run)
    assert sidecar.kwargs["num_classes"] == 10 and sidecar.kwargs["in_channels"] == 1
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


def test_own_model_errors_are_one_line(user_project, fmnist_root, capsys):
    weights = str(user_project / "model.safetensors")
    base = ["purify", "--out", str(user_project / "o"), "--quiet"]
    for extra, message in [
        ([], "give the suspect model"),
        (["--weights", weights], "--weights needs --arch"),
        (["--weights", weights, "--arch", "usernet:make_net"], "--weights needs --arch"),
        (["somerun", "--weights", weights], "not both"),
        (["somerun", "--data", "cifar10"], "--data describes a --weights file"),
        (["--weights", weights, "--arch", "nosuchmodule:make_net", "--data", "fashion-mnist",
          "--data-root", str(fmnist_root)], "cannot import 'nosuchmodule'"),
        (["--weights", weights, "--arch", "usernet:missing", "--data", "fashion-mnist",
          "--data-root", str(fmnist_root)], "has no 'missing'"),
        (["--weights", weights, "--arch", "usernet:not_a_module", "--data", "fashion-mnist",
          "--data-root", str(fmnist_root)], "not a torch nn.Module"),
        (["--weights", weights, "--arch", "usernet:make_net", "--model-arg", "width=8",
          "--data", "fashion-mnist", "--data-root", str(fmnist_root)],
         "model.safetensors does not match the architecture"),
        (["--weights", str(user_project / "none.safetensors"), "--arch", "usernet:make_net",
          "--data", "fashion-mnist", "--data-root", str(fmnist_root)], "does not exist"),
    ]:
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
        assert "tscpurify-own-" not in err, "named the temporary folder, gone by now"
    assert not (user_project / "o").exists()
    for bad in ("usernet", "usernet:", ":make_net", "usernet:NOT_A_MODEL"):
        with pytest.raises(SettingsError):
            import_factory(bad)


def test_a_run_folder_cannot_make_tscpurify_import_code(tmp_path):
    """A model.json from an untrusted source names `os:system`: loading it must refuse before
    anything is imported or called."""
    from tscpurify.models import create_model

    run = tmp_path / "hostile"
    run.mkdir()
    save_file(create_model("cnn", width=4).state_dict(), str(run / "weights.safetensors"))
    (run / "model.json").write_text(json.dumps({
        "format": "tscpurify-model/1", "arch": "os:system", "kwargs": {"command": "false"},
        "kind": "classifier", "dataset": {"name": "fashion-mnist", "root": None}}))
    with pytest.raises(CheckpointError, match="never imported on its own"):
        load_model(run)


def test_python_api_purifies_the_same_model(user_project, fmnist_root):
    """The README's Python path: any nn.Module and a loader of clean (image, label) batches."""
    model = build_from_factory("usernet:make_net", width=4)
    train = load_dataset("fashion-mnist", "train", str(fmnist_root))
    clean = train.subset(select_clean_subset(train.labels, 0.2, seed=0))
    loader = DataLoader(clean.tensor_dataset(), batch_size=32, shuffle=True)
    from tscpurify import TSCSettings

    settings = replace_settings(TSCSettings(), rounds=1, epochs=1, ft_epochs=0,
                                final_ft_epochs=1, profile_points=0)
    purified, report = purify(model, loader, settings, progress=False)
    assert isinstance(purified, nn.Module) and report.symmetry["groups"] > 0


def test_a_spec_error_hint_works_from_the_cli(user_project, fmnist_root, capsys):
    torch.manual_seed(0)
    save_file(build_from_factory("usernet:make_twin_net").state_dict(),
              str(user_project / "twin.safetensors"))
    argv = ["purify", "--weights", str(user_project / "twin.safetensors"),
            "--arch", "usernet:make_twin_net", "--data", "fashion-mnist",
            "--data-root", str(fmnist_root), *PURIFY_TINY]
    assert main([*argv, "--out", str(user_project / "a")]) == 2
    err = capsys.readouterr().err
    assert "op 'cumsum' at '1'" in err and "leaf_modules=('1',)" in err and "--leaf-module" in err
    assert main([*argv, "--out", str(user_project / "a"), "--leaf-module", "1"]) == 0
    assert main([*argv, "--out", str(user_project / "b"), "--leaf-module", "Twin"]) == 0
    assert main([*argv, "--out", str(user_project / "c"), "--leaf-module", "Nope"]) == 2
    assert "neither a module path nor a module class" in capsys.readouterr().err
