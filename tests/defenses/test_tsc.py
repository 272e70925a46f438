import json
import time

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from tscpurify.defenses import defend
from tscpurify.defenses.tsc import TSCSettings, finished_stage, purify
from tscpurify.errors import CheckpointError, DataError, SettingsError
from tscpurify.models import create_model
from tscpurify.settings import replace_settings

# batch_size None: the tests' loaders keep their own small batches.
TINY = replace_settings(TSCSettings(), rounds=2, epochs=1, lr=0.05, mid_init="random",
                        profile_points=3, ft_epochs=1, final_ft_epochs=1, batch_size=None)


@pytest.fixture()
def setup():
    torch.manual_seed(0)
    model = create_model("cnn", width=4, image_size=12).eval()
    x = torch.rand(48, 1, 12, 12)
    y = torch.randint(0, 10, (48,))
    return model, DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)


def test_purify_returns_a_new_model_and_never_mutates_its_input(setup):
    model, loader = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    purified, report = purify(model, loader, TINY, progress=False)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"purify changed the input's {key}"
    assert purified is not model and not model.training
    changed = [k for k, v in purified.state_dict().items()
               if v.is_floating_point() and not torch.equal(v, before[k])]
    assert changed, "purification must change the weights"
    assert [(s.round, s.stage) for s in report.stages] == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert all([p["t"] for p in s.profile] == [0.0, 0.4, 0.5, 1.0] and "loss" in s.profile[0]
               for s in report.stages)
    assert report.seconds["curve"] > 0 and report.seconds["permutation"] > 0


def test_stage_two_records_the_metrics_after_its_fine_tune(setup):
    model, loader = setup
    seen = []
    _, report = purify(model, loader, TINY, progress=False,
                       evaluate=lambda m: seen.append(m) or {"calls": float(len(seen))})
    stage_two = [s for s in report.stages if s.stage == 2]
    assert all(s.finetuned and s.finetuned["calls"] > s.metrics["calls"] for s in stage_two)
    assert all(not s.finetuned for s in report.stages if s.stage == 1)
    _, report = purify(model, loader, TINY, progress=False, ft_epochs=0, final_ft_epochs=0)
    assert all(not s.finetuned for s in report.stages)


def test_an_evaluator_never_changes_the_result(setup):
    """The caller's evaluator may draw random numbers and switch modes; the purified weights
    must be those of a run without it (bench rows record stages through one)."""
    model, loader = setup

    def noisy_evaluator(m):
        m.train()  # a careless evaluator: the run must not depend on the mode it leaves
        torch.rand(1000)
        return {"drawn": float(torch.rand(1))}

    plain, _ = purify(model, loader, TINY, progress=False)
    evaluated, report = purify(model, loader, TINY, progress=False, evaluate=noisy_evaluator)
    for key, value in plain.state_dict().items():
        assert torch.equal(value, evaluated.state_dict()[key]), key
    assert all("drawn" in s.metrics for s in report.stages)
    assert report.seconds["caller_evaluation"] > 0


def test_every_phase_but_the_report_lies_within_the_total(setup):
    """The bench books a TSC row's time as total − caller_evaluation; the report's before/after
    measurements come after the total is taken, so they must not count as caller_evaluation
    (a slow evaluator once made a ViT row's seconds negative)."""
    model, loader = setup

    def slow_evaluator(m):
        time.sleep(0.3)  # far above the run's unbooked time (copies), so a mis-booking shows
        return {}

    _, report = purify(model, loader, TINY, progress=False, evaluate=slow_evaluator,
                       profile_points=0)
    inside = sum(v for k, v in report.seconds.items() if k not in ("total", "report"))
    assert inside <= report.seconds["total"]
    assert report.seconds["report"] >= 0.6  # the two report measurements


class Interrupt(Exception):
    pass


def test_resume_equals_uninterrupted(setup, tmp_path):
    model, loader = setup
    reference, _ = purify(model, loader, TINY, seed=3, progress=False)

    calls = {"n": 0}

    def crash_in_round_two(_model):
        calls["n"] += 1
        # 4 profile points per stage, plus one after round 0's fine-tune: round 0 is saved
        if calls["n"] > 9:
            raise Interrupt
        return {}

    with pytest.raises(Interrupt):
        purify(model, loader, TINY, seed=3, progress=False, resume_dir=tmp_path,
               evaluate=crash_in_round_two)
    saved = sorted(p.name for p in tmp_path.iterdir())
    assert "round0_stage2.json" in saved and "round1_stage2.json" not in saved
    # The public view of the stage store: what round 0 finished, nothing of round 1 yet.
    state, record = finished_stage(tmp_path, 0, 2)
    assert state.keys() == model.state_dict().keys() and (record.round, record.stage) == (0, 2)
    assert finished_stage(tmp_path, 1, 2) is None
    resumed, report = purify(model, loader, TINY, seed=3, progress=False, resume_dir=tmp_path)
    for key, value in reference.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert len(report.stages) == 4
    # Stages made with other settings or another seed are refused, not silently mixed in;
    # the profiles change no weight, so they may differ.
    with pytest.raises(SettingsError, match=r"or settings \(epochs: 1 there, 2 now\)"):
        purify(model, loader, TINY, seed=3, progress=False, resume_dir=tmp_path, epochs=2)
    with pytest.raises(SettingsError, match="seed: 3 there, 4 now"):
        purify(model, loader, TINY, seed=4, progress=False, resume_dir=tmp_path)
    other_batch = DataLoader(loader.dataset, batch_size=8, shuffle=True)
    with pytest.raises(SettingsError, match="batch_size: 16 there, 8 now"):
        purify(model, other_batch, TINY, seed=3, progress=False, resume_dir=tmp_path)
    fewer = DataLoader(TensorDataset(*loader.dataset[:32]), batch_size=16, shuffle=True)
    with pytest.raises(SettingsError, match="clean_images: 48 there, 32 now"):
        purify(model, fewer, TINY, seed=3, progress=False, resume_dir=tmp_path)
    # A folder saved before the loader was recorded still resumes.
    record = tmp_path / "settings.json"
    record.write_text(json.dumps({k: v for k, v in json.loads(record.read_text()).items()
                                  if k not in ("batch_size", "clean_images")}))
    again, _ = purify(model, loader, TINY, seed=3, progress=False, resume_dir=tmp_path,
                      profile_points=0)
    assert torch.equal(list(again.parameters())[-1], list(reference.parameters())[-1])
    # An identity (the input's weights digest, say) is always compared: stages saved without
    # one, or with another, are refused.
    with pytest.raises(SettingsError, match="weights_sha256: None there, 'abc' now"):
        purify(model, loader, TINY, seed=3, progress=False, resume_dir=tmp_path,
               resume_identity={"weights_sha256": "abc"})
    # Corrupt stage files give one clear error.
    (tmp_path / "round0_stage1.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(CheckpointError, match="round0_stage1.safetensors .* is corrupt"):
        purify(model, loader, TINY, seed=3, progress=False, resume_dir=tmp_path)
    record.write_text("{not json")
    with pytest.raises(CheckpointError, match="settings.json is corrupt"):
        purify(model, loader, TINY, seed=3, progress=False, resume_dir=tmp_path)


def test_label_free_loader_needs_a_label_free_loss(setup):
    model, _ = setup
    bare = DataLoader(TensorDataset(torch.rand(8, 1, 12, 12)), batch_size=4)
    with pytest.raises(DataError, match="bare images"):
        purify(model, bare, TINY, progress=False)
    with pytest.raises(DataError, match="needs labelled"):
        defend("ft", model, bare)


def test_registered_defenses_run_through_defend(setup):
    model, loader = setup
    result = defend("tsc", model, loader, TINY, progress=False, rounds=1, profile_points=0)
    assert len(result.details["report"].stages) == 2
    result = defend("ft", model, loader, progress=False, epochs=1)
    assert result.seconds["total"] > 0


def test_last_fine_tune_distils_only_with_the_default_loss(setup):
    model, loader = setup
    plain, _ = purify(model, loader, TINY, progress=False, rounds=1, distill=0.0)
    distilled, report = purify(model, loader, TINY, progress=False, rounds=1, distill=0.5)
    assert report.settings["distill"] == 0.5 and report.stages[-1].finetuned
    # Same seed, same curves: only the last fine-tune's objective differs.
    assert not torch.equal(list(plain.parameters())[-1], list(distilled.parameters())[-1])

    def label_free(model_fn, batch):
        return model_fn(batch[0]).logsumexp(1).mean()

    _, report = purify(model, loader, TINY, progress=False, rounds=1, distill=0.5,
                       loss_fn=label_free)
    assert report.settings["distill"] == 0.0, "a custom objective keeps the fine-tune plain"


def test_last_fine_tune_smooths_labels_only_with_the_default_loss(setup):
    model, loader = setup
    sharp, _ = purify(model, loader, TINY, progress=False, rounds=1, distill=0.0,
                      final_ft_label_smoothing=0.0)
    smooth, report = purify(model, loader, TINY, progress=False, rounds=1, distill=0.0,
                            final_ft_label_smoothing=0.2)
    assert report.settings["final_ft_label_smoothing"] == 0.2
    # Same seed, same curves: only the last fine-tune's targets differ.
    assert not torch.equal(list(sharp.parameters())[-1], list(smooth.parameters())[-1])

    def label_free(model_fn, batch):
        return model_fn(batch[0]).logsumexp(1).mean()

    _, report = purify(model, loader, TINY, progress=False, rounds=1,
                       final_ft_label_smoothing=0.2, loss_fn=label_free)
    assert report.settings["final_ft_label_smoothing"] == 0.0


def test_distill_settings_are_checked():
    with pytest.raises(SettingsError, match="distill"):
        TSCSettings(distill=1.5)
    with pytest.raises(SettingsError, match="distill_temperature"):
        TSCSettings(distill_temperature=0)
    with pytest.raises(SettingsError, match="label_smoothing"):
        TSCSettings(final_ft_label_smoothing=1.0)


def test_stage_two_control_point_can_start_at_the_stage_one_point(setup, monkeypatch):
    import tscpurify.defenses.tsc as tsc_module

    built = []

    class Recording(tsc_module.BezierCurve):
        def __init__(self, template, start, end, mid=None):
            super().__init__(template, start, end, mid)
            built.append((end, mid))

    monkeypatch.setattr(tsc_module, "BezierCurve", Recording)
    model, loader = setup
    purify(model, loader, TINY, progress=False, rounds=1, mid_init2="end")
    (_, stage_one_mid), (stage_two_end, stage_two_mid) = built
    assert stage_one_mid is not None  # stage 1 keeps the fresh initialisation
    assert stage_two_mid.keys() == dict(model.named_parameters()).keys()
    assert all(torch.equal(stage_two_mid[k], stage_two_end[k]) for k in stage_two_mid)
    with pytest.raises(SettingsError, match="mid_init2"):
        TSCSettings(mid_init2="middle")


def test_settings_batch_size_re_batches_the_clean_loader(setup, tmp_path):
    model, loader = setup
    seen = []

    def recording_ce(model_fn, batch):
        seen.append(len(batch[0]))
        return torch.nn.functional.cross_entropy(model_fn(batch[0]), batch[1])

    _, report = purify(model, loader, TINY, progress=False, rounds=1, batch_size=24,
                       resume_dir=tmp_path)
    assert report.settings["batch_size"] == 24
    assert json.loads((tmp_path / "settings.json").read_text())["batch_size"] == 24
    # A custom objective keeps the caller's batches (16), whatever the settings say.
    _, report = purify(model, loader, TINY, progress=False, rounds=1, batch_size=24,
                       loss_fn=recording_ce)
    assert report.settings["batch_size"] is None and set(seen) == {16}
    with pytest.raises(SettingsError, match="batch_size"):
        TSCSettings(batch_size=1)


def test_an_iterable_clean_set_is_refused_with_a_clear_error(setup):
    model, loader = setup

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(loader.dataset)

    stream = DataLoader(Stream(), batch_size=16)
    for batch_size in (None, 24):
        with pytest.raises(DataError, match="map-style"):
            purify(model, stream, TINY, progress=False, rounds=1, batch_size=batch_size)


@pytest.mark.parametrize("how", ["unalign", "random", "identity"])
def test_the_symmetry_ablation_changes_only_the_permutation(how, setup, monkeypatch):
    import tscpurify.defenses.tsc as tsc_module
    from tscpurify.permutation import weight_distance

    built, modes, draws = [], [], []

    class Recording(tsc_module.BezierCurve):
        def __init__(self, template, start, end, mid=None):
            super().__init__(template, start, end, mid)
            built.append((dict(start), dict(end)))

    real_match, real_random = tsc_module.match, tsc_module.random_permutation
    monkeypatch.setattr(tsc_module, "BezierCurve", Recording)
    monkeypatch.setattr(tsc_module, "match", lambda *a, mode, **k: modes.append(mode)
                        or real_match(*a, mode=mode, **k))
    monkeypatch.setattr(tsc_module, "random_permutation",
                        lambda *a, **k: draws.append(1) or real_random(*a, **k))
    model, loader = setup
    purify(model, loader, TINY, progress=False, rounds=1, permutation=how)
    (start_1, end_1), (start_2, end_2) = built
    params = [k for k, _ in model.named_parameters()]
    far = weight_distance({k: start_1[k] for k in params}, {k: end_1[k] for k in params})
    if how == "identity":  # no permutation anywhere: stage 1 connects the model to itself
        assert modes == [] and draws == [] and far == 0.0
        assert all(torch.equal(start_2[k], start_1[k]) for k in params)
    else:  # stage 1's far end is a permuted copy; stage 2 always aligns
        assert modes == (["unalign", "align"] if how == "unalign" else ["align"])
        assert draws == ([1] if how == "random" else []) and far > 0.1
    with pytest.raises(SettingsError, match="permutation must be one of"):
        TSCSettings(permutation="mirror")


def test_budget_resizes_curves_and_fine_tunes_together():
    paper = replace_settings(TSCSettings(), epochs=200, lr=0.02, cosine_t_max=100,
                             mid_init="linear", ft_epochs=10, ft_lr=1e-4, final_ft_epochs=0)
    resized = paper.at_budget(2460, 12)
    assert (resized.curve.epochs, resized.ft_epochs, resized.final_ft_epochs) == (34, 2, 0)
    assert resized.curve.cosine_t_max == 17  # half the curve, as 100 of 200
    assert TSCSettings().planned_steps(12) == 2460


def test_a_path_aware_last_fine_tune_is_anchored_at_the_aligned_suspect(setup, monkeypatch):
    import tscpurify.defenses.tsc as tsc_module

    anchors = []
    real = tsc_module.path_aware_loss

    def recording(loss_fn, anchor, rho):
        anchors.append((anchor, rho))
        return real(loss_fn, anchor, rho)

    monkeypatch.setattr(tsc_module, "path_aware_loss", recording)
    model, loader = setup
    plain, _ = purify(model, loader, TINY, progress=False, rounds=1)
    assert anchors == []
    aware, _ = purify(model, loader, TINY, progress=False, rounds=1, final_ft_path_aware=0.2)
    ((anchor, rho),) = anchors
    assert rho == 0.2 and anchor.keys() == model.state_dict().keys()
    # The anchor is the suspect model itself up to a permutation of its units.
    norms = sorted(float(v.float().norm()) for v in anchor.values())
    assert norms == pytest.approx(sorted(float(v.float().norm())
                                         for v in model.state_dict().values()))
    assert any(not torch.equal(plain.state_dict()[k], v) for k, v in aware.state_dict().items())
    with pytest.raises(SettingsError, match="final_ft_path_aware"):
        TSCSettings(final_ft_path_aware=1.0)


def test_each_stage_books_its_permutation_search_and_fine_tune(setup):
    from tscpurify.report.markdown import render_markdown

    model, loader = setup
    _, report = purify(model, loader, TINY, progress=False, rounds=1, profile_points=0)
    stage_one, stage_two = report.stages
    assert stage_one.seconds["permutation"] > 0 and stage_two.seconds["permutation"] > 0
    assert stage_two.seconds["finetune"] > 0 and stage_one.seconds["finetune"] == 0
    total = sum(sum(s.seconds.values()) for s in report.stages)
    assert total <= sum(v for k, v in report.seconds.items() if k != "total") + 1e-6
    text = render_markdown(report)
    assert "## Along the curves" not in text and "\n\n## Time" in text


class _OpaqueStem(torch.nn.Module):
    """Most of the weights, kept opaque: their units cannot be permuted."""

    def __init__(self) -> None:
        super().__init__()
        self.big = torch.nn.Linear(12 * 12, 256)  # the band images of tests/defenses

    def forward(self, x):
        return self.big(x.flatten(1)).relu()


def test_a_spec_that_moves_few_weights_is_warned_about(loader):
    model = torch.nn.Sequential(_OpaqueStem(), torch.nn.Linear(256, 8), torch.nn.ReLU(),
                                torch.nn.Linear(8, 10))
    settings = replace_settings(TSCSettings(), rounds=1, epochs=0, ft_epochs=0,
                                final_ft_epochs=0, profile_points=0)
    with pytest.warns(UserWarning, match=r"moves only \d+% of its weights"):
        _, report = purify(model, loader, settings, progress=False, leaf_modules=(_OpaqueStem,))
    assert report.symmetry["coverage"] < 0.5


def test_each_progress_bar_says_which_round_and_stage_it_is(setup, capsys):
    # A run is six or more bars, tens of minutes each on a CPU: each names its place.
    model, loader = setup
    purify(model, loader, TINY, progress=True)
    err = capsys.readouterr().err
    for label in ("TSC round 1/2 · stage 1 curve", "TSC round 1/2 · stage 2 curve",
                  "TSC round 1/2 · fine-tune", "TSC round 2/2 · stage 1 curve",
                  "TSC round 2/2 · stage 2 curve", "TSC round 2/2 · last fine-tune"):
        assert label in err
    # and one bar for the whole run, in steps: 2 rounds × 2 curves + 2 fine-tunes, 3 batches each
    assert "TSC: 100%" in err and "18/18" in err
