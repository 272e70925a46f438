"""runs.train_backdoored: a model's training cut short resumes to the model an uninterrupted
run trains, and leaves no save behind once its folder is written."""

import pytest
from safetensors.torch import load_file

from tscpurify import resume
from tscpurify.resume import FILE, EpochCheckpoints
from tscpurify.runs import train_backdoored
from tscpurify.training import TrainSettings

TRAIN = TrainSettings(epochs=3, lr=0.05, batch_size=64)


class SessionStopped(Exception):
    pass


def train(out, fmnist_root, **kwargs):
    return train_backdoored(out, data="fashion-mnist", data_root=str(fmnist_root),
                            attack="badnets", model="cnn", model_args={"width": 4},
                            train=TRAIN, seed=5, device="cpu", progress=False, **kwargs)


def test_a_training_cut_after_an_epoch_resumes_to_the_same_model(tmp_path, fmnist_root,
                                                                 monkeypatch):
    whole = train(tmp_path / "whole", fmnist_root)
    monkeypatch.setattr(resume, "SAVE_INTERVAL", 0.0)  # save every epoch
    partial = tmp_path / "partial"
    real_save = EpochCheckpoints.save

    def save_then_stop(self, epochs, *args, **kwargs):
        real_save(self, epochs, *args, **kwargs)
        if epochs == 1:
            raise SessionStopped

    with monkeypatch.context() as patch:
        patch.setattr(EpochCheckpoints, "save", save_then_stop)
        with pytest.raises(SessionStopped):
            train(tmp_path / "cut", fmnist_root, resume_dir=partial)
    assert (partial / FILE).exists() and not (tmp_path / "cut").exists()

    resumed = train(tmp_path / "cut", fmnist_root, resume_dir=partial)
    assert resumed.as_dict() == whole.as_dict()
    a = load_file(tmp_path / "whole" / "weights.safetensors")
    b = load_file(tmp_path / "cut" / "weights.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert not partial.exists()  # the save goes once the folder is written
