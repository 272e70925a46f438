"""The attack side of the pipeline: poison a data set, train a model on it, measure, save.

A run folder is the contract between attack and defense: weights.safetensors, model.json
(architecture, data set, attack record), metrics.json. Defenses read only the model and the
data set name; the attack record is for evaluation.

Two kinds of run folder exist, told apart by the sidecar's "kind":
- "classifier" (`train_backdoored`): a supervised model, judged by its own predictions;
- "encoder" (`train_encoder`): a SimCLR encoder, pre-trained without labels (on CTRL-poisoned
  images, or clean and then backdoored by BadEncoder), judged by a linear probe trained on clean
  labelled data; the sidecar's "evaluation" records the probe settings so every later
  measurement of the encoder (evaluate, purify before/after) uses the same protocol.
"""

from __future__ import annotations

import inspect
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch.nn import functional as F
from torch.utils.data import DataLoader

from .attacks import attack_from_record, create_attack, poison_dataset
from .attacks.badencoder import BadEncoderSettings, badencoder
from .attacks.base import Attack
from .checkpoint import WEIGHTS, load_model, load_weights, save_model, write_json
from .curve import recompute_bn_stats
from .data import ImageData, load_dataset, select_clean_subset
from .data.images import dataset_folders
from .errors import CheckpointError, DataError, SettingsError
from .evaluation import Metrics, ProbeSettings, encoder_metrics, evaluate, extract_features
from .job import AUTO_DEVICE, resolve_device
from .models import MODELS, create_model
from .models.factory import is_factory_path
from .outputs import atomic_folder
from .resume import EpochCheckpoints
from .retune import RetuneSettings, retune_profiles, retune_set
from .run_kinds import kind_of
from .seeding import derive_seed, seed_everything
from .sidecar import SIDECAR, DataRef, Sidecar
from .ssl import SimCLRSettings, pretrain_simclr
from .training import TrainSettings, train_classifier
from .version import __version__

log = logging.getLogger(__name__)


def model_kwargs(name: str, data: ImageData, extra: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments that fit a registered model to a data set's shape and classes."""
    accepted = inspect.signature(MODELS.get(name)).parameters
    kwargs = {"num_classes": data.num_classes, "in_channels": data.shape[0]}
    if "image_size" in accepted:
        kwargs["image_size"] = data.shape[1]
    return {**kwargs, **extra}


def make_loader(data: ImageData, batch_size: int, shuffle: bool, seed: int = 0,
                labels: bool = True) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(data.tensor_dataset(labels), batch_size=batch_size, shuffle=shuffle,
                      generator=generator if shuffle else None)


def train_backdoored(out: str | Path, *, data: str = "fashion-mnist", data_root: str | None = None,
                     attack: str | None = "badnets",
                     attack_args: dict[str, Any] | None = None,
                     model: str = "cnn", model_args: dict[str, Any] | None = None,
                     train: TrainSettings | None = None, seed: int = 0,
                     device: str = AUTO_DEVICE, progress: bool = True,
                     overwrite: bool = False, resume_dir: str | Path | None = None) -> Metrics:
    """Train a backdoored model and write its run folder; returns its metrics.

    `attack=None` trains the same model on clean data: the floor a re-tuning evaluation
    compares purified models with (its run folder records no attack). `resume_dir`: save the
    training after each epoch there (resume.py) and resume from it, so that a run cut
    short ends with the model an uninterrupted one trains; the save goes once the folder is
    written."""
    train = train or TrainSettings()
    device = resolve_device(device)
    seed_everything(seed)
    attack_obj = create_attack(attack, **(attack_args or {})) if attack is not None else None
    kwargs_extra = dict(model_args or {})
    MODELS.get(model)  # fail on an unknown name before loading any data
    # An image folder's splits are inputs: an --out inside one would become a class of it.
    with atomic_folder(out, overwrite, inputs=dataset_folders(data, data_root)) as folder:
        train_data = load_dataset(data, "train", data_root)
        test_data = load_dataset(data, "test", data_root)
        if train_data.shape != test_data.shape:
            raise DataError(f"train images are {train_data.shape}, test images {test_data.shape}")
        poisoned, indices = train_data, torch.zeros(0, dtype=torch.long)
        if attack_obj is not None:
            # Fit learned triggers (TrojanNN, LC) once, so the recorded attack is the fitted one.
            attack_obj.check(train_data.num_classes, train_data.shape)
            attack_obj = attack_obj.prepare(train_data, derive_seed(seed, "poison"))
            poisoned, indices = poison_dataset(train_data, attack_obj,
                                               derive_seed(seed, "poison"))
        kwargs = model_kwargs(model, train_data, kwargs_extra)
        net = create_model(model, **kwargs).to(device)
        loader = make_loader(poisoned, train.batch_size, shuffle=True, seed=seed)
        checkpoints = None
        if resume_dir is not None:
            checkpoints = EpochCheckpoints(
                Path(resume_dir),
                {"run": "train_backdoored", "data": data, "data_root": data_root,
                 "attack": attack, "attack_args": attack_args or {}, "model": model,
                 "model_args": kwargs, "train": train, "seed": seed, "device": str(device)},
                generators={"shuffle": loader.generator})
        start = time.perf_counter()
        train_classifier(net, loader, train, progress=progress,
                         desc=f"{attack or 'clean'} → {model}", checkpoints=checkpoints)
        seconds = time.perf_counter() - start
        if checkpoints is not None:
            seconds += checkpoints.resumed_seconds
        if not all(bool(torch.isfinite(v).all()) for v in net.state_dict().values()
                   if v.is_floating_point()):
            raise DataError("training diverged: the model's weights are NaN or infinite; "
                            "lower --lr")
        metrics = evaluate(net, test_data, attack_obj)
        save_model(net, folder, Sidecar(
            arch=MODELS.name_of(model), kwargs=kwargs, classes=tuple(train_data.classes),
            kind="classifier", dataset=DataRef(data, data_root),
            attack=attack_obj.record() if attack_obj is not None else None, seed=seed,
            train=asdict(train), poisoned=len(indices), tool_version=__version__))
        write_json(folder / "metrics.json", {**metrics.as_dict(), "train_seconds": seconds})
    if checkpoints is not None:
        checkpoints.discard()
    log.info("wrote %s: %s", out, metrics)
    return metrics


ENCODER_ATTACKS = ("none", "badencoder", "ctrl")


@dataclass(frozen=True)
class EncoderRunSettings:
    """The data sizes of an encoder run; the defaults finish in a few CPU-minutes (see README)."""

    train_images: int = field(default=5000, metadata={
        "help": "pre-training images: a class-stratified, seeded sample of the training split "
                "(0 = all). One SimCLR epoch over 5,000 images takes about 9 s on one busy "
                "CPU thread at width 16"})
    batch_size: int = field(default=256, metadata={
        "help": "SimCLR batch size (images per step, each seen in two views)"})
    shadow_images: int = field(default=2000, metadata={
        "help": "BadEncoder: unlabelled shadow images, a seeded sample of the pre-training "
                "images (the paper: a fifth of the pre-training set)"})
    shadow_batch_size: int = field(default=16, metadata={
        "help": "BadEncoder batch size. Small, so that 2,000 shadow images give 5,000 steps in "
                "40 epochs; at 256 (320 steps) the backdoor did not take (see README)"})
    reference_images: int = field(default=3, metadata={
        "help": "BadEncoder: target-class reference images the trigger is pulled toward, the "
                "most typical ones by the clean encoder's features (the paper: one, picked by "
                "hand; one random image may be one a probe files under another class)"})

    def __post_init__(self) -> None:
        if min(self.train_images, self.shadow_images) < 0 or self.batch_size < 1 \
                or self.shadow_batch_size < 1 or self.reference_images < 1:
            raise SettingsError(f"encoder runs need train_images, shadow_images ≥ 0, batch "
                                f"sizes ≥ 1 and reference_images ≥ 1; got {self}")


def encoder_trigger(attack: str, target: int, attack_args: dict[str, Any],
                    image_size: int = 32) -> Attack | None:
    """The trigger an encoder attack plants: CTRL's own, or for BadEncoder a BadNets patch,
    by default the BadEncoder paper's white 10×10 square at the bottom right of a 32×32 image,
    scaled to `image_size` (9×9 on Fashion-MNIST); `attack_args` override its fields."""
    if attack not in ENCODER_ATTACKS:
        raise SettingsError(f"unknown encoder attack {attack!r}; choices: "
                            f"{', '.join(ENCODER_ATTACKS)}")
    if attack == "none":
        if attack_args:
            raise SettingsError("--attack none takes no attack arguments")
        return None
    if attack == "ctrl":
        return create_attack("ctrl", target=target, **attack_args)  # arguments' types checked
    # BadEncoder poisons no data set: the BadNets rate is never used, only its patch.
    patch = {"size": max(1, round(10 * image_size / 32)), "pattern": "white", **attack_args}
    return create_attack("badnets", target=target, **patch)


def _sample(data: ImageData, count: int, seed: int) -> ImageData:
    """A class-stratified, seeded sample of `count` images (0 or ≥ len = everything)."""
    if count == 0 or count >= len(data):
        return data
    return data.subset(select_clean_subset(data.labels, count, seed))


@torch.no_grad()
def typical_images(encoder: torch.nn.Module, data: ImageData, target: int, count: int
                   ) -> torch.Tensor:
    """Indices of the `count` target-class images whose features (by `encoder`) are most
    cosine-similar to the class's mean feature: the clearest examples of the class, as an
    attacker picking BadEncoder's reference inputs by hand would choose them."""
    members = (data.labels == target).nonzero().flatten()
    if len(members) < count:
        raise DataError(f"BadEncoder needs {count} reference images of class {target}, the "
                        f"training split has {len(members)}")
    features = F.normalize(extract_features(encoder, data.subset(members).floats()), dim=1)
    typicality = features @ F.normalize(features.mean(0), dim=0)
    return members[typicality.topk(count).indices].sort().values


def train_encoder(out: str | Path, *, data: str = "fashion-mnist", data_root: str | None = None,
                  attack: str = "none", target: int = 0,
                  attack_args: dict[str, Any] | None = None, trunk: str = "cnn",
                  model_args: dict[str, Any] | None = None,
                  run: EncoderRunSettings | None = None, simclr: SimCLRSettings | None = None,
                  bad: BadEncoderSettings | None = None, probe: ProbeSettings | None = None,
                  seed: int = 0, device: str = AUTO_DEVICE, progress: bool = True,
                  overwrite: bool = False) -> dict[str, Any]:
    """Pre-train a SimCLR encoder, optionally backdoored, and write its run folder.

    Plan:
      1. sample the pre-training images (stratified, seeded) from the training split;
      2. CTRL: poison `rate` of them, all of the target class, with the frequency trigger;
      3. pre-train SimCLR on the images alone (no label is passed to the loop), then
         re-estimate BatchNorm statistics on the plain (un-augmented) images;
      4. BadEncoder: fine-tune the clean encoder on unlabelled shadow images so that triggered
         images embed like the `reference_images` most typical target-class images (BadNets
         patch trigger);
      5. judge it with a linear probe and kNN on clean labelled data (ACC, ASR, RA) and save
         weights.safetensors, model.json (kind "encoder", attack, evaluation) and metrics.json.
    Returns metrics.json's content.
    """
    run, simclr = run or EncoderRunSettings(), simclr or SimCLRSettings()
    bad, probe = bad or BadEncoderSettings(), probe or ProbeSettings()
    device = resolve_device(device)
    seed_everything(seed)
    encoder_trigger(attack, target, dict(attack_args or {}))  # bad arguments fail before data
    with atomic_folder(out, overwrite, inputs=dataset_folders(data, data_root)) as folder:
        train_data = load_dataset(data, "train", data_root)
        test_data = load_dataset(data, "test", data_root)
        if train_data.shape != test_data.shape:
            raise DataError(f"train images are {train_data.shape}, test images {test_data.shape}")
        trigger = encoder_trigger(attack, target, dict(attack_args or {}),
                                  min(train_data.shape[1:]))
        if trigger is not None:
            trigger.check(train_data.num_classes, train_data.shape)
        members = int((train_data.labels == target).sum())
        if attack == "badencoder" and members < run.reference_images:  # before pre-training
            raise DataError(f"BadEncoder needs {run.reference_images} reference images of class "
                            f"{target}, the training split has {members}")
        kwargs = {"trunk": trunk, "in_channels": train_data.shape[0], **(model_args or {})}
        encoder = create_model("simclr", **kwargs).to(device)
        # 1–2. The attacker picks target-class images by label; the victim sees images only.
        pretrain = _sample(train_data, run.train_images, derive_seed(seed, "pretrain"))
        record: dict[str, Any] = {"attack": attack, "pretrain_images": len(pretrain)}
        if attack == "ctrl":
            pretrain, indices = poison_dataset(pretrain, trigger, derive_seed(seed, "poison"))
            record["poisoned"] = len(indices)
        # 3.
        began = time.perf_counter()
        history = pretrain_simclr(
            encoder, make_loader(pretrain, run.batch_size, True, seed, labels=False), simclr,
            progress=progress)
        # SimCLR's running statistics describe augmented views; probes, users and a defender's
        # BatchNorm re-estimation all feed plain images. Re-estimated here, before any
        # backdoor fine-tuning, so that a defense re-estimating them later (TSC does, at every
        # point it takes) does not undo the attack through this mismatch alone.
        recompute_bn_stats(encoder, make_loader(pretrain, run.batch_size, False, labels=False))
        seconds = {"pretrain": time.perf_counter() - began}
        # 4.
        if attack == "badencoder":
            shadow = _sample(pretrain, run.shadow_images, derive_seed(seed, "shadow"))
            reference = typical_images(encoder, train_data, target, run.reference_images)
            began = time.perf_counter()
            encoder, log_ = badencoder(
                encoder, make_loader(shadow, run.shadow_batch_size, True, seed, labels=False),
                train_data.subset(reference).floats().to(device), trigger.trigger, bad,
                progress=progress)
            seconds["badencoder"] = time.perf_counter() - began
            record.update(shadow_images=len(shadow), reference_indices=reference.tolist(),
                          badencoder=asdict(bad), badencoder_loss=log_[-1] if log_ else None)
        # 5.
        began = time.perf_counter()
        metrics = encoder_metrics(encoder, train_data, test_data, trigger, probe)
        seconds["evaluation"] = time.perf_counter() - began
        save_model(encoder, folder, Sidecar(
            arch="simclr", kwargs=kwargs, classes=tuple(train_data.classes), kind="encoder",
            dataset=DataRef(data, data_root),
            attack=trigger.record() if trigger is not None else None,
            ssl={**record, "simclr": asdict(simclr), "run": asdict(run)},
            evaluation={"protocol": "linear_probe", "probe": asdict(probe)},
            seed=seed, tool_version=__version__))
        result = {**metrics, "simclr_loss": history, "seconds": seconds}
        write_json(folder / "metrics.json", result)
    log.info("wrote %s: %s", out, metrics)
    return result


def dataset_of(sidecar: Sidecar, folder: str | Path) -> DataRef:
    """The data set a run folder's model was trained on, which it must say."""
    if sidecar.dataset is None:
        raise DataError(f"{folder} does not say which data set it was trained on (model.json "
                        f"\"dataset\")")
    return sidecar.dataset


def load_run(folder: str | Path, device: str = "cpu", trusted_arch: str | None = None
             ) -> tuple[torch.nn.Module, Sidecar, Attack | None]:
    """Model, sidecar and (if recorded) the attack of a run folder (`trusted_arch`: the user's
    own importable architecture, see `checkpoint.build_model`)."""
    model, sidecar = load_model(folder, device, trusted_arch)
    attack = attack_from_record(sidecar.attack) if sidecar.attack else None
    count = len(sidecar.classes or ()) or sidecar.kwargs.get("num_classes")
    if attack is not None and isinstance(count, int) and not attack.all_to_all \
            and not 0 <= attack.target < count:
        # Scored against a class the model cannot output, ASR would read 0% for any model.
        raise CheckpointError(f"{Path(folder) / SIDECAR}: the recorded attack targets class "
                              f"{attack.target}, but the model has {count} classes")
    return model, sidecar, attack


def check_recorded_attack(attack: Attack | None, data: ImageData, folder: str | Path) -> None:
    """A recorded attack must fit the images it is scored on: a trigger larger than them (in a
    hand-edited or foreign model.json) would otherwise fail mid-evaluation with a traceback."""
    if attack is None:
        return
    try:
        attack.check(data.num_classes, data.shape)
    except SettingsError as err:
        raise CheckpointError(f"{Path(folder) / SIDECAR}: the recorded attack does not fit its "
                              f"data set: {err}") from None


def evaluate_run(folder: str | Path, device: str = AUTO_DEVICE, trusted_arch: str | None = None
                 ) -> dict[str, float | None]:
    """Recompute a run folder's metrics on its data set's test split: ACC/ASR/RA of a
    classifier, or linear-probe ACC/ASR/RA and kNN accuracy of an encoder."""
    model, sidecar, attack = load_run(folder, resolve_device(device), trusted_arch)
    dataset = dataset_of(sidecar, folder)
    kind = kind_of(sidecar)
    test_data = load_dataset(dataset.name, "test", dataset.root)
    check_recorded_attack(attack, test_data, folder)
    train_data = (load_dataset(dataset.name, "train", dataset.root)
                  if kind.needs_train_split else None)
    return kind.metrics(model, sidecar, train_data, test_data, attack)


def load_retune_floor(floor: str | Path, sidecar: Sidecar, device: str = "cpu"
                      ) -> torch.nn.Module:
    """The re-tuning floor: a classifier trained without poison on the data set `sidecar`
    names (so the floor and the model are re-tuned on the same images)."""
    model, floor_sidecar, floor_attack = load_run(floor, device)
    if floor_attack is not None or not kind_of(floor_sidecar).retunable:
        raise SettingsError(f"the re-tune floor {floor} must be a classifier trained without "
                            f"poison (tscpurify attack --attack none); its model.json records "
                            f"{floor_attack.name if floor_attack else 'an ' + floor_sidecar.kind}")
    if floor_sidecar.dataset != sidecar.dataset:
        raise SettingsError(f"the re-tune floor {floor} was trained on "
                            f"{floor_sidecar.dataset}, the model on {sidecar.dataset}")
    return model


def retune_run(folder: str | Path, settings: RetuneSettings, floor: str | Path | None = None,
               seed: int = 0, device: str = AUTO_DEVICE, progress: bool = False,
               trusted_arch: str | None = None) -> dict[str, dict[str, Any]]:
    """Re-tuning profiles (tscpurify.retune) of a classifier run folder whose attack is recorded,
    and of `floor`, the same architecture trained without poison, on the same images."""
    device = resolve_device(device)
    model, sidecar, attack = load_run(folder, device, trusted_arch)
    if attack is None or not kind_of(sidecar).retunable:
        raise SettingsError(f"re-tuning needs a classifier whose model.json records its attack; "
                            f"{folder} has {'none' if attack is None else 'an ' + sidecar.kind}")
    dataset = dataset_of(sidecar, folder)
    models = {"model": model}
    if floor is not None:
        models["floor"] = load_retune_floor(floor, sidecar, device)
    train = load_dataset(dataset.name, "train", dataset.root)
    test = load_dataset(dataset.name, "test", dataset.root)
    check_recorded_attack(attack, test, folder)
    retune_set(train, attack, settings, derive_seed(seed, "retune"))  # too small: fail now
    return retune_profiles(models, train, test, attack, settings,
                           seed=derive_seed(seed, "retune"), progress=progress)


def write_own_run(folder: str | Path, weights: str | Path, arch: str, *,
                  model_args: dict[str, Any] | None = None, data: str = "fashion-mnist",
                  data_root: str | None = None) -> Path:
    """Make `folder` (which must exist, empty) a run folder for a classifier trained outside
    tscpurify: its weights (`.safetensors` linked or copied, `.pt` converted; never unpickled)
    and a model.json naming its architecture, its data set and no attack, so it is evaluated
    on accuracy alone. `arch` is a registered model, sized to the data set as `attack` sizes
    it, or the user's own factory 'module:function', called with `model_args` only.

    Nothing is checked against the weights here: `load_run` on the result does that (shapes
    first, on the meta device, then finite values), with the user's `arch` trusted."""
    folder, weights = Path(folder), Path(weights)
    extra = dict(model_args or {})
    if is_factory_path(arch):
        kwargs = extra
    else:
        MODELS.get(arch)  # an unknown name fails here, with the registered ones listed
        kwargs = model_kwargs(arch, load_dataset(data, "test", data_root), extra)
    target = folder / WEIGHTS
    if weights.suffix == ".safetensors" and weights.is_file():
        try:
            os.link(weights, target)  # no copy of a large file when it is on the same disk
        except OSError:
            shutil.copyfile(weights, target)
    else:
        save_file({k: v.contiguous() for k, v in load_weights(weights).items()}, str(target))
    write_json(folder / SIDECAR, Sidecar(arch=arch, kwargs=kwargs, kind="classifier",
                                         dataset=DataRef(data, data_root), attack=None,
                                         tool_version=__version__).to_json())
    return folder
