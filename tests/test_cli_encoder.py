"""The encoder path of the CLI on tiny data: `encoder` writes a run folder that says it is an
encoder, `evaluate` judges it by a linear probe, and `purify` detects it and purifies it with
the SimCLR loss on unlabelled images, never reading a label."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DataLoader

from tscpurify import purification
from tscpurify.cli import main

from .ssl.test_label_free import ImagesOnly, guarded_collate

ENCODER_TINY = ["--width", "4", "--train-images", "200", "--epochs", "1", "--batch-size", "32",
                "--shadow-images", "64", "--shadow-batch-size", "32", "--badencoder-epochs", "1",
                "--probe-train-images", "200", "--probe-epochs", "5", "--probe-knn-k", "5",
                "--quiet"]
PURIFY_TINY = ["--rounds", "1", "--epochs", "1", "--profile-points", "3", "--final-ft-epochs", "1",
               "--clean-fraction", "0.2", "--batch-size", "32", "--profile-test", "50",
               "--profile-train", "100", "--quiet"]


@pytest.fixture(scope="module")
def encoder_run(fmnist_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "badencoder"
    assert main(["encoder", "--attack", "badencoder", "--data-root", str(fmnist_root),
                 "--out", str(out), *ENCODER_TINY]) == 0
    return out


def test_encoder_writes_a_run_folder_that_says_it_is_an_encoder(encoder_run, capsys):
    assert sorted(p.name for p in encoder_run.iterdir()) == [
        "metrics.json", "model.json", "weights.safetensors"]
    sidecar = json.loads((encoder_run / "model.json").read_text())
    assert sidecar["kind"] == "encoder" and sidecar["arch"] == "simclr"
    assert sidecar["kwargs"] == {"trunk": "cnn", "in_channels": 1, "width": 4}
    # BadEncoder's trigger: the paper's white 10×10 corner square of 32×32 images, scaled to 28.
    assert sidecar["attack"]["name"] == "badnets"
    assert (sidecar["attack"]["size"], sidecar["attack"]["pattern"]) == (9, "white")
    assert sidecar["ssl"]["attack"] == "badencoder" and sidecar["ssl"]["shadow_images"] == 64
    assert sidecar["ssl"]["pretrain_images"] == 200
    assert sidecar["evaluation"]["protocol"] == "linear_probe"
    assert sidecar["evaluation"]["probe"]["train_images"] == 200
    metrics = json.loads((encoder_run / "metrics.json").read_text())
    assert {"acc", "asr", "ra", "knn_acc", "simclr_loss", "seconds"} <= set(metrics)
    assert main(["evaluate", str(encoder_run)]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("acc", "asr", "ra", "knn_acc"):
        assert again[key] == pytest.approx(metrics[key]), key


def test_ctrl_poisons_one_percent_of_the_pretraining_images(fmnist_root, tmp_path, capsys):
    out = tmp_path / "ctrl"
    assert main(["encoder", "--attack", "ctrl", "--rate", "0.02", "--attack-arg",
                 "magnitude=120", "--data-root", str(fmnist_root), "--out", str(out),
                 *ENCODER_TINY]) == 0
    assert "linear probe ACC" in capsys.readouterr().out
    sidecar = json.loads((out / "model.json").read_text())
    assert sidecar["attack"]["name"] == "ctrl" and sidecar["attack"]["magnitude"] == 120
    assert sidecar["ssl"]["poisoned"] == round(0.02 * 200)
    assert main(["evaluate", str(out)]) == 0  # the CTRL record is rebuilt for the ASR
    assert json.loads(capsys.readouterr().out)["asr"] is not None


def test_a_clean_encoder_has_no_asr(fmnist_root, tmp_path, capsys):
    out = tmp_path / "clean"
    assert main(["encoder", "--attack", "none", "--data-root", str(fmnist_root), "--out",
                 str(out), *ENCODER_TINY]) == 0
    assert json.loads((out / "model.json").read_text())["attack"] is None
    assert json.loads((out / "metrics.json").read_text())["asr"] is None


@pytest.mark.parametrize("flags, message", [
    (["--attack", "badencoder", "--rate", "0.1"], "--rate applies to ctrl only"),
    (["--attack", "ctrl", "--attack-arg", "window=10"], "does not tile"),
    (["--attack", "ctrl", "--attack-arg", "colour=red"], "no setting 'colour'"),
    (["--attack", "ctrl", "--attack-arg", "magnitude=abc"], "magnitude must be a finite float"),
    (["--attack", "none", "--attack-arg", "size=3"], "no attack arguments"),
    (["--reference-images", "0"], "reference_images"),
    (["--target", "11"], "out of range"),
])
def test_encoder_bad_input_is_one_line_and_exit_2(flags, message, fmnist_root, tmp_path, capsys):
    argv = ["encoder", "--data-root", str(fmnist_root), "--out", str(tmp_path / "e"),
            *ENCODER_TINY, *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert list(tmp_path.iterdir()) == []


def test_too_few_reference_images_fail_before_pre_training(fmnist_root, tmp_path, capsys,
                                                           monkeypatch):
    import tscpurify.runs

    def pretrained(*args, **kwargs):
        raise AssertionError("pre-trained before the reference images were counted")

    monkeypatch.setattr(tscpurify.runs, "pretrain_simclr", pretrained)
    assert main(["encoder", "--data-root", str(fmnist_root), "--out", str(tmp_path / "e"),
                 *ENCODER_TINY, "--reference-images", "100000"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "needs 100000 reference images" in err
    assert list(tmp_path.iterdir()) == []


def test_purify_detects_an_encoder_and_never_reads_a_label(encoder_run, tmp_path, monkeypatch,
                                                            capsys):
    # Every clean batch reaching TSC passes through the guard of test_label_free: a sample with
    # more than its image, or any read past a batch's images, raises.
    real, seen = purification.purify, {}

    def guarded(model, loader, settings, **kwargs):
        seen["samples"] = {len(loader.dataset[i]) for i in range(len(loader.dataset))}
        seen["loss_fn"] = kwargs.get("loss_fn")
        loader = DataLoader(loader.dataset, batch_size=loader.batch_size, shuffle=True,
                            collate_fn=guarded_collate)
        return real(model, loader, settings, **kwargs)

    monkeypatch.setattr(purification, "purify", guarded)
    ImagesOnly.reads = 0
    out = tmp_path / "purified"
    assert main(["purify", str(encoder_run), "--out", str(out), *PURIFY_TINY]) == 0
    assert seen["samples"] == {1} and seen["loss_fn"] is not None and ImagesOnly.reads > 0
    assert "linear probe ACC" in capsys.readouterr().out

    assert sorted(p.name for p in out.iterdir()) == [
        "metrics.json", "model.json", "plots", "report.json", "report.md", "weights.safetensors"]
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["before_after.png", "curves.png"]
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["t"] == 0.25  # the SSL default point
    assert report["source"]["kind"] == "encoder" and report["source"]["loss"] == "simclr"
    assert len(report["clean_indices"]) == 120 and len(report["stages"]) == 2
    assert report["before"]["asr"] is not None and report["after"]["asr"] is not None
    profile = report["stages"][0]["profile"]
    assert [p["t"] for p in profile] == [0, 0.25, 0.5, 1]
    assert {"acc", "asr", "loss"} <= set(profile[0])
    sidecar = json.loads((out / "model.json").read_text())
    assert sidecar["kind"] == "encoder" and sidecar["purified_by"]["loss"] == "simclr"
    # The purified encoder is itself an encoder run folder: it evaluates the same way.
    assert main(["evaluate", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["acc"] == pytest.approx(report["after"]["acc"])


def test_t_flag_overrides_the_ssl_point(encoder_run, tmp_path):
    out = tmp_path / "t"
    assert main(["purify", str(encoder_run), "--out", str(out), "--t", "0.3",
                 "--loss", "simclr", *PURIFY_TINY]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["t"] == 0.3 and report["stages"][1]["t"] == 0.3


def test_cross_entropy_on_an_encoder_is_refused(encoder_run, tmp_path, capsys):
    out = tmp_path / "ce"
    assert main(["purify", str(encoder_run), "--out", str(out), "--loss", "ce",
                 *PURIFY_TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --loss ce needs a classifier") and "--loss simclr" in err
    assert "\n" not in err and not out.exists()


def test_simclr_loss_needs_embeddings():
    from tscpurify.errors import SettingsError

    class Scores(torch.nn.Module):
        def forward(self, x):
            return x.flatten(1).sum(1)  # one number per image: nothing to contrast

    with pytest.raises(SettingsError, match=r"needs a model whose forward returns \(N, D\)"):
        purification.check_embeddings(Scores(), torch.rand(2, 1, 28, 28), "scores")
    purification.check_embeddings(torch.nn.Flatten(), torch.rand(2, 1, 28, 28))


def test_reference_images_are_the_most_typical_of_the_target_class():
    from tscpurify.data import ImageData
    from tscpurify.runs import typical_images

    class Brightness(torch.nn.Module):
        """Features = (mean pixel, 1): the class mean is matched best by average brightness."""

        def features(self, x):
            return torch.stack([x.mean((1, 2, 3)), torch.ones(len(x))], 1)

    levels = torch.tensor([10, 250, 120, 130, 128, 0, 255, 60], dtype=torch.uint8)
    images = levels.view(-1, 1, 1, 1).expand(-1, 1, 4, 4).contiguous()
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    data = ImageData(images, labels, ("a", "b"))
    # Class 0's mean brightness is 127.5/255: the images at 130 and 120 lie nearest in angle.
    assert typical_images(Brightness(), data, 0, 2).tolist() == [2, 3]
    assert typical_images(Brightness(), data, 1, 1).tolist() == [4]
