"""The defense side of the pipeline: take a run folder, purify its model on a clean subset of
its training split, evaluate, and write the purified run folder with its report.

The clean subset is drawn from the *original* training images (never the poisoned copies),
stratified and seeded, and its indices are recorded. Test data and the attack record are used
only for evaluation, outside the defense.

When the run folder records its attack and holds a classifier, the report also measures
whether the backdoor stays gone (`tscpurify.retune`): the suspect and the purified model are
each re-tuned on a few poisoned samples, and, given a model trained without poison
(`retune_floor`), so is that floor.

Two curve objectives ("losses"):
- "ce", for classifiers: cross-entropy on the labelled clean subset;
- "simclr", the default for encoder run folders (TSC's self-supervised variant): NT-Xent on two
  augmented views of each clean image. The clean subset then enters the defense as images
  alone (`image_loader`: 1-tuple batches, no label tensor exists in the data set), so the
  purification cannot read a label; the point on the curves defaults to the spec's SSL value
  t = 0.25. Encoders are judged before, along and after by a linear probe on labelled data,
  which is evaluation, outside the defense.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from . import distributed as dist
from .checkpoint import WEIGHTS, read_sidecar, save_model, write_json
from .curve.contrastive import simclr_loss
from .curve.train import LossFn
from .data import ImageData, load_dataset, select_clean_subset
from .data.images import dataset_folders
from .data.subset import subset_size
from .data.views import SimCLRAugment
from .defenses.tsc import PRESETS, TSCSettings, purify
from .errors import CheckpointError, DataError, OutputError, SettingsError, TscpurifyError
from .evaluation import ProbeSettings
from .job import JobSettings, resolve_device
from .outputs import atomic_folder, check_out
from .permutation import model_distances
from .report.markdown import render_markdown
from .report.plots import plot_before_after, plot_profiles, plot_retune
from .report.schema import PurifyReport
from .retune import RetuneSettings, retune_profiles, retune_set
from .run_kinds import kind_of, resolve_loss
from .runs import check_recorded_attack, dataset_of, load_retune_floor, load_run
from .seeding import derive_seed
from .settings import replace_settings
from .sidecar import Sidecar

log = logging.getLogger(__name__)


DEFAULT_RETUNE = RetuneSettings()
# The TSC reference's SimCLR example takes its points at t = 0.25 (spec, "self-supervised
# variant"); kept as is, not tuned here. The "ssl" preset holds it.
SSL_T = PRESETS["ssl"].t


def ssl_settings(base: TSCSettings) -> TSCSettings:
    """Settings for the SimCLR loss: the "ssl" preset in place of the default one (the setting
    encoders were measured with), any other `base` moved to the SSL point t = 0.25 in both
    stages (unless it sets its own t2)."""
    return PRESETS["ssl"] if base == PRESETS["default"] else replace(base, t=SSL_T)


def resolve_settings(loss: str, settings: TSCSettings | None = None, preset: str = "default",
                     overrides: Mapping[str, Any] | None = None) -> TSCSettings:
    """A purification's TSC settings, composed in this one place for the CLI, `purify_run` and
    the demo: an explicit `settings` as given, else the named preset as the objective takes it
    (the SimCLR one: `ssl_settings`), then single-field `overrides` (checked by name and type).
    So `tscpurify purify ENC --epochs 10` and `purify_run(ENC, out, overrides={"epochs": 10})`
    run the same settings."""
    if settings is None:
        if preset not in PRESETS:
            raise SettingsError(f"unknown preset {preset!r}; choices: {', '.join(PRESETS)}")
        settings = OBJECTIVES[loss].preset(PRESETS[preset])
    return replace_settings(settings, **dict(overrides or {}))


def resolve_leaf_modules(model: nn.Module, names: Sequence[str]) -> tuple[type | str, ...]:
    """Module paths (e.g. "features.3") as they are, and class names (e.g. "GroupNorm",
    "DenseBlock") as the classes of the model's modules so named: what the CLI's
    --leaf-module takes, in the form `derive_spec` wants."""
    paths = {name for name, _ in model.named_modules()}
    classes = {type(m).__name__: type(m) for m in model.modules()}
    resolved: list[type | str] = []
    for name in names:
        if name in paths:
            resolved.append(name)
        elif name in classes:
            resolved.append(classes[name])
        else:
            raise SettingsError(f"--leaf-module {name!r} is neither a module path nor a module "
                                f"class of the model")
    return tuple(resolved)


def check_embeddings(model: nn.Module, example: torch.Tensor, arch: str = "the model") -> None:
    """The SimCLR loss compares model(x) of two views: it needs (N, D) outputs, D ≥ 2."""
    with torch.no_grad():
        out = model.eval()(example[:2])
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] < 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise SettingsError(f"--loss simclr needs a model whose forward returns (N, D) "
                            f"embeddings with D ≥ 2; {arch} returns {shape} for 2 images")


def unlabelled_subset(n: int, amount: float, seed: int) -> torch.Tensor:
    """Indices of a uniform, seeded sample of n images (`amount` < 1 a fraction, ≥ 1 a count):
    the label-free path draws its clean images without looking at labels, not even to
    stratify them."""
    count = subset_size(n, amount)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:count].sort().values


def image_loader(clean: ImageData, batch_size: int) -> DataLoader:
    """The clean subset as images alone: the data set holds no labels, batches are 1-tuples."""
    return DataLoader(clean.tensor_dataset(labels=False), batch_size=batch_size, shuffle=True)


@dataclass(frozen=True)
class CrossEntropyObjective:
    """The curves learn the labelled clean subset's cross-entropy (TSC's classifier default):
    a class-stratified subset, batches of (image, label), TSC's own loss."""

    name: str = "ce"

    def preset(self, settings: TSCSettings) -> TSCSettings:
        return settings

    def clean_indices(self, train: ImageData, amount: float, seed: int) -> torch.Tensor:
        return select_clean_subset(train.labels, amount, seed)

    def loader(self, clean: ImageData, batch_size: int) -> DataLoader:
        return DataLoader(clean.tensor_dataset(), batch_size=batch_size, shuffle=True)

    def loss_fn(self, model: nn.Module, clean: ImageData, sidecar: Sidecar,
                device: str) -> LossFn | None:
        return None  # TSC's cross-entropy


@dataclass(frozen=True)
class SimCLRObjective:
    """TSC's self-supervised variant: NT-Xent between two augmented views of each clean image.
    The subset is drawn without looking at labels and enters as images alone, so nothing
    downstream can read one; the points default to the SSL preset's t = 0.25."""

    name: str = "simclr"

    def preset(self, settings: TSCSettings) -> TSCSettings:
        return ssl_settings(settings)

    def clean_indices(self, train: ImageData, amount: float, seed: int) -> torch.Tensor:
        return unlabelled_subset(len(train), amount, seed)

    def loader(self, clean: ImageData, batch_size: int) -> DataLoader:
        return image_loader(clean, batch_size)

    def loss_fn(self, model: nn.Module, clean: ImageData, sidecar: Sidecar,
                device: str) -> LossFn | None:
        check_embeddings(model, clean.floats()[:2].to(device), sidecar.arch)
        # the encoder's own pre-training temperature, when its run folder records one
        temperature = ((sidecar.ssl or {}).get("simclr") or {}).get("temperature", 0.5)
        return simclr_loss(SimCLRAugment(), temperature)


Objective = CrossEntropyObjective | SimCLRObjective
OBJECTIVES: dict[str, Objective] = {o.name: o for o in (CrossEntropyObjective(),
                                                        SimCLRObjective())}


@contextlib.contextmanager
def keep_stages_on_error(partial: Path) -> Iterator[None]:
    """On failure, say on the error line where the finished stages are kept (a failed or
    interrupted run continues from them with --resume)."""
    try:
        yield
    except KeyboardInterrupt:
        if partial.exists():
            log.warning("finished stages are kept in %s; run again with --resume to continue",
                        partial)
        raise
    except (TscpurifyError, OSError) as err:
        if not partial.exists():
            raise
        if isinstance(err, CheckpointError) and str(partial) in str(err):
            raise  # the stages themselves are unusable: its advice is to start over, not resume
        hint = (f" (finished stages are kept in {partial}; run again with --resume to "
                f"continue from them)")
        if isinstance(err, TscpurifyError):
            raise type(err)(f"{err}{hint}") from None
        where = f": {err.filename}" if err.filename else ""
        raise OutputError(f"{err.strerror or err}{where}{hint}") from None


def weights_digest(run: Path) -> str:
    """sha256 of a run folder's weights file: the identity of the model being purified."""
    digest = hashlib.sha256()
    with open(run / WEIGHTS, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_report(report: PurifyReport, folder: Path) -> list[str]:
    """report.json, report.md and plots/*.png into `folder`; returns the plot paths."""
    report.to_json(folder / "report.json")
    (folder / "plots").mkdir(exist_ok=True)
    plots = []
    if plot_profiles(report, folder / "plots" / "curves.png"):
        plots.append("plots/curves.png")
    if plot_before_after(report, folder / "plots" / "before_after.png"):
        plots.append("plots/before_after.png")
    if plot_retune(report, folder / "plots" / "retune.png"):
        plots.append("plots/retune.png")
    (folder / "report.md").write_text(render_markdown(report, plots))
    return plots


def purify_run(run: str | Path, out: str | Path, settings: TSCSettings | None = None, *,
               preset: str = "default", overrides: Mapping[str, Any] | None = None,
               job: JobSettings | None = None, progress: bool = True, resume: bool = False,
               overwrite: bool = False, retune: RetuneSettings | None = DEFAULT_RETUNE,
               retune_floor: str | Path | None = None,
               source: str | None = None, trusted_arch: str | None = None,
               more_inputs: Sequence[str | Path] = (),
               leaf_modules: Sequence[str] = (),
               distributed: bool | None = None) -> PurifyReport:
    """Purify the model of run folder `run` with TSC and write the purified run folder `out`.

    Args:
        settings, preset, overrides: an explicit TSCSettings, else the named preset (for the
            SimCLR loss the SSL one), then single-field overrides (`resolve_settings`, the same
            composition as the CLI's --preset and flags).
        job: the clean data, loss, profile sizes, seed, device and threads (`JobSettings`,
            whose fields are the CLI's --clean-fraction, --loss, ... flags).
        retune: re-tuning settings for the robustness check of a classifier whose attack is
            recorded (None: no check); retune_floor: a run folder of the same architecture
            trained without poison, re-tuned the same way as the floor.
        source: the name recorded for the input run (default: `run` as given), for callers
            that build in a temporary folder and move the result into place (the demo).
        trusted_arch: the user's own architecture 'module:function' that the run's model.json
            names (imported only when given here: `checkpoint.build_model`).
        more_inputs: files or folders besides `run` that `out` must not overlap (the user's
            own weights file and data, when `run` is a temporary folder made from them).
        leaf_modules: module paths or class names the symmetry tracer keeps opaque
            (`resolve_leaf_modules`), as a SpecError's hint may ask.
        distributed: one purification on the processes of a launched job (docs/scaling.md);
            None (default): when this process was launched by torchrun. Every process calls
            purify_run alike; each computes on its shard of the clean data (on
            cuda:LOCAL_RANK when the device is CUDA), rank 0 alone evaluates, re-tunes and
            writes `out` (atomically, with the same resume rules), and every process returns
            rank 0's report once the folder is in place.
    """
    job = job if job is not None else JobSettings()
    device, seed = resolve_device(job.device), job.seed
    job.apply_threads()  # before anything computes: the count is part of the resume identity
    distributed = dist.launched() if distributed is None else distributed
    if distributed:
        device = dist.init(device)
        progress = progress and dist.is_main()
    main = dist.is_main() if distributed else True
    # The run's data set is an input too: an --out inside an image folder's split would become
    # a class of it, and every later load of that data set would fail.
    data_ref = read_sidecar(run).dataset
    inputs = [run, *more_inputs] + ([retune_floor] if retune_floor is not None else []) \
        + (dataset_folders(data_ref.name, data_ref.root) if data_ref is not None else [])
    # before anything is loaded; distributed, rank 0 checks and every process follows
    out = dist.on_main(check_out, out, overwrite, inputs) if distributed else \
        check_out(out, overwrite, inputs)
    model, sidecar, attack = load_run(run, device, trusted_arch)
    leaves = resolve_leaf_modules(model, leaf_modules)
    kind = kind_of(sidecar)
    loss = resolve_loss(kind, job.loss, run)
    if loss not in OBJECTIVES:  # a CLIP model's own objective needs image-caption pairs
        raise SettingsError(f"{run} holds a {kind.name} model, which needs its own objective: "
                            f"purify it from Python with tscpurify.purify_clip (docs/ssl.md)")
    objective = OBJECTIVES[loss]
    floor_model = (load_retune_floor(retune_floor, sidecar, device)
                   if retune_floor is not None else None)
    retuning = retune is not None and attack is not None and kind.retunable
    if retune_floor is not None and not retuning:
        raise SettingsError("a re-tune floor needs re-tuning on, a classifier and a recorded "
                            "attack")
    settings = resolve_settings(loss, settings, preset, overrides)
    dataset = dataset_of(sidecar, run)
    train = load_dataset(dataset.name, "train", dataset.root)
    test = load_dataset(dataset.name, "test", dataset.root)
    check_recorded_attack(attack, test, run)
    indices = objective.clean_indices(train, job.clean_fraction, derive_seed(seed, "clean"))
    clean = train.subset(indices)
    if retuning:  # draw the re-tuning set now, so a data set too small fails before any work
        try:
            retune_set(train, attack, retune, derive_seed(seed, "retune"))
        except DataError as err:
            raise DataError(f"{err}; re-tune with fewer images (RetuneSettings, "
                            f"--retune-images / --retune-poisoned) or not at all "
                            f"(--no-retune)") from None
    batch_size = settings.loader_batch_size()
    # No private generator: TSC re-seeds the global RNG at every stage, which is what makes a
    # resumed run shuffle exactly like an uninterrupted one.
    loss_fn = objective.loss_fn(model, clean, sidecar, device)
    loader = objective.loader(clean, batch_size)
    # Profiles along the curves are cheap: a fixed test subset (encoders: a small probe);
    # before and after use the whole test split (encoders: the probe their sidecar records).
    full_eval = kind.evaluator(sidecar, train, test, attack)
    if kind.needs_train_split:
        profile_eval = kind.evaluator(sidecar, train, test, attack, ProbeSettings(
            train_images=job.profile_train, test_images=job.profile_test, knn_k=0, seed=seed))
    else:
        profile_indices = torch.randperm(len(test),
                                         generator=torch.Generator().manual_seed(seed))
        # 0 = the whole test split, as for an encoder's probe (an empty subset crashed)
        profile_eval = kind.evaluator(sidecar, train, test.subset(
            profile_indices[:job.profile_test or None]), attack)

    partial = out.parent / f".{out.name}.stages"
    # What the saved stages depend on besides the settings: resuming over stages of another
    # model, clean subset or numeric environment would mix two runs into one result.
    identity = {"weights_sha256": weights_digest(Path(run)), "arch": sidecar.arch,
                "clean_indices_sha256": hashlib.sha256(
                    indices.numpy().astype("int64").tobytes()).hexdigest(),
                "loss": loss, "torch": torch.__version__, "threads": torch.get_num_threads(),
                "leaf_modules": sorted(leaf_modules)}
    with contextlib.ExitStack() as stack:
        def enter() -> Path:
            folder = stack.enter_context(atomic_folder(out, overwrite, inputs))
            stack.enter_context(keep_stages_on_error(partial))
            if partial.exists() and not resume:  # under the lock: no other run is using them
                shutil.rmtree(partial)
            return folder

        # Distributed: rank 0 holds the lock and builds the folder, the others compute their
        # shares alongside and wait for its report; a refusal or failure on rank 0 stops all.
        folder = dist.on_main(enter) if distributed else enter()
        purified, report = purify(model, loader, settings, loss_fn=loss_fn,
                                  evaluate=profile_eval, seed=seed, progress=progress,
                                  resume_dir=partial, resume_identity=identity,
                                  leaf_modules=leaves, distributed=distributed)

        def finish() -> PurifyReport:  # rank 0's part: evaluation, re-tuning, the folder
            report.before, report.after = full_eval(model), full_eval(purified)
            report.clean_indices = indices.tolist()
            report.environment = {"threads": torch.get_num_threads(),
                                  "torch": torch.__version__, "device": str(device)}
            if distributed:
                report.environment["processes"] = dist.world_size()
            began = time.perf_counter()
            # The attack-free depth diagnostic (docs/deep-purification.md): the clean images in
            # order, unaugmented.
            report.distance = model_distances(
                model, purified, DataLoader(TensorDataset(clean.floats()), batch_size=256),
                leaf_modules=tuple(leaves))
            report.seconds["distance"] = time.perf_counter() - began
            if retuning:
                began = time.perf_counter()
                report.retune = retune_profiles(
                    {"before": model, "after": purified, "floor": floor_model}, train, test,
                    attack, retune, seed=derive_seed(seed, "retune"), progress=progress)
                report.seconds["retune"] = time.perf_counter() - began
            report.source = {"run": source or str(run), "arch": sidecar.arch,
                             "kind": sidecar.kind, "loss": loss,
                             "attack": (attack.record() if attack else None)}
            if sidecar.evaluation is not None:
                report.source["evaluation"] = sidecar.evaluation
            save_model(purified, folder, replace(sidecar, purified_by={
                "defense": "tsc", "loss": loss, "settings": report.settings,
                "source": source or str(run)}))
            write_json(folder / "metrics.json", report.after)
            write_report(report, folder)
            if distributed:  # the folder in place before any process returns
                stack.close()
            return report

        report = dist.on_main(finish) if distributed else finish()
    if main:
        shutil.rmtree(partial, ignore_errors=True)
    return report


def summary(report: PurifyReport) -> dict[str, Any]:
    return {"before": report.before, "after": report.after,
            "seconds": round(report.seconds.get("total", 0.0), 1)}
