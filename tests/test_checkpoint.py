import pytest
import torch
from safetensors.torch import save_file

from tscpurify.checkpoint import load_model, load_weights, save_model
from tscpurify.errors import CheckpointError
from tscpurify.models import create_model
from tscpurify.sidecar import Sidecar


def test_safetensors_round_trip_rebuilds_an_identical_model(tmp_path):
    model = create_model("cnn", width=4).eval()
    model(torch.rand(8, 1, 28, 28))  # eval mode: running stats stay, but make sure they exist
    save_model(model, tmp_path, Sidecar(arch="cnn", kwargs={"width": 4}))
    loaded, sidecar = load_model(tmp_path)
    assert sidecar.arch == "cnn"
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(model(x), loaded(x))


def test_mismatched_weights_are_refused_with_the_key(tmp_path):
    model = create_model("cnn", width=4)
    save_model(model, tmp_path, Sidecar(arch="cnn", kwargs={"width": 8}))
    with pytest.raises(CheckpointError, match="does not match the architecture"):
        load_model(tmp_path)


def test_pickled_code_is_never_run(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    path = tmp_path / "evil.pt"
    torch.save({"weight": Evil()}, path)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_weights(path)


def test_plain_pt_state_dict_is_accepted(tmp_path):
    state = create_model("mlp", hidden=(8,)).state_dict()
    torch.save(state, tmp_path / "w.pt")
    loaded = load_weights(tmp_path / "w.pt")
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    save_file({"a": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
    assert torch.equal(load_weights(tmp_path / "w.safetensors")["a"], torch.zeros(2))
    (tmp_path / "w.pkl").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unsupported weights format"):
        load_weights(tmp_path / "w.pkl")


def test_a_sidecar_that_is_not_text_is_refused_as_invalid_json(tmp_path):
    # Binary garbage fails UTF-8 decoding before JSON parsing sees it: still one CheckpointError.
    save_model(create_model("cnn", width=4), tmp_path, Sidecar(arch="cnn", kwargs={"width": 4}))
    (tmp_path / "model.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(tmp_path)


def test_a_missing_or_non_file_weights_file_is_named_as_such(tmp_path):
    # safetensors reported these as "No such file or directory" / "No such device", the same
    # words it uses for an unreadable file: the run folder's weights are checked first.
    save_model(create_model("cnn", width=4), tmp_path, Sidecar(arch="cnn", kwargs={"width": 4}))
    (tmp_path / "weights.safetensors").unlink()
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path)
    (tmp_path / "weights.safetensors").mkdir()
    with pytest.raises(CheckpointError, match="is not a file"):
        load_model(tmp_path)


def test_a_run_folder_that_is_a_file_is_not_called_missing(tmp_path):
    (tmp_path / "run").write_text("not a folder")
    with pytest.raises(CheckpointError, match="is a file, not a folder"):
        load_model(tmp_path / "run")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nowhere")


def test_a_sidecar_that_is_no_regular_file_or_too_large_is_refused_unread(tmp_path,
                                                                          monkeypatch):
    # A FIFO made evaluate hang on its read; a link to /dev/zero would read without end.
    import os

    import tscpurify.checkpoint

    save_model(create_model("cnn", width=4), tmp_path, Sidecar(arch="cnn", kwargs={"width": 4}))
    (tmp_path / "model.json").unlink()
    os.mkfifo(tmp_path / "model.json")
    with pytest.raises(CheckpointError, match="not a regular file"):
        load_model(tmp_path)
    (tmp_path / "model.json").unlink()
    save_model(create_model("cnn", width=4), tmp_path, Sidecar(arch="cnn", kwargs={"width": 4}))
    monkeypatch.setattr(tscpurify.checkpoint, "MAX_JSON_BYTES", 16)
    with pytest.raises(CheckpointError, match="larger than"):
        load_model(tmp_path)


def test_an_arch_that_is_not_the_runs_own_is_refused_not_ignored(tmp_path):
    """--arch vouches for the code a run names; given for a run saved as another architecture
    it was silently ignored, so a user believed their own class had been used."""
    save_model(create_model("cnn", width=4), tmp_path, Sidecar(arch="cnn", kwargs={"width": 4}))
    with pytest.raises(CheckpointError, match="names the architecture 'cnn', but --arch"):
        load_model(tmp_path, trusted_arch="usernet:make_net")
    load_model(tmp_path, trusted_arch="cnn")  # the run's own name is fine
