"""The re-tuning robustness evaluation: its set, its determinism, and that it tells a model that
never learned a backdoor from one that did. Tiny data and models, single-threaded."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import ClassVar

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from tscpurify.attacks import create_attack
from tscpurify.attacks.base import poison_dataset, to_pixels, to_uint8
from tscpurify.data import ImageData
from tscpurify.errors import DataError, SettingsError
from tscpurify.evaluation import evaluate
from tscpurify.models import create_model
from tscpurify.retune import RetuneSettings, retune_profile, retune_set
from tscpurify.training import TrainSettings, train_classifier

CLASSES = 4
SIZE = 12


@pytest.fixture(autouse=True)
def one_thread():
    """The machine is shared with a long benchmark: tiny models run single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def band_data(n: int, seed: int) -> ImageData:
    """1×12×12 uint8 images; class c lights up rows 3c..3c+2 in columns 1..8, plus noise.
    Columns 9..11 hold no band, so a 3×3 corner patch there is a trigger and nothing else."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % CLASSES
    pixels = torch.rand(n, 1, SIZE, SIZE, generator=g) * 0.3
    for c in range(CLASSES):
        pixels[labels == c, :, 3 * c:3 * c + 3, 1:-3] += 0.6
    return ImageData(to_uint8(pixels.clamp(0, 1)), labels, tuple("abcd"))


def indexed_data(n: int = 300, classes: int = 10) -> ImageData:
    """8×8 images whose two top-left pixels spell their own index (idx % 200, idx // 200), so
    a re-tuning set's image can be traced back to the training image it came from."""
    g = torch.Generator().manual_seed(5)
    images = torch.randint(0, 200, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
    index = torch.arange(n)
    images[:, 0, 0, 0] = (index % 200).to(torch.uint8)
    images[:, 0, 0, 1] = (index // 200).to(torch.uint8)
    labels = torch.randint(0, classes, (n,), generator=g)
    return ImageData(images, labels, tuple(str(c) for c in range(classes)))


def source_index(data: ImageData) -> torch.Tensor:
    return data.images[:, 0, 0, 0].long() + 200 * data.images[:, 0, 0, 1].long()


def fit(data: ImageData, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = create_model("cnn", num_classes=CLASSES, width=4, image_size=SIZE)
    loader = DataLoader(data.tensor_dataset(), batch_size=32, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    train_classifier(model, loader, TrainSettings(epochs=6, lr=0.05, augment=False),
                     progress=False)
    return model.eval()


# A 3×3 checkerboard in the band-free bottom-right corner (margin 0 keeps it off column 8).
PATCH = create_attack("badnets", target=0, rate=0.3, size=3, margin=0)


@pytest.fixture(scope="module")
def bands() -> tuple[ImageData, ImageData]:
    return band_data(400, seed=0), band_data(200, seed=1)


@pytest.fixture(scope="module")
def models(bands) -> dict[str, nn.Module]:
    """A model trained on clean data (the floor) and one trained with 30% poisoned data."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    train, _ = bands
    poisoned, _ = poison_dataset(train, PATCH, seed=0)
    trained = {"clean": fit(train, 0), "backdoored": fit(poisoned, 0)}
    torch.set_num_threads(before)
    return trained


# --- the set -------------------------------------------------------------------------------


@pytest.mark.parametrize("attack", [
    create_attack("badnets", target=3, size=2, margin=1),
    create_attack("badnets", size=2, margin=1, all_to_all=True),
    create_attack("sig", target=3),  # clean-label: the re-tuning set makes it dirty-label
], ids=["badnets", "badnets-all-to-all", "sig"])
def test_set_poisons_exactly_the_asked_victims_and_leaves_the_rest(attack):
    train = indexed_data()
    settings = RetuneSettings(images=150, poisoned=20)
    dirty = retune_set(train, attack, settings, seed=3)
    # The same seed without poison draws the same images (the draw ignores `poisoned`), so
    # the poisoned set can be compared position by position with the images it came from.
    clean = retune_set(train, attack, dataclasses.replace(settings, poisoned=0), seed=3)
    origin = source_index(clean)
    assert len(dirty) == 150 and len(origin.unique()) == 150
    assert torch.equal(clean.images, train.images[origin])
    assert torch.equal(clean.labels, train.labels[origin])
    changed = (dirty.images != clean.images).flatten(1).any(1)
    assert changed.sum() == 20
    assert attack.victims(clean.labels[changed]).all()
    assert torch.equal(dirty.images[changed],
                       to_uint8(attack.trigger(to_pixels(clean.images[changed]))))
    assert torch.equal(dirty.labels[changed],
                       attack.relabel(clean.labels[changed], train.num_classes))
    assert torch.equal(dirty.labels[~changed], clean.labels[~changed])
    if not attack.all_to_all:
        assert (dirty.labels[changed] == attack.target).all()


def test_set_is_deterministic_for_a_seed_and_differs_across_seeds():
    train = indexed_data()
    attack = create_attack("badnets", size=2, margin=1)
    settings = RetuneSettings(images=100, poisoned=10)
    first = retune_set(train, attack, settings, seed=0)
    torch.manual_seed(1234)  # the draw must not read the global generator
    torch.rand(10)
    again = retune_set(train, attack, settings, seed=0)
    other = retune_set(train, attack, settings, seed=1)
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)
    assert not torch.equal(source_index(first), source_index(other))


def test_set_errors_when_too_few_images_or_victims():
    train = indexed_data(n=100, classes=2)
    attack = create_attack("badnets", size=2, margin=1)
    with pytest.raises(DataError, match="training split has 100"):
        retune_set(train, attack, RetuneSettings(images=101, poisoned=1))
    # Half the images belong to the target class: 90 victims cannot be found among 100.
    with pytest.raises(DataError, match="victims"):
        retune_set(train, attack, RetuneSettings(images=100, poisoned=90))
    with pytest.raises(SettingsError, match="does not fit"):
        retune_set(train, create_attack("badnets", size=8, margin=1), RetuneSettings(100, 1))


# --- the profile ---------------------------------------------------------------------------


def test_profile_is_deterministic_ignores_the_global_rng_and_leaves_the_model(bands, models):
    train, test = bands
    # Dropout draws from the global generator: the profile must seed it from its own seed.
    model = nn.Sequential(models["clean"], nn.Dropout(0.3)).eval()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    settings = RetuneSettings(images=120, poisoned=12, batch_size=32, epochs=(1, 2))
    torch.manual_seed(7)
    state = torch.get_rng_state()
    first = retune_profile(model, train, test, PATCH, settings, seed=0)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's generator is untouched
    torch.rand(1000)  # disturb the global generator
    again = retune_profile(model, train, test, PATCH, settings, seed=0)
    other = retune_profile(model, train, test, PATCH, settings, seed=1)
    first.pop("seconds"), again.pop("seconds"), other.pop("seconds")
    assert first == again
    assert first != other
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    assert not model.training


def test_profile_reports_checkpoints_and_a_checkpoint_equals_a_shorter_run(bands, models):
    train, test = bands
    settings = RetuneSettings(images=100, poisoned=10, batch_size=32, epochs=(1, 3))
    long = retune_profile(models["clean"], train, test, PATCH, settings, seed=2)
    assert json.loads(json.dumps(long)) == long
    assert long["epochs"] == [1, 3] and len(long["acc"]) == len(long["asr"]) == 2
    assert long["images"] == 100 and long["poisoned"] == 10
    assert long["steps"] == 3 * math.ceil(100 / 32)
    assert RetuneSettings(**long["settings"]) == settings
    # Constant lr: the epoch-1 measurement of a 3-epoch run is a 1-epoch run.
    short = retune_profile(models["clean"], train, test, PATCH,
                           dataclasses.replace(settings, epochs=(1,)), seed=2)
    assert short["acc"] == long["acc"][:1] and short["asr"] == long["asr"][:1]
    assert short["steps"] == math.ceil(100 / 32)


class ModeSpy(nn.Module):
    """A linear classifier that logs, for every forward, whether gradients were on (re-tuning)
    and whether it was in train mode. The log is a class attribute: the profile re-tunes a
    deep copy, which shares it."""

    log: ClassVar[list[tuple[bool, bool]]] = []

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(SIZE * SIZE, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ModeSpy.log.append((torch.is_grad_enabled(), self.training))
        return self.linear(x.flatten(1))


def test_profile_retunes_in_train_mode_and_measures_in_eval_mode(bands):
    train, test = bands
    ModeSpy.log.clear()
    settings = RetuneSettings(images=64, poisoned=4, batch_size=32, epochs=(1, 2))
    retune_profile(ModeSpy().eval(), train, test, PATCH, settings, seed=0)
    tuning = [training for grad, training in ModeSpy.log if grad]
    measuring = [training for grad, training in ModeSpy.log if not grad]
    assert len(tuning) == 4 and all(tuning)
    assert len(measuring) >= 4 and not any(measuring)  # ACC and ASR at each checkpoint


def test_profile_tells_a_clean_model_from_a_backdoored_one(bands, models):
    """Few poisoned samples: the clean model stays at its floor while the backdoored model
    keeps (or regains) its backdoor. Many: even the clean model learns it, so the re-tune
    really trains on the poisoned set."""
    train, test = bands
    clean, backdoored = models["clean"], models["backdoored"]
    assert evaluate(clean, test, PATCH).asr < 5 and evaluate(backdoored, test, PATCH).asr > 95
    few = RetuneSettings(images=200, poisoned=2, batch_size=32, epochs=(1, 2))
    floor = retune_profile(clean, train, test, PATCH, few, seed=0)
    attacked = retune_profile(backdoored, train, test, PATCH, few, seed=0)
    assert max(floor["asr"]) < 20 and min(floor["acc"]) > 90
    assert min(attacked["asr"]) > 90 and min(attacked["acc"]) > 90
    many = RetuneSettings(images=400, poisoned=120, batch_size=32, epochs=(8,))
    assert retune_profile(clean, train, test, PATCH, many, seed=0)["asr"][-1] > 80


# --- settings ------------------------------------------------------------------------------


def test_settings_defaults_help_and_record_round_trip():
    settings = RetuneSettings()
    assert (settings.images, settings.poisoned, settings.lr, settings.momentum,
            settings.weight_decay, settings.batch_size, settings.epochs) == \
        (1000, 50, 0.01, 0.9, 0.0, 64, (1, 2, 5))
    assert all(f.metadata.get("help") for f in dataclasses.fields(RetuneSettings))
    record = json.loads(json.dumps(settings.as_dict()))
    assert record["epochs"] == [1, 2, 5] and RetuneSettings(**record) == settings
    hash(RetuneSettings(**record))


@pytest.mark.parametrize("changes", [
    {"epochs": ()}, {"epochs": (0, 1)}, {"epochs": (2, 2)}, {"epochs": (3, 1)},
    {"epochs": (1.5,)}, {"epochs": (True,)}, {"epochs": 5}, {"images": 0},
    {"poisoned": -1}, {"images": 10, "poisoned": 11}, {"lr": 0.0}, {"momentum": 1.0},
    {"momentum": -0.1}, {"weight_decay": -1e-4}, {"batch_size": 0},
], ids=str)
def test_settings_reject_bad_values(changes):
    with pytest.raises(SettingsError):
        RetuneSettings(**changes)
