"""The shared defense wrapper: copy the model (inputs are never mutated), seed, time, check."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..errors import DataError, SettingsError
from ..seeding import seed_everything
from ..settings import replace_settings, validate_settings
from .registered import DEFENSES


@dataclass
class DefenseResult:
    """What a defense returns: the repaired model and its own record of what it did."""

    model: nn.Module
    details: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    # Optimizer updates from clean mini-batches the defense really took (see budget.py).
    steps: int = 0


def loader_has_labels(loader: DataLoader) -> bool:
    batch = next(iter(loader))
    return isinstance(batch, (tuple, list)) and len(batch) >= 2


def defend(name: str, model: nn.Module, clean: DataLoader, settings: Any = None, *,
           seed: int = 0, progress: bool = True, callbacks: dict[str, Callable] | None = None,
           **overrides: Any) -> DefenseResult:
    """Run a registered defense on a deep copy of `model`.

    `settings` is the defense's settings dataclass (default: its defaults); keyword
    `overrides` replace single fields. `callbacks` are evaluation hooks the caller may pass
    (e.g. to profile a curve); the defense only calls them and never uses their results. TSC
    and MCR also take a `loss_fn` there. Every defense that trains takes a `resume_dir` there,
    with a `resume_identity` (what else its saved state depends on), and a run cut short
    resumes from what it saved to the same result as a run never stopped: TSC saves each
    finished stage; the others save after each epoch (ANP: each pass over the loader) at most
    once per `resume_interval` seconds (resume.py), and a resumed run's `seconds` hold
    `resumed`, the time the saved epochs took when they ran.
    """
    function = DEFENSES.get(name)
    meta = DEFENSES.meta[DEFENSES.name_of(name)]
    settings_cls = meta["settings"]
    settings = settings if settings is not None else settings_cls()
    if not isinstance(settings, settings_cls):
        raise SettingsError(f"defense {name!r} takes {settings_cls.__name__}, got "
                            f"{type(settings).__name__}")
    settings = replace_settings(settings, **overrides)
    validate_settings(settings)
    if len(clean.dataset) == 0:  # type: ignore[arg-type]
        raise DataError("the clean data loader is empty")
    # Read from the loader's settings, not from a batch: drawing a batch would advance a
    # loader's own generator and change the defense's shuffles (and CLP never reads data).
    trains = hasattr(settings, "planned_steps")
    norms = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if trains and norms and clean.batch_size == 1:
        raise DataError(f"defense {name!r} trains a model with BatchNorm layers, which need "
                        f"batches of 2 or more images; the loader gives batches of one")
    if meta.get("needs_labels") and not loader_has_labels(clean):
        raise DataError(f"defense {name!r} needs labelled clean data; the loader yields "
                        f"bare images")
    seed_everything(seed)
    model = copy.deepcopy(model)
    start = time.perf_counter()
    with torch.enable_grad():
        result = function(model, clean, settings, seed=seed, progress=progress,
                          callbacks=callbacks or {})
    result.seconds.setdefault("total", time.perf_counter() - start)
    result.model.eval()
    return result
