"""Hostile or careless input, on the CLI and the Python API: one clear error (exit 2 and one
`error:` line, or the documented exception type), before any work, and nothing left behind."""

import gzip
import json
import math
import shutil
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tscpurify import purify
from tscpurify.cli import main
from tscpurify.data import load_dataset
from tscpurify.defenses import defend
from tscpurify.defenses.finetune import FineTuneSettings
from tscpurify.errors import DataError, SettingsError
from tscpurify.models import create_model

from .conftest import synthetic_images, write_idx

TINY = ["--epochs", "1", "--width", "4", "--batch-size", "64", "--quiet"]
PURIFY = ["--rounds", "1", "--epochs", "1", "--profile-points", "0", "--final-ft-epochs", "0",
          "--clean-fraction", "0.1", "--batch-size", "32", "--no-retune", "--quiet"]


@pytest.fixture(scope="module")
def run(fmnist_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("hostile") / "bd"
    assert main(["attack", "--data-root", str(fmnist_root), "--out", str(out), *TINY]) == 0
    return out


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def tampered(run, tmp_path, *, sidecar=None, weights=None):
    """A copy of `run` with its model.json and/or weights changed."""
    copy = tmp_path / "tampered"
    shutil.copytree(run, copy)
    if sidecar is not None:
        data = json.loads((copy / "model.json").read_text())
        (copy / "model.json").write_text(json.dumps(sidecar(data)))
    if weights is not None:
        state = load_file(str(copy / "weights.safetensors"))
        save_file(weights(state), str(copy / "weights.safetensors"))
    return copy


def set_key(key, value):
    def change(data):
        data[key] = value
        return data
    return change


def first_weight(transform):
    def change(state):
        key = next(k for k in state if k.endswith("weight"))
        state[key] = transform(state[key])
        return state
    return change


PURIFY_FLAGS = [
    (["--lr", "nan"], "finite number"),
    (["--lr", "inf"], "finite number"),
    (["--t=-inf"], "finite number"),
    (["--rounds", "three"], "invalid int value"),
    (["--clean-fraction", "nan"], "finite number"),
    (["--clean-fraction", "inf"], "finite number"),
    (["--clean-fraction", "1.5"], "whole count"),
    (["--clean-fraction", "-3"], "whole count"),
    (["--profile-test", "-5"], "profile sizes must be ≥ 0"),
    (["--retune", "--retune-epochs", "2,1"], "increasing"),
    (["--retune", "--retune-epochs", "a,b"], "comma-separated int"),
    (["--permutation", "sideways"], "permutation must be one of"),
    (["--preset", "nope"], "invalid choice"),
]


@pytest.mark.parametrize("flags, message", PURIFY_FLAGS)
def test_purify_bad_flags(flags, message, run, tmp_path, capsys):
    assert main(["purify", str(run), "--out", str(tmp_path / "o"), *PURIFY, *flags]) == 2
    assert message in one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


ATTACK_FLAGS = [
    (["--width", "0"], "sizes such as the width must be positive"),
    (["--width", "-8"], "cannot be built"),
    (["--lr", "nan"], "finite number"),
    (["--momentum", "inf"], "finite number"),
    (["--epochs", "abc"], "invalid int value"),
    (["--attack", "none", "--attack-arg", "size=3"], "takes no --attack-arg"),
]


@pytest.mark.parametrize("flags, message", ATTACK_FLAGS)
def test_attack_bad_flags(flags, message, fmnist_root, tmp_path, capsys):
    argv = ["attack", "--data-root", str(fmnist_root), "--out", str(tmp_path / "o"), *TINY,
            *flags]
    assert main(argv) == 2
    assert message in one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


TAMPERED = [
    ("kwargs a list", dict(sidecar=set_key("kwargs", [16])), "'kwargs' must be a JSON object"),
    ("dataset a string", dict(sidecar=set_key("dataset", "fashion-mnist")),
     "'dataset' must be a JSON object"),
    ("unknown kind", dict(sidecar=set_key("kind", "regressor")), "kind must be one of"),
    ("seed a boolean", dict(sidecar=set_key("seed", True)), "'seed' must be a JSON integer"),
    ("unknown arch", dict(sidecar=set_key("arch", "resnet999")), "unknown architecture"),
    ("unknown key", dict(sidecar=set_key("kwarg", {"width": 8})), "unknown key(s) 'kwarg'"),
    ("not an object", dict(sidecar=lambda data: [data]), "JSON object"),
    ("no format", dict(sidecar=lambda data: {k: v for k, v in data.items() if k != "format"}),
     "sidecar"),
    ("target 99", dict(sidecar=lambda data: {**data, "attack": {**data["attack"],
                                                                 "target": 99}}),
     "targets class 99"),
    ("huge width", dict(sidecar=lambda data: {**data, "kwargs": {**data["kwargs"],
                                                                 "width": 5000}}),
     "does not match the architecture"),
    ("NaN weights", dict(weights=first_weight(lambda w: torch.full_like(w, math.nan))),
     "NaN or infinite"),
    ("infinite weights", dict(weights=first_weight(lambda w: torch.full_like(w, math.inf))),
     "NaN or infinite"),
    ("integer weights", dict(weights=first_weight(lambda w: w.round().to(torch.int64))),
     "torch.int64 values"),
    ("missing tensor", dict(weights=lambda s: dict(list(s.items())[1:])), "missing"),
    ("trigger larger than the images",
     dict(sidecar=lambda data: {**data, "attack": {**data["attack"], "size": 1000}}),
     "recorded attack does not fit its data set"),
]


@pytest.mark.parametrize("command", ["evaluate", "purify"])
@pytest.mark.parametrize("name, change, message", TAMPERED, ids=[t[0] for t in TAMPERED])
def test_tampered_run_folders(command, name, change, message, run, tmp_path, capsys):
    bad = tampered(run, tmp_path, **change)
    argv = [command, str(bad)]
    if command == "purify":
        argv += ["--out", str(tmp_path / "o"), *PURIFY]
    assert main(argv) == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / "o").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tampered"]


def test_a_corrupt_weights_file(run, tmp_path, capsys):
    bad = tampered(run, tmp_path)
    (bad / "weights.safetensors").write_bytes(b"\x00" * 64)
    assert main(["evaluate", str(bad)]) == 2
    assert "not a valid safetensors file" in one_error_line(capsys)


@pytest.mark.parametrize("out_kind, message", [
    ("file", "not a folder"),
    ("symlink", "symbolic link"),
    ("dangling", "symbolic link"),
    ("foreign", "not written by tscpurify"),
    ("existing", "already exists"),
])
def test_purify_bad_outputs(out_kind, message, run, tmp_path, capsys):
    out = tmp_path / "out"
    if out_kind == "file":
        out.write_text("keep")
    elif out_kind in ("symlink", "dangling"):
        target = tmp_path / "target"
        if out_kind == "symlink":
            target.mkdir()
        out.symlink_to(target)
    elif out_kind == "foreign":
        out.mkdir()
        (out / "notes.txt").write_text("keep")
    else:
        out.mkdir()
        (out / "model.json").write_text("{}")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    flags = ["--overwrite"] if out_kind in ("foreign", "symlink", "dangling") else []
    assert main(["purify", str(run), "--out", str(out), *PURIFY, *flags]) == 2
    assert message in one_error_line(capsys)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("command", ["attack", "encoder", "purify"])
def test_no_output_inside_an_image_folder_data_set(command, run, tmp_path, capsys):
    # An image folder's split would gain the output as a class folder, and every later load
    # of the data set would fail: its splits are inputs like the run folder.
    images = tmp_path / "images"
    write_folder(images, {"a": 2, "b": 2}, {"a": 1, "b": 1})
    recorded = tampered(run, tmp_path, sidecar=set_key(
        "dataset", {"name": "folder", "root": str(images)}))
    data = ["--data", "folder", "--data-root", str(images)]
    argv = {"attack": ["attack", *data, *TINY], "encoder": ["encoder", *data, "--quiet"],
            "purify": ["purify", str(recorded), *PURIFY]}[command]
    out = images / "train" / "new"
    assert main([*argv, "--out", str(out)]) == 2
    assert "overlaps the input" in one_error_line(capsys)
    assert sorted(p.name for p in (images / "train").iterdir()) == ["a", "b"]


GRIDS = [
    ("defences = ['tsc']", "unknown key"),
    ("defenses = ['ft']\n[defense_args.ft]\nrate = 0.1", "no setting 'rate'"),
    ("defenses = ['ft']\n[defense_args.ft]\nlr = 'fast'", "lr must be a finite float"),
    ("defenses = ['ft']\n[defense_args.nad]\nepochs = 1", "names no defense of this grid"),
    ("seeds = 'zero'", "seeds must be a list"),
    ("budget_steps = 2.5", "budget_steps must be a int"),
    ("defenses = 'ft'", "defenses must be a list"),
    ("[retune]\nepochs = [3, 1]", "increasing"),
    ("defenses = [", "not valid TOML"),
    # [data] was read key by key: a typo ran the default data set, a bad root or batch size
    # was a traceback, a bad clean_fraction failed after the backdoored model had trained.
    ("[data]\nnmae = 'cifar10'", "unknown key(s) in [data]: nmae"),
    ("[data]\nroot = 5", "data.root must be a str or NoneType"),
    ("[data]\nbatch_size = 0", "data.batch_size must be ≥ 1"),
    ("[data]\nclean_fraction = 0", "clean subset must be a fraction"),
    ("defenses = ['fewer']\n[variants.fewer]\ndefense = 'ft'\nclean_fraction = 1.5",
     "clean subset must be a fraction"),
    # Attack arguments were first built when their cell ran, after the grid had started.
    ("[attack_args.badnets]\nsize = 2.5", "[attack_args.badnets]: BadNets.size must be int"),
    ("[attack_args.badnets]\nsise = 2", "no setting 'sise'"),
    # A mistyped [retune] value was "'<' not supported between instances of 'str' and 'int'".
    ("[retune]\nimages = 'x'", "RetuneSettings.images must be int"),
    ("[retune]\nimgs = 5", "no setting 'imgs'"),
    ("seeds = []", "has no runs"),  # ran nothing and exited 0
    # An unknown data set made the bench folder first; a variant defenses does not list was
    # ignored without a word.
    ("[data]\nname = 'imagenet'", "unknown data set 'imagenet'"),
    ("defenses = ['ft']\n[variants.ft_slow]\ndefense = 'ft'\nlr = 0.001",
     "[variants.ft_slow] is not listed in defenses"),
    ("", "is empty"),  # ran the default grid: hours on Fashion-MNIST
    ("# only a comment\n", "is empty"),
]


@pytest.mark.parametrize("text, message", GRIDS)
def test_bad_grids_fail_before_any_training(text, message, tmp_path, capsys):
    grid = tmp_path / "g.toml"
    grid.write_text(text)
    assert main(["bench", str(grid), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def write_fmnist(root, train_images=None, train_labels=None):
    root.mkdir()
    for prefix, n, seed in (("train", 100, 0), ("t10k", 50, 1)):
        images, labels = synthetic_images(n, 10, 28, 1, seed)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images[:, 0])
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


def test_an_idx_file_declaring_more_than_it_may_is_refused_without_inflating(tmp_path):
    root = write_fmnist(tmp_path / "bomb")
    header = bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 2_000_000, 2048, 2048)
    with gzip.open(root / "train-images-idx3-ubyte.gz", "wb") as handle:
        handle.write(header + bytes(1 << 20))  # declares 8 TB, holds 1 MB
    with pytest.raises(DataError, match="more than the"):
        load_dataset("fashion-mnist", "train", root)


def test_an_idx_file_with_trailing_or_missing_data_is_refused(tmp_path):
    root = write_fmnist(tmp_path / "trail")
    path = root / "t10k-labels-idx1-ubyte.gz"
    with gzip.open(path) as handle:
        raw = handle.read()
    with gzip.open(path, "wb") as handle:
        handle.write(raw + b"\x01")
    with pytest.raises(DataError, match="past its declared size"):
        load_dataset("fashion-mnist", "test", root)
    with gzip.open(path, "wb") as handle:
        handle.write(raw[:-3])
    with pytest.raises(DataError, match="truncated"):
        load_dataset("fashion-mnist", "test", root)


def write_folder(root, train_classes, test_classes):
    from PIL import Image

    for split, classes in (("train", train_classes), ("test", test_classes)):
        for name, count in classes.items():
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(np.full((8, 8), 20 * i, np.uint8)).save(
                    root / split / name / f"{i}.png")


def test_image_folder_splits_must_agree_and_no_class_may_be_empty(tmp_path):
    write_folder(tmp_path / "a", {"cat": 2, "dog": 2}, {"cat": 1, "eel": 1})
    with pytest.raises(DataError, match="same class folders"):
        load_dataset("folder", "train", tmp_path / "a")
    write_folder(tmp_path / "b", {"cat": 2, "dog": 0}, {"cat": 1, "dog": 1})
    with pytest.raises(DataError, match="holds no images"):
        load_dataset("folder", "train", tmp_path / "b")


# --- the Python API ---------------------------------------------------------------------------

@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return create_model("cnn", num_classes=4, width=4, image_size=12).eval()


def loader_of(images, labels, batch_size=16):
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size)


IMAGES = torch.rand(32, 1, 12, 12)
LABELS = torch.arange(32) % 4


class TupleModel(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x), x


API_CASES = [
    ("unknown keyword", dict(foo=1), SettingsError, "has no setting 'foo'"),
    ("rounds a string", dict(rounds="3"), SettingsError, "rounds must be int"),
    ("lr NaN", dict(lr=math.nan), SettingsError, "lr must be a finite float"),
    ("t infinite", dict(t=math.inf), SettingsError, "t must be a finite float"),
    ("empty loader", dict(loader=loader_of(IMAGES[:0], LABELS[:0])), DataError,
     "loader is empty"),
    ("labels out of range", dict(loader=loader_of(IMAGES, LABELS + 3)), DataError,
     "labels must lie in [0, 3]"),
    ("negative labels", dict(loader=loader_of(IMAGES, LABELS - 1)), DataError,
     "labels must lie in"),
    ("float labels", dict(loader=loader_of(IMAGES, LABELS.float())), DataError,
     "integer tensor of class indices"),
    ("integer images", dict(loader=loader_of((IMAGES * 255).long(), LABELS)), DataError,
     "float image tensor"),
    ("bare images", dict(loader=DataLoader(TensorDataset(IMAGES), batch_size=16)), DataError,
     "bare images"),
    ("NaN images", dict(loader=loader_of(torch.full_like(IMAGES, math.nan), LABELS)), DataError,
     "NaN or infinite"),
    ("tuple output", dict(model=TupleModel), DataError, "returns tuple"),
    ("non-scalar loss", dict(loss_fn=lambda model, batch: model(batch[0])), DataError,
     "loss_fn must return a scalar"),
    ("frozen parameters", dict(frozen=True), SettingsError, "are frozen"),
    ("one-image batches", dict(loader=loader_of(IMAGES, LABELS, 1), batch_size=None),
     DataError, "batches of one image"),
    ("resume_dir a file", dict(resume_file=True), SettingsError, "is a file"),
    ("negative curve epochs", dict(epochs=-1), SettingsError, "epochs ≥ 0"),
    ("negative profile points", dict(profile_points=-3), SettingsError, "profile_points"),
]


@pytest.mark.parametrize("name, case, error, message", API_CASES, ids=[c[0] for c in API_CASES])
def test_purify_api_refuses_bad_input_before_any_work(name, case, error, message, tiny_model,
                                                      tmp_path):
    case = dict(case)
    loader = case.pop("loader", loader_of(IMAGES, LABELS))
    model = tiny_model
    if case.pop("model", None) is TupleModel:
        model = TupleModel(tiny_model)
    if case.pop("frozen", False):
        next(model.parameters()).requires_grad_(False)
    if case.pop("resume_file", False):
        (tmp_path / "stages").write_text("x")
        case["resume_dir"] = tmp_path / "stages"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=message.replace("[", r"\[").replace("]", r"\]")):
        settings = {"rounds": 1, "epochs": 1, "final_ft_epochs": 0, "profile_points": 0, **case}
        purify(model, loader, progress=False, **settings)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_defend_refuses_the_wrong_settings_and_unknown_overrides(tiny_model):
    loader = loader_of(IMAGES, LABELS)
    with pytest.raises(DataError, match="batches of 2 or more"):
        defend("ft", tiny_model, loader_of(IMAGES, LABELS, 1), progress=False, epochs=1)
    with pytest.raises(SettingsError, match="takes NADSettings"):
        defend("nad", tiny_model, loader, FineTuneSettings(), progress=False)
    with pytest.raises(SettingsError, match="has no setting 'epoch'"):
        defend("ft", tiny_model, loader, progress=False, epoch=1)
    with pytest.raises(SettingsError, match="lr must be a finite float"):
        defend("ft", tiny_model, loader, progress=False, lr=math.nan)


def test_nan_activations_stop_the_matching_with_one_error(tiny_model):
    from tscpurify.permutation import derive_spec, match

    spec = derive_spec(tiny_model, IMAGES[:2])
    bad = [(torch.full_like(IMAGES[:8], math.nan), LABELS[:8])]
    with pytest.raises(DataError, match="non-finite activations"):
        match(tiny_model, tiny_model, spec, bad, mode="unalign")


def test_a_spec_that_permutes_nothing_is_refused_and_coverage_is_reported(tiny_model):
    from tscpurify import PermutationSpec, SpecError

    loader = loader_of(IMAGES, LABELS)
    empty = PermutationSpec.from_axes({}, tiny_model.state_dict())
    with pytest.raises(SpecError, match="permute nothing"):
        purify(tiny_model, loader, progress=False, rounds=1, epochs=1, final_ft_epochs=0,
               profile_points=0, spec=empty)
    _, report = purify(tiny_model, loader, progress=False, rounds=1, epochs=1, final_ft_epochs=0,
                       ft_epochs=0, profile_points=0, leaf_modules=())
    assert report.symmetry["groups"] == 5 and report.symmetry["coverage"] > 0.9
