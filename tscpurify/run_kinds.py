"""What a run folder's kind decides, chosen once from its sidecar (`kind_of`): the curve
objective it takes by default and those it refuses, how its model is judged, and whether the
re-tuning check applies. The CLI, `purify_run`, `evaluate_run` and the bench ask the kind; none
of them branches on the kind's name.

- "classifier": judged by its own predictions (ACC / ASR / RA on the test split); purified with
  cross-entropy on labelled clean data by default; re-tuned when its attack is recorded.
- "encoder" (SimCLR): its outputs are projections, not class scores, so it is judged by a
  linear probe trained on clean labelled data (the protocol its sidecar records), purified
  with the label-free SimCLR objective, and never re-tuned (the re-tuning attack is a
  classifier's).

- "clip": judged zero-shot (prompted class names), purified from Python with
  `tscpurify.purify_clip`, whose objective needs image-caption pairs; the CLI evaluates one
  but does not purify it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from .attacks.base import Attack
from .data import ImageData
from .errors import SettingsError
from .evaluation import ProbeSettings, encoder_metrics, evaluate, zero_shot_metrics
from .sidecar import Sidecar

Evaluate = Callable[[torch.nn.Module], dict[str, float]]


def probe_settings(sidecar: Sidecar) -> ProbeSettings:
    """How an encoder run says it is evaluated (defaults for a sidecar that does not say)."""
    recorded = (sidecar.evaluation or {}).get("probe") or {}
    try:
        return ProbeSettings(**recorded)
    except TypeError as err:
        raise SettingsError(f"the sidecar's evaluation.probe is not valid: {err}") from None


@dataclass(frozen=True)
class RunKind:
    name: str
    default_loss: str  # the curve objective "auto" means
    refused_losses: MappingProxyType  # objective → why not ({run} names the folder)
    retunable: bool  # whether the re-tuning check applies
    label: str  # how its metrics are introduced to a person
    needs_train_split: bool  # whether judging it needs the training split (a probe's data)

    def metrics(self, model: torch.nn.Module, sidecar: Sidecar | None, train: ImageData | None,
                test: ImageData, attack: Attack | None, probe: ProbeSettings | None = None
                ) -> dict[str, Any]:
        raise NotImplementedError

    def evaluator(self, sidecar: Sidecar | None, train: ImageData | None, test: ImageData,
                  attack: Attack | None, probe: ProbeSettings | None = None) -> Evaluate:
        """`metrics` as a function of the model alone (the harness's view, never a defense's),
        leaving out what was not measured; `probe` None judges an encoder as its sidecar
        records."""
        def measure(model: torch.nn.Module) -> dict[str, float]:
            metrics = self.metrics(model, sidecar, train, test, attack, probe)
            return {k: v for k, v in metrics.items() if v is not None}

        return measure


@dataclass(frozen=True)
class ClassifierKind(RunKind):
    name: str = "classifier"
    default_loss: str = "ce"
    refused_losses: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))
    retunable: bool = True
    label: str = ""
    needs_train_split: bool = False

    def metrics(self, model: torch.nn.Module, sidecar: Sidecar | None, train: ImageData | None,
                test: ImageData, attack: Attack | None, probe: ProbeSettings | None = None
                ) -> dict[str, Any]:
        """ACC / ASR / RA of the model's own predictions on `test` (None: not measurable)."""
        return evaluate(model, test, attack).as_dict()


@dataclass(frozen=True)
class EncoderKind(RunKind):
    name: str = "encoder"
    default_loss: str = "simclr"
    refused_losses: MappingProxyType = field(default_factory=lambda: MappingProxyType({
        "ce": "--loss ce needs a classifier, but {run} holds a self-supervised encoder "
              "(model.json kind 'encoder'): its outputs are projections, not class scores. Use "
              "--loss simclr (the default for encoders), which needs no labels"}))
    retunable: bool = False
    label: str = "linear probe "
    needs_train_split: bool = True

    def metrics(self, model: torch.nn.Module, sidecar: Sidecar | None, train: ImageData | None,
                test: ImageData, attack: Attack | None, probe: ProbeSettings | None = None
                ) -> dict[str, Any]:
        """Linear-probe ACC / ASR / RA (and kNN ACC if the protocol asks) over frozen
        features, by `probe` or else the protocol the sidecar records."""
        assert train is not None, "an encoder's probe learns from the training split"
        if probe is None:
            assert sidecar is not None, "an encoder is judged as its sidecar records"
            probe = probe_settings(sidecar)
        return encoder_metrics(model, train, test, attack, probe)


@dataclass(frozen=True)
class ClipKind(RunKind):
    name: str = "clip"
    default_loss: str = "clip"  # image-caption contrastive: tscpurify.purify_clip
    refused_losses: MappingProxyType = field(default_factory=lambda: MappingProxyType({
        loss: "{run} holds a CLIP model, purified from Python with tscpurify.purify_clip "
              "(its objective needs image-caption pairs; docs/ssl.md), not by --loss " + loss
        for loss in ("ce", "simclr")}))
    retunable: bool = False
    label: str = "zero-shot "
    needs_train_split: bool = False

    def metrics(self, model: torch.nn.Module, sidecar: Sidecar | None, train: ImageData | None,
                test: ImageData, attack: Attack | None, probe: ProbeSettings | None = None
                ) -> dict[str, Any]:
        """Zero-shot ACC / ASR / RA: each test image filed under the best-matching prompted
        class name."""
        return zero_shot_metrics(model, test, attack).as_dict()


KINDS = {kind.name: kind for kind in (ClassifierKind(), EncoderKind(), ClipKind())}


def kind_of(sidecar: Sidecar) -> RunKind:
    """The strategy for a run folder's kind (the sidecar has checked the name)."""
    return KINDS[sidecar.kind]


def make_evaluator(test: ImageData, attack: Attack | None) -> Evaluate:
    """ACC / ASR / RA of a classifier on `test`, as a function of the model alone."""
    return KINDS["classifier"].evaluator(None, None, test, attack)


def resolve_loss(kind: RunKind, requested: str, run: Any = "the run") -> str:
    """'ce' or 'simclr' for a run folder of `kind`: 'auto' takes the kind's default."""
    if requested == "auto":
        return kind.default_loss
    if requested in kind.refused_losses:
        raise SettingsError(kind.refused_losses[requested].format(run=run))
    return requested
