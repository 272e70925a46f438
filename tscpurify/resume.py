"""Epoch checkpoints for long training runs (the baseline defenses; the bench's backdoored and
clean models, runs.train_backdoored): a run cut short (a stopped session, a lost worker)
resumes at its last saved epoch and ends with the same weights, steps and record as a run that
was never stopped.

A defense saves at the end of an epoch (or round) everything that the epochs after it read:
the model, its optimizer and scheduler, its own running record, and the random number
generators (torch's, CUDA's, Python's and numpy's), so that the next epoch's shuffles and draws
are the ones an uninterrupted run makes. Saving reads the generators and never draws from them.

The caller opts in by passing `resume_dir` (and a `resume_identity`, what else the saved state
depends on) in `defend`'s callbacks, as for TSC's stages. The file is written whole or not at
all, and loaded with `weights_only=True`: it holds only tensors and plain values. A file made
with other settings or another identity is refused, never mixed into this run.

Example (inside a defense):
    >>> checkpoints = EpochCheckpoints.from_callbacks(callbacks, "ibau", settings)
    >>> stateful = {"model": model, "optimizer": optimizer}
    >>> done, saved = checkpoints.resume(stateful)       # (0, {}) on a fresh start
    >>> for epoch in range(done, epochs):
    ...     ...
    ...     checkpoints.save(epoch + 1, stateful, {"history": history, "steps": steps})
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import CheckpointError
from .outputs import replaced_whole

FILE = "epochs.pt"
# The least time between two saves, so that a fast epoch loop on a big model does not spend
# its time writing; the last save may then be a few epochs back, never a wrong one.
SAVE_INTERVAL = 60.0


def generator_states() -> dict[str, Any]:
    """Every random number generator a defense draws from, as tensors and plain values."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    states = {"torch": torch.get_rng_state(),
              "python": random.getstate(),
              "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)),
                        "position": int(position), "has_gauss": int(has_gauss),
                        "gauss": float(gauss)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_generators(states: Mapping[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    saved = states["numpy"]
    np.random.set_state((saved["kind"], saved["keys"].numpy().astype(np.uint32),
                         saved["position"], saved["has_gauss"], saved["gauss"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _plain(value: Any) -> Any:
    """Settings and identities as JSON text, so that two runs compare by value."""
    return json.loads(json.dumps(asdict(value) if is_dataclass(value) else value,
                                 sort_keys=True, default=str))


class EpochCheckpoints:
    """The saved state of one training run, in `folder` (None: saving and resuming are off).

    `identity` is what the saved state depends on besides the epochs run: the defense, its
    settings and whatever the caller adds (its model, data and environment). `interval`: the
    least seconds between two saves (default SAVE_INTERVAL). `generators`: torch.Generators of
    the caller's own (a DataLoader's shuffle) saved and restored with the global ones.
    """

    def __init__(self, folder: Path | None, identity: Mapping[str, Any],
                 interval: float | None = None,
                 generators: Mapping[str, torch.Generator] | None = None) -> None:
        self.folder = Path(folder) if folder is not None else None
        self.identity = _plain(dict(identity))
        self.generators = dict(generators or {})
        self.interval = SAVE_INTERVAL if interval is None else interval
        self.started = time.perf_counter()
        self.last_save = self.started
        self.resumed_seconds = 0.0
        self.resumed_epochs = 0

    @classmethod
    def from_callbacks(cls, callbacks: Mapping[str, Any], defense: str, settings: Any
                       ) -> EpochCheckpoints:
        return cls(callbacks.get("resume_dir"),
                   {"defense": defense, "settings": settings,
                    **dict(callbacks.get("resume_identity") or {})},
                   interval=callbacks.get("resume_interval"))

    @property
    def path(self) -> Path | None:
        return self.folder / FILE if self.folder is not None else None

    def resume(self, stateful: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        """Load the last saved epoch into `stateful` (objects with `load_state_dict`) and the
        generators; returns (epochs done, the defense's saved record). (0, {}) if none."""
        if self.path is None or not self.path.exists():
            return 0, {}
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as err:  # a cut write never lands (replaced_whole); this is damage
            raise CheckpointError(f"{self.path} cannot be read ({type(err).__name__}); delete "
                                  f"it to start over") from None
        if not isinstance(saved, dict) or not {"identity", "state", "record"} <= saved.keys():
            raise CheckpointError(f"{self.path} is not a tscpurify epoch checkpoint; delete it "
                                  f"to start over")
        if saved.get("identity") != self.identity:
            changed = sorted(k for k in self.identity.keys() | saved.get("identity", {}).keys()
                             if self.identity.get(k) != saved.get("identity", {}).get(k))
            raise CheckpointError(f"{self.path} was saved by a run with another "
                                  f"{', '.join(changed)}; delete it to start over")
        own = saved.get("generators", {}).get("own", {})
        if set(saved["state"]) != set(stateful) or set(own) != set(self.generators):
            raise CheckpointError(f"{self.path} does not hold this run's state; delete it "
                                  f"to start over")
        for name, obj in stateful.items():
            obj.load_state_dict(saved["state"][name])
        restore_generators(saved["generators"])
        for name, generator in self.generators.items():
            generator.set_state(own[name])
        self.resumed_seconds = float(saved["seconds"])
        self.resumed_epochs = int(saved["epochs"])
        return self.resumed_epochs, saved["record"]

    def save(self, epochs: int, stateful: Mapping[str, Any], record: Mapping[str, Any],
             final: bool = False) -> None:
        """Save the state after `epochs` epochs, unless the last save was under `interval`
        seconds ago (`final` never saves: the run is about to return its result)."""
        now = time.perf_counter()
        if self.folder is None or final or now - self.last_save < self.interval:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        payload = {"identity": self.identity, "epochs": epochs,
                   "seconds": self.resumed_seconds + now - self.started,
                   "state": {name: obj.state_dict() for name, obj in stateful.items()},
                   "record": dict(record),
                   "generators": {**generator_states(),
                                  "own": {name: generator.get_state()
                                          for name, generator in self.generators.items()}}}
        with replaced_whole(self.path) as temporary:
            torch.save(payload, temporary)
        self.last_save = time.perf_counter()

    def discard(self) -> None:
        """Delete the save (the run's result is written): only the file this class writes."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # the folder may hold something else
                self.folder.rmdir()

    def seconds(self) -> dict[str, float]:
        """For the result's `seconds`: the time the resumed epochs took when they ran."""
        return {"resumed": self.resumed_seconds} if self.resumed_epochs else {}


class _Slot:
    """An entry of a phased run's one save, bound to the object its phase's loop builds (an
    optimiser, a curve...) once that phase starts. An unbound slot saves as empty and ignores
    what loads into it: a phase not yet reached has nothing to keep, and one already reached
    resumes from the save again once bound (`_Phase.resume`)."""

    def __init__(self) -> None:
        self.target: Any = None

    def state_dict(self) -> dict[str, Any]:
        return self.target.state_dict() if self.target is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.target is not None:
            self.target.load_state_dict(state)


class PhasedCheckpoints:
    """One save for a defense that runs several training loops in a row (NAD's teacher and then
    its student, MCR's endpoint and then its curve), whose epochs count over the whole run.

    `phases` maps each phase, in order, to (its epochs, the names of what its loop saves: the
    `stateful` keys of `train_classifier`, `train_curve` or the defense's own loop, which must
    be known before the first phase resumes, since a save holds them all). `phase(name)` is the
    view that loop takes as its `checkpoints`; its record is saved under the phase's name.

    Example (inside a defense):
        >>> run = PhasedCheckpoints(EpochCheckpoints.from_callbacks(callbacks, "nad", settings),
        ...                         {"teacher": (2, CLASSIFIER_STATE), "student": (8, names)})
        >>> train_classifier(teacher, clean, train, checkpoints=run.phase("teacher"))
    """

    def __init__(self, checkpoints: EpochCheckpoints,
                 phases: Mapping[str, tuple[int, Sequence[str]]]) -> None:
        self.checkpoints = checkpoints
        self.first, first = {}, 0
        for name, (epochs, _) in phases.items():
            self.first[name], first = first, first + epochs
        self.epochs = first
        self.lengths = {name: epochs for name, (epochs, _) in phases.items()}
        self.slots = {f"{name}.{entry}": _Slot()
                      for name, (_, entries) in phases.items() for entry in entries}
        self.done = 0
        self.record: dict[str, Any] = {}

    def phase(self, name: str) -> _Phase:
        return _Phase(self, name)

    def seconds(self) -> dict[str, float]:
        return self.checkpoints.seconds()


class _Phase:
    """One phase's view of a `PhasedCheckpoints` (the `Checkpoints` protocol of curve/train.py).

    The first phase resumes from the save. A later one resumes from it again when the save holds
    some of its epochs, so that its random generators are the save's, whatever ran between the
    phases (a fresh control point re-seeds the global generator; reading a batch draws a
    shuffle); otherwise it starts afresh from where the phases before it left them."""

    def __init__(self, run: PhasedCheckpoints, name: str) -> None:
        self.run, self.name = run, name
        self.first, self.epochs = run.first[name], run.lengths[name]

    def resume(self, stateful: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        run = self.run
        for entry, obj in stateful.items():
            run.slots[f"{self.name}.{entry}"].target = obj
        if self.first == 0 or run.done > self.first:
            run.done, run.record = run.checkpoints.resume(run.slots)
        done = min(max(run.done - self.first, 0), self.epochs)
        return done, dict(run.record.get(self.name, {}))

    def save(self, epochs: int, stateful: Mapping[str, Any], record: Mapping[str, Any],
             final: bool = False) -> None:
        run = self.run
        run.record[self.name] = dict(record)
        run.checkpoints.save(self.first + epochs, run.slots, run.record,
                             final=self.first + epochs == run.epochs)
