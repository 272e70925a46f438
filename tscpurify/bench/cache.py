"""Backdoored models cached by their settings hash, so benchmarks train each one once."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, OutputBusyError
from ..resume import FILE
from ..runs import train_backdoored
from ..settings import settings_hash
from ..training import TrainSettings

WAIT_SECONDS = 5.0


# TrainSettings fields added after models were cached, with the value every earlier model was
# trained with: left out of the key at that value, so those caches keep their names.
LATER_TRAIN_FIELDS = {"bf16": False, "optimizer": "sgd"}


def train_key(train: TrainSettings) -> dict[str, Any]:
    """The training settings as they enter a cached model's name."""
    return {k: v for k, v in asdict(train).items()
            if k not in LATER_TRAIN_FIELDS or v != LATER_TRAIN_FIELDS[k]}


def cached_folder(cache: str | Path, *, attack: str | None, model: str, seed: int,
                  train: TrainSettings, attack_args: dict[str, Any] | None = None,
                  model_args: dict[str, Any] | None = None, data: str = "fashion-mnist",
                  data_root: str | None = None) -> Path:
    """Where `cached_backdoored` keeps this model (trained or not yet)."""
    key = {"attack": attack, "attack_args": attack_args or {}, "model": model,
           "model_args": model_args or {}, "seed": seed, "train": train_key(train), "data": data}
    if data_root is not None:  # only when set, so caches made before the option stay valid
        key["data_root"] = str(data_root)
    return Path(cache) / f"{attack or 'clean'}-{model}-s{seed}-{settings_hash(key)}"


def cached_backdoored(cache: str | Path, *, attack: str | None, model: str, seed: int,
                      train: TrainSettings, attack_args: dict[str, Any] | None = None,
                      model_args: dict[str, Any] | None = None, data: str = "fashion-mnist",
                      data_root: str | None = None, device: str = "cpu",
                      progress: bool = False) -> Path:
    """The run folder of this backdoored model, training it first if it is not cached
    (attack None: the same model trained on clean data). The training saves each epoch
    aside (`.partial-<name>`), so that one cut short resumes where it was; a save it cannot
    use (another tool version's, damaged) is dropped and the model trained afresh."""
    folder = cached_folder(cache, attack=attack, model=model, seed=seed, train=train,
                           attack_args=attack_args, model_args=model_args, data=data,
                           data_root=data_root)
    partial = folder.parent / f".partial-{folder.name}"
    while not (folder / "metrics.json").exists():
        try:
            train_backdoored(folder, data=data, data_root=data_root, attack=attack,
                             attack_args=attack_args, model=model,
                             model_args=model_args, train=train, seed=seed, device=device,
                             progress=progress, overwrite=True, resume_dir=partial)
        except CheckpointError:
            # The bench's own save, unusable: the model is trained again from its first epoch.
            (partial / FILE).unlink(missing_ok=True)
        except OutputBusyError:
            # Another shard of the grid is training this very model: use it once it is done.
            time.sleep(WAIT_SECONDS)
    return folder


def run_metrics(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "metrics.json").read_text())
