"""Epoch checkpoints (resume.py): a baseline cut short after an epoch resumes to the
very weights, steps and record of a run that was never stopped, and never mixes in a run with
other settings."""

import pytest
import torch
from torch.utils.data import DataLoader

from tscpurify.defenses import defend
from tscpurify.errors import CheckpointError
from tscpurify.resume import FILE, EpochCheckpoints

# Three epochs (rounds; for ANP passes over the loader: 15 iterations of its 5 batches) each:
# a cut after the first leaves two to resume. NAD and MCR count their two phases' epochs
# together, two each.
RESUMABLE = {
    "anp": dict(iterations=15),
    "distill": dict(epochs=3),
    "fine_pruning": dict(epochs=3),
    "fst": dict(epochs=3),
    "ft": dict(epochs=3),
    "ft_sam": dict(epochs=3),
    "ibau": dict(rounds=3, inner_passes=1),
    "mcr": dict(ft_epochs=2, epochs=2, mid_init="random", lr=0.05),
    "nad": dict(teacher_epochs=2, epochs=2, betas="50,50,50"),
    "sau": dict(epochs=3, pgd_steps=2),
}
# Where a run is cut (epochs saved): after the first epoch; for the two-phase defenses also
# at the end of the first phase and inside the second, which resumes after the draws between
# the phases (NAD's batch read to find its stages, MCR's re-seeding for a fresh control point).
CUTS = {"mcr": (1, 2, 3), "nad": (1, 2, 3)}


class SessionStopped(Exception):
    pass


def cut_after(epoch: int, monkeypatch) -> None:
    """The run stops right after saving `epoch` epochs (a session ending between two)."""
    real = EpochCheckpoints.save

    def save_then_stop(self, epochs, *args, **kwargs):
        real(self, epochs, *args, **kwargs)
        if epochs == epoch:
            raise SessionStopped

    monkeypatch.setattr(EpochCheckpoints, "save", save_then_stop)


def equal_records(a, b) -> bool:
    """Equal values, tensors and modules' states; wall-clock `seconds` entries (e.g. per curve
    epoch) are not compared."""
    if isinstance(a, torch.nn.Module):
        return isinstance(b, torch.nn.Module) and equal_records(a.state_dict(), b.state_dict())
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(equal_records(a[k], b[k]) for k in a
                                            if k != "seconds")
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(equal_records(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.mark.parametrize(("name", "cut"), [(name, cut) for name in sorted(RESUMABLE)
                                           for cut in CUTS.get(name, (1,))])
def test_a_run_cut_after_an_epoch_resumes_to_the_same_result(name, cut, trained_cnn,
                                                             band_data, tmp_path, monkeypatch):
    loader = DataLoader(band_data, batch_size=32, shuffle=True)  # shuffled by the seeded RNG
    whole = defend(name, trained_cnn, loader, progress=False, seed=3, **RESUMABLE[name])

    callbacks = {"resume_dir": tmp_path / "partial", "resume_interval": 0}
    with monkeypatch.context() as patch:
        cut_after(cut, patch)
        with pytest.raises(SessionStopped):
            defend(name, trained_cnn, loader, progress=False, seed=3, callbacks=callbacks,
                   **RESUMABLE[name])
    assert (tmp_path / "partial" / FILE).exists()
    torch.manual_seed(12345)  # whatever the process drew since, the resumed run restores it
    resumed = defend(name, trained_cnn, loader, progress=False, seed=3, callbacks=callbacks,
                     **RESUMABLE[name])

    assert resumed.steps == whole.steps
    for key, value in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key
    assert equal_records(resumed.details, whole.details)
    assert resumed.seconds["resumed"] > 0 and "resumed" not in whole.seconds


def test_saved_state_from_other_settings_is_refused(trained_cnn, band_data, tmp_path,
                                                    monkeypatch):
    loader = DataLoader(band_data, batch_size=32, shuffle=True)
    callbacks = {"resume_dir": tmp_path, "resume_interval": 0}
    with monkeypatch.context() as patch:
        cut_after(1, patch)
        with pytest.raises(SessionStopped):
            defend("ibau", trained_cnn, loader, progress=False, callbacks=callbacks, rounds=3)
    with pytest.raises(CheckpointError, match="another settings; delete it"):
        defend("ibau", trained_cnn, loader, progress=False, callbacks=callbacks, rounds=3,
               lr=1e-3)
    other_cell = {**callbacks, "resume_identity": {"cell": "abc"}}
    with pytest.raises(CheckpointError, match="another cell"):
        defend("ibau", trained_cnn, loader, progress=False, callbacks=other_cell, rounds=3)


def test_a_damaged_save_is_refused_with_its_path(trained_cnn, band_data, tmp_path):
    (tmp_path / FILE).write_bytes(b"not a checkpoint")
    loader = DataLoader(band_data, batch_size=32, shuffle=True)
    with pytest.raises(CheckpointError, match="cannot be read"):
        defend("ibau", trained_cnn, loader, progress=False, rounds=2,
               callbacks={"resume_dir": tmp_path})
    torch.save(torch.zeros(3), tmp_path / FILE)  # loadable, but not ours
    with pytest.raises(CheckpointError, match="not a tscpurify epoch checkpoint"):
        defend("ibau", trained_cnn, loader, progress=False, rounds=2,
               callbacks={"resume_dir": tmp_path})


def test_saves_wait_for_the_interval_and_the_last_epoch_is_never_saved(tmp_path):
    model = torch.nn.Linear(2, 2)
    every = EpochCheckpoints(tmp_path / "every", {}, interval=0)
    every.save(1, {"model": model}, {})
    every.save(2, {"model": model}, {}, final=True)
    assert torch.load(tmp_path / "every" / FILE, weights_only=True)["epochs"] == 1
    rarely = EpochCheckpoints(tmp_path / "rarely", {}, interval=3600)
    rarely.save(1, {"model": model}, {})
    assert not (tmp_path / "rarely").exists()
    EpochCheckpoints(None, {}, interval=0).save(1, {"model": model}, {})  # off: no folder
