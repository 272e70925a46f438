"""Run kinds: chosen once from the sidecar, they decide the objective and how models are judged."""

import pytest
import torch

from tscpurify.checkpoint import save_model
from tscpurify.errors import SettingsError
from tscpurify.job import JobSettings
from tscpurify.purification import OBJECTIVES, purify_run
from tscpurify.run_kinds import KINDS, kind_of, resolve_loss
from tscpurify.sidecar import KINDS as SIDECAR_KINDS
from tscpurify.sidecar import Sidecar


def test_every_kind_a_sidecar_accepts_has_a_strategy():
    assert set(KINDS) == set(SIDECAR_KINDS)
    for name, kind in KINDS.items():
        assert kind_of(Sidecar(arch="cnn", kind=name)) is kind


@pytest.mark.parametrize("kind, requested, expected", [
    ("classifier", "auto", "ce"), ("classifier", "simclr", "simclr"),
    ("encoder", "auto", "simclr"), ("encoder", "ce", "--loss ce needs a classifier"),
    ("clip", "auto", "clip"), ("clip", "simclr", "purify_clip"),
])
def test_the_objective_follows_the_kind(kind, requested, expected):
    if expected in OBJECTIVES or expected == "clip":
        assert resolve_loss(KINDS[kind], requested) == expected
    else:
        with pytest.raises(SettingsError, match=expected):
            resolve_loss(KINDS[kind], requested, "runs/x")


def test_only_classifiers_are_re_tuned_and_only_encoders_need_the_training_split():
    assert [k.name for k in KINDS.values() if k.retunable] == ["classifier"]
    assert [k.name for k in KINDS.values() if k.needs_train_split] == ["encoder"]


def test_purify_refuses_a_clip_folder_before_any_work(tmp_path, fmnist_root):
    from tscpurify.models import create_model
    from tscpurify.sidecar import DataRef

    from .ssl.test_clip_model import TOKENIZER

    torch.manual_seed(0)
    model = create_model("clip", vocab=list(TOKENIZER.vocab), width=4, embed_dim=8,
                         text_width=8, text_heads=2)
    run = tmp_path / "clip"
    run.mkdir()
    save_model(model, run, Sidecar(arch="clip", kwargs=model.config, kind="clip",
                                   dataset=DataRef("fashion-mnist", str(fmnist_root))))
    with pytest.raises(SettingsError, match="tscpurify.purify_clip"):
        purify_run(run, tmp_path / "out", job=JobSettings(device="cpu"), progress=False)
    assert not (tmp_path / "out").exists()
