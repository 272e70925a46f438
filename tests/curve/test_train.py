import math

import pytest
import torch
from torch import nn

from tscpurify.curve import (
    BezierCurve,
    CurveSettings,
    cross_entropy_loss,
    distillation_loss,
    path_aware_loss,
    to_device,
    train_curve,
)
from tscpurify.errors import SettingsError
from tscpurify.models import create_model


def separable(n: int = 48) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Images whose class is whether the top-left pixel is bright: linearly separable."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 4, 4, generator=g)
    y = (x[:, 0, 0, 0] > 0.5).long()
    return list(zip(x.split(16), y.split(16), strict=True))


def mlp_curve(seed: int = 0) -> BezierCurve:
    torch.manual_seed(seed)
    a = create_model("mlp", num_classes=2, image_size=4, hidden=(8,))
    b = create_model("mlp", num_classes=2, image_size=4, hidden=(8,))
    return BezierCurve(a, a.state_dict(), b.state_dict())


def test_settings_validate():
    with pytest.raises(SettingsError, match="lr > 0"):
        CurveSettings(lr=0)
    with pytest.raises(SettingsError, match="cosine_t_max"):
        CurveSettings(cosine_t_max=0)
    for momentum in (-0.1, 1.0, 1.5):  # 1.5 once ran (and diverged)
        with pytest.raises(SettingsError, match="0 ≤ momentum < 1"):
            CurveSettings(momentum=momentum)


def test_training_lowers_the_loss_and_keeps_endpoints():
    curve = mlp_curve()
    start = {k: v.clone() for k, v in curve.start.state_dict().items()}
    data = separable()
    loss_fn = cross_entropy_loss()
    with torch.no_grad():
        before = sum(float(loss_fn(curve.as_function(0.5), b)) for b in data)
    settings = CurveSettings(epochs=30, lr=0.2, cosine_t_max=None)
    log = train_curve(curve, data, loss_fn, settings, progress=False,
                      generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        after = sum(float(loss_fn(curve.as_function(0.5), b)) for b in data)
    assert log[-1]["loss"] < 0.7 * log[0]["loss"]
    assert after < 0.5 * before
    assert all(torch.equal(v, start[k]) for k, v in curve.start.state_dict().items())


def test_same_generator_seed_gives_identical_mid():
    mids = []
    for seed in (7, 7, 8):
        curve = mlp_curve()
        train_curve(curve, separable(), cross_entropy_loss(), CurveSettings(epochs=3),
                    progress=False, generator=torch.Generator().manual_seed(seed))
        mids.append(torch.cat([p.detach().flatten() for p in curve.parameters()]))
    assert torch.equal(mids[0], mids[1])
    assert not torch.equal(mids[0], mids[2])  # the seed matters, so the test can fail


def test_l2_regulariser_is_applied_at_the_drawn_t():
    # With a zero task loss, no momentum and no weight decay, one step moves mid by
    # -lr · 0.5 · l2_reg · ∂‖θ(t)‖²/∂mid = -lr · l2_reg · 2t(1−t) · θ(t).
    curve = mlp_curve()
    settings = CurveSettings(epochs=1, lr=0.5, momentum=0.0, weight_decay=0.0, l2_reg=0.1)
    t = float(torch.rand((), generator=torch.Generator().manual_seed(3)))
    theta = {k: v.detach().clone() for k, v in curve.weights(t).items()}
    mid = {k: curve.mid[k.replace(".", "-")].detach().clone() for k in curve.keys}

    def zero_loss(model_fn, batch):
        return 0.0 * model_fn(batch[0]).sum()

    train_curve(curve, separable(16), zero_loss, settings, progress=False,
                generator=torch.Generator().manual_seed(3))
    for k in curve.keys:
        expected = mid[k] - 0.5 * 0.1 * 2 * t * (1 - t) * theta[k]
        torch.testing.assert_close(curve.mid[k.replace(".", "-")].detach(), expected)


def test_cosine_schedule_per_epoch_and_callbacks():
    seen = []
    settings = CurveSettings(epochs=4, lr=0.1, cosine_t_max=2)
    log = train_curve(mlp_curve(), separable(16), cross_entropy_loss(), settings,
                      progress=False, callbacks=[lambda e, entry: seen.append((e, entry))])
    lrs = [entry["lr"] for entry in log]
    # T_max=2: down to 0 at epoch 2, then back up, as the reference's 200 epochs with T_max 100.
    assert lrs == pytest.approx([0.1, 0.05, 0.0, 0.05], abs=1e-9)
    assert [e for e, _ in seen] == [0, 1, 2, 3] and seen[-1][1] is log[-1]
    assert all(set(entry) >= {"loss", "lr", "seconds"} for entry in log)
    log = train_curve(mlp_curve(), separable(16), cross_entropy_loss(),
                      CurveSettings(epochs=4, lr=0.1, cosine_t_max=None), progress=False)
    assert log[2]["lr"] == pytest.approx(0.1 * (1 + math.cos(math.pi / 2)) / 2)


def test_cross_entropy_helper_augments_and_serves_plain_modules():
    calls = []

    def augment(x):
        calls.append(x.shape)
        return x.flip(-1)

    model = create_model("mlp", num_classes=2, image_size=4, hidden=(8,))
    x, y = separable(16)[0]
    loss = cross_entropy_loss(augment)(model, (x, y, "extra"))
    expected = nn.functional.cross_entropy(model(x.flip(-1)), y)
    assert calls == [x.shape] and torch.equal(loss, expected)


def test_to_device_walks_containers():
    batch = {"a": (torch.ones(1), [torch.zeros(2)]), "b": 3}
    moved = to_device(batch, torch.device("cpu"))
    assert isinstance(moved["a"], tuple) and isinstance(moved["a"][1], list)
    assert moved["b"] == 3 and torch.equal(moved["a"][1][0], torch.zeros(2))


def test_distillation_is_zero_against_itself_and_pulls_toward_the_teacher():
    torch.manual_seed(0)
    teacher = create_model("mlp", num_classes=2, image_size=4, hidden=(8,)).eval()
    student = create_model("mlp", num_classes=2, image_size=4, hidden=(8,)).eval()
    x, _ = separable()[0]
    pure = distillation_loss(teacher, weight=1.0)

    def value(model):
        with torch.no_grad():
            return float(pure(model, x))

    # Label-free at weight 1: bare images are enough, and a copy of the teacher scores zero.
    assert value(teacher) == pytest.approx(0.0, abs=1e-6)
    before = value(student)
    assert before > 1e-3
    optimizer = torch.optim.SGD(student.parameters(), lr=0.5)
    for _ in range(50):
        optimizer.zero_grad()
        pure(student, x).backward()
        optimizer.step()
    assert value(student) < 0.2 * before
    assert all(p.grad is None for p in teacher.parameters()), "the teacher must stay frozen"


def test_distillation_mixes_in_the_labels():
    torch.manual_seed(0)
    model = create_model("mlp", num_classes=2, image_size=4, hidden=(8,)).eval()
    batch = separable()[0]
    with torch.no_grad():
        mixed = distillation_loss(model, weight=0.25)(model, batch)
        ce = cross_entropy_loss()(model, batch)
    assert float(mixed) == pytest.approx(0.75 * float(ce), rel=1e-5)


def test_path_aware_loss_is_the_loss_at_the_shifted_point_with_a_scaled_gradient():
    torch.manual_seed(0)
    model = create_model("mlp", num_classes=2, image_size=4, hidden=(8,)).eval()
    anchor_model = create_model("mlp", num_classes=2, image_size=4, hidden=(8,)).eval()
    anchor = anchor_model.state_dict()
    batch = separable()[0]
    ce = cross_entropy_loss()
    # rho = 0 is the plain loss.
    with torch.no_grad():
        assert float(path_aware_loss(ce, anchor, 0.0)(model, batch)) == pytest.approx(
            float(ce(model, batch)), rel=1e-6)
    # rho = 0.3: the loss of the model a third of the way to the anchor ...
    shifted = create_model("mlp", num_classes=2, image_size=4, hidden=(8,)).eval()
    with torch.no_grad():
        for (k, p), q in zip(model.named_parameters(), shifted.parameters(), strict=True):
            q.copy_(0.7 * p + 0.3 * anchor[k])
    loss = path_aware_loss(ce, anchor, 0.3)(model, batch)
    assert loss.item() == pytest.approx(ce(shifted, batch).item(), rel=1e-5)
    # ... whose gradient reaches the model's parameters scaled by 1 - rho, never the anchor.
    loss.backward()
    ce(shifted, batch).backward()
    for p, q in zip(model.parameters(), shifted.parameters(), strict=True):
        torch.testing.assert_close(p.grad, 0.7 * q.grad)
    assert all(p.grad is None for p in anchor_model.parameters())
    with pytest.raises(SettingsError, match="rho"):
        path_aware_loss(ce, anchor, 1.0)


def test_label_smoothing_raises_the_loss_of_confident_right_answers():
    teacher = create_model("mlp", num_classes=2, image_size=4, hidden=(8,)).eval()
    x, y = separable()[0]
    logits = torch.where(nn.functional.one_hot(y, 2).bool(), 20.0, -20.0)

    def confident(inputs):  # a model that is sure, and right
        return logits

    sharp = cross_entropy_loss()(confident, (x, y))
    smooth = cross_entropy_loss(label_smoothing=0.2)(confident, (x, y))
    assert float(sharp) < 1e-6 < float(smooth)
    with torch.no_grad():
        plain = distillation_loss(teacher, weight=0.5)(confident, (x, y))
        smoothed = distillation_loss(teacher, weight=0.5, label_smoothing=0.2)(confident, (x, y))
    assert float(smoothed) > float(plain)


@pytest.mark.parametrize("bf16", [False, True])
def test_bf16_autocasts_the_forward_and_keeps_the_control_point_float32(bf16):
    dtypes = []
    base = cross_entropy_loss()

    def recording(model_fn, batch):
        dtypes.append(model_fn(batch[0][:1]).dtype)
        return base(model_fn, batch)

    curve = mlp_curve()
    log = train_curve(curve, separable(), recording, CurveSettings(epochs=3, lr=0.1, bf16=bf16),
                      progress=False)
    assert set(dtypes) == {torch.bfloat16 if bf16 else torch.float32}
    assert all(p.dtype == torch.float32 for p in curve.parameters())
    assert all(math.isfinite(e["loss"]) for e in log) and log[-1]["loss"] < log[0]["loss"]


class _SessionStopped(Exception):
    pass


def test_curve_training_cut_after_an_epoch_resumes_from_its_checkpoints_identically(
        cnn_pair, images, tmp_path):
    from tscpurify.data.augment import random_crop_flip
    from tscpurify.resume import EpochCheckpoints

    class StopAfterOne(EpochCheckpoints):
        def save(self, epochs, *args, **kwargs):
            super().save(epochs, *args, **kwargs)
            if epochs == 1:
                raise _SessionStopped

    a, b = cnn_pair
    data = list(zip(images.split(8), (torch.arange(24) % 2).split(8), strict=True))
    settings = CurveSettings(epochs=3, lr=0.1, cosine_t_max=None)

    def run(checkpoints=None):
        torch.manual_seed(0)  # the augmentation's draws; the t are `generator`'s
        curve = BezierCurve(a, a.state_dict(), b.state_dict())
        log = train_curve(curve, data, cross_entropy_loss(random_crop_flip), settings,
                          progress=False, generator=torch.Generator().manual_seed(5),
                          checkpoints=checkpoints)
        return curve, log

    whole, whole_log = run()
    with pytest.raises(_SessionStopped):
        run(StopAfterOne(tmp_path, {}, interval=0))
    resumed, log = run(EpochCheckpoints(tmp_path, {}, interval=0))

    for module, expected in ((resumed, whole), (resumed.template, whole.template)):
        for key, value in expected.state_dict().items():  # the template: BN statistics
            assert torch.equal(module.state_dict()[key], value), key
    assert [(e["epoch"], e["loss"], e["lr"]) for e in log] == \
        [(e["epoch"], e["loss"], e["lr"]) for e in whole_log]
