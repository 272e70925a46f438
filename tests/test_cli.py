"""The CLI end to end on tiny data: a run folder appears, and every bad input gives one line
and exit code 2 with nothing left behind."""

import json

import pytest

from tscpurify.cli import main

TINY = ["--epochs", "3", "--width", "4", "--batch-size", "32", "--quiet"]


@pytest.fixture(scope="module")
def backdoored_run(fmnist_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "bd"
    code = main(["attack", "--data-root", str(fmnist_root), "--model", "cnn", "--out", str(out),
                 "--attack-arg", "size=4", "--lr", "0.05", *TINY])
    assert code == 0
    return out


def test_attack_writes_a_complete_run_folder(backdoored_run, capsys):
    names = sorted(p.name for p in backdoored_run.iterdir())
    assert names == ["metrics.json", "model.json", "weights.safetensors"]
    metrics = json.loads((backdoored_run / "metrics.json").read_text())
    sidecar = json.loads((backdoored_run / "model.json").read_text())
    assert sidecar["attack"]["name"] == "badnets" and sidecar["attack"]["size"] == 4
    assert main(["evaluate", str(backdoored_run), "--quiet"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["acc"] == pytest.approx(metrics["acc"])
    assert again["asr"] == pytest.approx(metrics["asr"])


@pytest.mark.parametrize("flags, message", [
    (["--data-root", "/nonexistent"], "missing data file"),
    (["--model", "resnet99"], "unknown model 'resnet99'"),
    (["--attack", "badnet"], "did you mean 'badnets'"),
    (["--target", "12"], "out of range"),
    (["--rate", "1.5"], "poison rate must be in (0, 1)"),
    (["--rate", "0"], "poison rate must be in (0, 1)"),
    (["--attack-arg", "size"], "KEY=VALUE"),
    (["--device", "cuda:7"], "cuda"),
])
def test_bad_input_is_one_line_and_exit_2(flags, message, fmnist_root, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["attack", "--data-root", str(fmnist_root), "--out", str(out), *TINY, *flags]
    if "--device" in flags:
        pytest.importorskip("torch")
        import torch
        if torch.cuda.is_available():
            pytest.skip("a CUDA device exists here")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert list(tmp_path.iterdir()) == [], "no partial run folder may be left"


def test_evaluate_rejects_a_checkpoint_that_does_not_match(backdoored_run, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("weights.safetensors", "metrics.json"):
        (broken / name).write_bytes((backdoored_run / name).read_bytes())
    sidecar = json.loads((backdoored_run / "model.json").read_text())
    sidecar["kwargs"]["width"] = 8
    (broken / "model.json").write_text(json.dumps(sidecar))
    assert main(["evaluate", str(broken)]) == 2
    assert "does not match the architecture" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "missing")]) == 2


PURIFY_TINY = ["--rounds", "1", "--epochs", "1", "--profile-points", "3", "--final-ft-epochs", "1",
               "--retune-images", "200", "--retune-poisoned", "20", "--retune-epochs", "1,2",
               "--clean-fraction", "0.2", "--batch-size", "32", "--profile-test", "50", "--quiet"]


def test_purify_profile_test_zero_measures_on_the_whole_test_split(backdoored_run, tmp_path):
    # As for an encoder's probe, 0 = all; a classifier's empty subset once crashed torch.cat.
    out = tmp_path / "p"
    assert main(["purify", str(backdoored_run), "--out", str(out), *PURIFY_TINY,
                 "--no-retune", "--profile-test", "0"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert all(0 <= stage["metrics"]["acc"] <= 100 for stage in report["stages"])


def test_purify_writes_model_report_and_plots(backdoored_run, tmp_path, capsys):
    out = tmp_path / "clean"
    assert main(["purify", str(backdoored_run), "--out", str(out), *PURIFY_TINY]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["metrics.json", "model.json", "plots", "report.json", "report.md",
                     "weights.safetensors"]
    assert sorted(p.name for p in (out / "plots").iterdir()) == [
        "before_after.png", "curves.png", "retune.png"]
    report = json.loads((out / "report.json").read_text())
    assert set(report["retune"]) == {"before", "after"}
    assert report["retune"]["after"]["epochs"] == [1, 2]
    assert report["retune"]["after"]["images"] == 200
    assert report["environment"]["threads"] >= 1 and report["environment"]["device"] == "cpu"
    assert "## Does the backdoor come back?" in (out / "report.md").read_text()
    # How far TSC moved the model: aligning the units can only bring it closer.
    assert 0 < report["distance"]["aligned"] <= report["distance"]["raw"] + 1e-9
    assert "Moved from the suspect model" in (out / "report.md").read_text()
    assert len(report["clean_indices"]) == 120 and len(report["stages"]) == 2
    assert report["settings"]["rounds"] == 1 and report["after"]["asr"] is not None
    captured = capsys.readouterr()
    printed = captured.out
    assert "report.md" in printed
    assert f"permutation symmetry: {report['symmetry']['groups']} groups, moving " in printed
    # What the numbers must not hide is said in a warning line (this tiny run: whatever it did).
    assert ("warning: the trigger still works" in captured.err) == (report["after"]["asr"] > 5)
    drop = report["before"]["acc"] - report["after"]["acc"]
    assert ("warning: clean accuracy fell" in captured.err) == (drop > 3)
    # The purified folder is itself a run folder: it evaluates like any other.
    assert main(["evaluate", str(out)]) == 0
    assert not list(tmp_path.glob(".*")), "no staging folder may be left behind"


def test_purify_bad_input(backdoored_run, tmp_path, capsys):
    assert main(["purify", str(tmp_path / "nope"), "--out", str(tmp_path / "o"),
                 *PURIFY_TINY]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["purify", str(backdoored_run), "--out", str(tmp_path / "o"), "--t", "1.5",
                 *PURIFY_TINY]) == 2
    assert "t must lie in [0, 1]" in capsys.readouterr().err
    assert main(["purify", str(backdoored_run), "--out", str(tmp_path / "o"),
                 "--clean-fraction", "0", *PURIFY_TINY[:-7]]) == 2
    assert "clean subset must be a fraction" in capsys.readouterr().err
    # The default re-tuning set (1,000 images) does not fit the 600 tiny training images: the
    # run stops before any purification, with a hint.
    assert main(["purify", str(backdoored_run), "--out", str(tmp_path / "o"), "--rounds", "1",
                 "--epochs", "1", "--quiet"]) == 2
    assert "needs 1000 images" in capsys.readouterr().err
    assert main(["purify", str(backdoored_run), "--out", str(tmp_path / "o"), "--retune-floor",
                 str(backdoored_run), *PURIFY_TINY]) == 2
    assert "without poison" in capsys.readouterr().err
    assert main(["purify", str(backdoored_run), "--out", str(tmp_path / "o"), *PURIFY_TINY,
                 "--retune-epochs", "2,1"]) == 2
    assert "increasing" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_clean_model_is_the_re_tuning_floor(backdoored_run, fmnist_root, tmp_path, capsys):
    floor = tmp_path / "floor"
    assert main(["attack", "--attack", "none", "--data-root", str(fmnist_root), "--model", "cnn",
                 "--out", str(floor), *TINY]) == 0
    assert "clean model written" in capsys.readouterr().out
    assert json.loads((floor / "model.json").read_text())["attack"] is None
    out = tmp_path / "purified"
    assert main(["purify", str(backdoored_run), "--out", str(out), "--retune-floor", str(floor),
                 *PURIFY_TINY]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["retune"]) == {"before", "after", "floor"}
    # One seed for all three: the same images and poison, so the floor is comparable.
    assert report["retune"]["floor"]["seed"] == report["retune"]["after"]["seed"]
    out2 = tmp_path / "no-retune"
    assert main(["purify", str(backdoored_run), "--out", str(out2), "--no-retune",
                 *PURIFY_TINY]) == 0
    assert json.loads((out2 / "report.json").read_text())["retune"] == {}


def test_purify_a_classifier_with_the_simclr_loss(backdoored_run, tmp_path):
    # A classifier's logits are (N, 10) embeddings to NT-Xent: it runs label-free, at the SSL
    # point, and is still judged as a classifier (its own predictions, not a probe).
    out = tmp_path / "ssl"
    assert main(["purify", str(backdoored_run), "--out", str(out), "--loss", "simclr",
                 *PURIFY_TINY]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["source"]["loss"] == "simclr" and report["source"]["kind"] == "classifier"
    assert report["settings"]["t"] == 0.25 and report["after"]["asr"] is not None
    # The default for a classifier stays cross-entropy at the preset's t.
    default = tmp_path / "ce"
    assert main(["purify", str(backdoored_run), "--out", str(default), *PURIFY_TINY]) == 0
    report = json.loads((default / "report.json").read_text())
    assert report["source"]["loss"] == "ce" and report["settings"]["t"] == 0.4


@pytest.mark.parametrize("command", ["attack", "encoder", "evaluate", "purify", "demo", "bench"])
def test_every_command_prints_its_help(command, capsys):
    # argparse %-formats help strings: a "%" in a settings field's help once crashed --help
    assert main([command, "--help"]) == 0
    assert "usage:" in capsys.readouterr().out


def test_demo_refuses_an_unknown_preset_before_training(tmp_path, capsys):
    # It was met at step 2, after the backdoored model had trained for minutes.
    assert main(["demo", "--out", str(tmp_path / "d"), "--preset", "nope", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "invalid choice: 'nope'" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["input", "inside_input", "dot"])
def test_purify_never_writes_over_or_into_its_input(where, backdoored_run, tmp_path, capsys,
                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = {"input": str(backdoored_run), "inside_input": str(backdoored_run / "purified"),
           "dot": "."}[where]
    before = {p.name: p.read_bytes() for p in backdoored_run.iterdir()}
    assert main(["purify", str(backdoored_run), "--out", out, "--overwrite", *PURIFY_TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert {p.name: p.read_bytes() for p in backdoored_run.iterdir()} == before
    assert list(tmp_path.iterdir()) == []


def test_resume_over_another_models_stages_is_refused(backdoored_run, fmnist_root, tmp_path,
                                                      capsys, monkeypatch):
    other = tmp_path / "other"
    assert main(["attack", "--data-root", str(fmnist_root), "--model", "cnn", "--out",
                 str(other), "--attack-arg", "size=4", "--seed", "5", *TINY]) == 0
    out = tmp_path / "purified"

    def crash(*args, **kwargs):
        raise OSError(28, "No space left on device")  # after every stage was saved

    import tscpurify.purification as purification

    monkeypatch.setattr(purification, "write_report", crash)
    assert main(["purify", str(backdoored_run), "--out", str(out), *PURIFY_TINY]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and ".purified.stages" in err and "--resume" in err
    assert (tmp_path / ".purified.stages").is_dir() and not out.exists()
    monkeypatch.undo()
    assert main(["purify", str(other), "--out", str(out), "--resume", *PURIFY_TINY]) == 2
    err = capsys.readouterr().err
    assert "weights_sha256" in err and "--resume" in err and not out.exists()
    # Without --resume the stale stages are not read: a fresh run of the other model.
    assert main(["purify", str(other), "--out", str(out), *PURIFY_TINY]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["source"]["run"] == str(other)
    assert not (tmp_path / ".purified.stages").exists()


def test_a_corrupt_saved_stage_says_start_over_and_only_that(backdoored_run, tmp_path, capsys,
                                                               monkeypatch):
    import tscpurify.purification as purification

    def crash(*args, **kwargs):
        raise OSError(28, "No space left on device")  # after every stage was saved

    monkeypatch.setattr(purification, "write_report", crash)
    out = tmp_path / "purified"
    assert main(["purify", str(backdoored_run), "--out", str(out), *PURIFY_TINY]) == 2
    capsys.readouterr()
    monkeypatch.undo()
    (tmp_path / ".purified.stages" / "round0_stage1.safetensors").write_bytes(b"\0" * 100)
    assert main(["purify", str(backdoored_run), "--out", str(out), "--resume",
                 *PURIFY_TINY]) == 2
    err = capsys.readouterr().err
    # The generic "run again with --resume" hint once followed, contradicting the advice.
    assert "is corrupt" in err and "start over without resuming" in err
    assert "--resume" not in err and err.count("\n") == 1


def test_evaluate_can_re_tune_any_run_folder(backdoored_run, capsys):
    flags = ["--retune", "--retune-images", "200", "--retune-poisoned", "20",
             "--retune-epochs", "1,2", "--quiet"]
    assert main(["evaluate", str(backdoored_run), *flags]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    profile = result["retune"]["model"]
    assert profile["epochs"] == [1, 2] and len(profile["asr"]) == 2
    assert main(["evaluate", str(backdoored_run), "--retune-floor", str(backdoored_run)]) == 2
    assert "needs --retune" in capsys.readouterr().err
    assert main(["evaluate", str(backdoored_run), *flags, "--retune-floor",
                 str(backdoored_run)]) == 2
    assert "without poison" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--retune", "--retune-images", "100000"], "re-tuning set needs 100000 images"),
    (["--retune", "--retune-epochs", "2,1"], "increasing"),
    (["--retune", "--retune-floor", "/nonexistent"], "does not exist"),
    (["--retune-floor", "/nonexistent"], "needs --retune"),
])
def test_evaluate_refuses_bad_retune_input_before_evaluating(flags, message, backdoored_run,
                                                              monkeypatch, capsys):
    import tscpurify.runs

    def evaluated(*args, **kwargs):
        raise AssertionError("evaluated before the re-tune input was checked")

    monkeypatch.setattr(tscpurify.runs, "evaluate_run", evaluated)
    assert main(["evaluate", str(backdoored_run), "--quiet", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_attack_help_lists_every_attack_s_arguments(capsys):
    assert main(["attack", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for listed in ("badnets: size=3", "blended: alpha=0.2", "sig: delta=", "wanet: k=4"):
        assert listed in text


def test_an_interrupt_python_wraps_is_still_an_interruption(backdoored_run, monkeypatch,
                                                             capsys):
    # Ctrl-C landing in a lazily imported module's dataclass definition reached the user as
    # "RuntimeError: Error calling __set_name__ ..." with a traceback (Python 3.11).
    import tscpurify.runs

    class Interrupting:
        def __set_name__(self, owner, name):
            raise KeyboardInterrupt

    def interrupted(*args, **kwargs):
        class Lazy:  # defining it is the point
            field = Interrupting()

    monkeypatch.setattr(tscpurify.runs, "evaluate_run", interrupted)
    assert main(["evaluate", str(backdoored_run)]) == 130
    assert capsys.readouterr().err == "interrupted\n"

    def bug(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(tscpurify.runs, "evaluate_run", bug)
    with pytest.raises(RuntimeError, match="a bug"):  # anything else keeps its traceback
        main(["evaluate", str(backdoored_run)])


def test_warnings_are_one_line(backdoored_run, monkeypatch, capsys):
    import warnings

    import tscpurify.runs

    real = tscpurify.runs.evaluate_run

    def warn_then_evaluate(*args, **kwargs):
        warnings.warn("the spec moves only 3% of the weights", UserWarning, stacklevel=2)
        return real(*args, **kwargs)

    monkeypatch.setattr(tscpurify.runs, "evaluate_run", warn_then_evaluate)
    assert main(["evaluate", str(backdoored_run)]) == 0
    assert capsys.readouterr().err == "warning: the spec moves only 3% of the weights\n"
