import math

import pytest
import torch

from tscpurify.attacks import create_attack, poison_dataset
from tscpurify.data import load_dataset
from tscpurify.evaluation import evaluate
from tscpurify.models import create_model
from tscpurify.runs import make_loader
from tscpurify.training import TrainSettings, train_classifier


def test_a_tiny_model_learns_the_backdoor_and_the_task(fmnist_root):
    torch.manual_seed(0)
    train = load_dataset("fashion-mnist", "train", fmnist_root)
    test = load_dataset("fashion-mnist", "test", fmnist_root)
    attack = create_attack("badnets", size=4, pattern="white")
    poisoned, _ = poison_dataset(train, attack, seed=0)
    model = create_model("cnn", width=4)
    settings = TrainSettings(epochs=6, lr=0.05, batch_size=32, augment=False)
    losses = train_classifier(model, make_loader(poisoned, 32, shuffle=True), settings,
                              progress=False)
    assert losses[-1] < losses[0]
    metrics = evaluate(model, test, attack)
    assert metrics.acc > 60, metrics  # ten bands of light: easy for a CNN
    assert metrics.asr > 60, metrics  # chance is 10%


def test_bf16_training_autocasts_and_keeps_float32_weights():
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    model = create_model("cnn", width=4)
    seen = []
    model[-1].register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    data = TensorDataset(torch.rand(32, 1, 28, 28), torch.randint(0, 10, (32,)))
    losses = train_classifier(model, DataLoader(data, batch_size=16),
                              TrainSettings(epochs=2, bf16=True), progress=False)
    assert set(seen) == {torch.bfloat16} and all(math.isfinite(v) for v in losses)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_adamw_trains_and_an_unknown_optimizer_is_refused():
    from torch.utils.data import DataLoader, TensorDataset

    from tscpurify.errors import SettingsError

    torch.manual_seed(0)
    model = create_model("mlp", num_classes=2, image_size=4, hidden=(8,))
    x = torch.rand(64, 1, 4, 4)
    y = (x[:, 0, 0, 0] > 0.5).long()
    losses = train_classifier(model, DataLoader(TensorDataset(x, y), batch_size=16),
                              TrainSettings(epochs=20, lr=0.01, optimizer="adamw",
                                            augment=False), progress=False)
    assert losses[-1] < 0.5 * losses[0]
    with pytest.raises(SettingsError, match="optimizer must be one of"):
        TrainSettings(optimizer="lamb")


@pytest.mark.parametrize("changes", [{"momentum": -1.0}, {"momentum": 1.0},
                                     {"weight_decay": -1.0}])
def test_momentum_and_weight_decay_out_of_range_are_refused_up_front(changes):
    # torch.optim.SGD met these only once training began, as a ValueError traceback.
    from tscpurify.errors import SettingsError

    with pytest.raises(SettingsError, match="0 ≤ momentum < 1 and weight_decay ≥ 0"):
        TrainSettings(**changes)


class _SessionStopped(Exception):
    pass


def test_training_cut_after_an_epoch_resumes_from_its_checkpoints_to_the_same_weights(
        tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    from tscpurify.resume import EpochCheckpoints

    class StopAfterOne(EpochCheckpoints):
        def save(self, epochs, *args, **kwargs):
            super().save(epochs, *args, **kwargs)
            if epochs == 1:
                raise _SessionStopped

    data = TensorDataset(torch.rand(48, 1, 12, 12, generator=torch.Generator().manual_seed(0)),
                         torch.arange(48) % 4)
    settings = TrainSettings(epochs=3, lr=0.05, batch_size=16)  # augmentation draws too

    def run(checkpoints=None):
        torch.manual_seed(0)
        model = create_model("cnn", num_classes=4, width=4, image_size=12)
        seen = []
        losses = train_classifier(model, DataLoader(data, batch_size=16, shuffle=True),
                                  settings, progress=False, checkpoints=checkpoints,
                                  callbacks=[lambda epoch, _: seen.append(epoch)])
        return model, losses, seen

    whole, whole_losses, _ = run()
    with pytest.raises(_SessionStopped):
        run(StopAfterOne(tmp_path, {}, interval=0))
    resumed, losses, seen = run(EpochCheckpoints(tmp_path, {}, interval=0))

    assert seen == [1, 2] and losses == whole_losses  # epoch 0's loss from the save
    for key, value in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    assert not resumed.training


def test_checkpoints_are_refused_with_distributed_training():
    from torch.utils.data import DataLoader, TensorDataset

    from tscpurify.errors import SettingsError
    from tscpurify.resume import EpochCheckpoints

    model = create_model("mlp", num_classes=2, image_size=4, hidden=(8,))
    loader = DataLoader(TensorDataset(torch.rand(8, 1, 4, 4), torch.zeros(8).long()))
    with pytest.raises(SettingsError, match="one process only"):
        train_classifier(model, loader, TrainSettings(epochs=1), progress=False,
                         distributed=True, checkpoints=EpochCheckpoints(None, {}))
