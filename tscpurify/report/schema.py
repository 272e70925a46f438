"""PurifyReport: the JSON record of a run; Markdown and plots are derived from it alone,
so a report can be re-rendered without re-running anything."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class StageRecord:
    """One stage of one round: the point taken, its metrics and the profile along the curve."""

    round: int
    stage: int
    t: float
    metrics: dict[str, float | None] = field(default_factory=dict)
    profile: list[dict[str, float]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    # After the round's clean fine-tune (stage 2 only; empty when no fine-tune ran).
    finetuned: dict[str, float | None] = field(default_factory=dict)


@dataclass
class PurifyReport:
    tool_version: str
    defense: str
    settings: dict[str, Any]
    seed: int
    clean_indices: list[int] = field(default_factory=list)
    before: dict[str, float | None] = field(default_factory=dict)
    after: dict[str, float | None] = field(default_factory=dict)
    stages: list[StageRecord] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    # Optimizer updates on clean mini-batches (curves and fine-tunes; defenses/budget.py).
    steps: int = 0
    # Re-tuning profiles (tscpurify.retune): "before" (the suspect model), "after" (the
    # purified one) and, when a clean model was given, "floor". Evaluation, never the defense's.
    retune: dict[str, Any] = field(default_factory=dict)
    # What the numbers depend on besides the settings: thread count, torch version, device.
    environment: dict[str, Any] = field(default_factory=dict)
    # The permutation symmetry used: its group count and the share of the weights it moves.
    symmetry: dict[str, Any] = field(default_factory=dict)
    # How far the purified model moved from the suspect one: relative L2 over the parameters,
    # "raw" and "aligned" (its units first matched to the suspect's; permutation.model_distances).
    # Needs no knowledge of the attack; whether it predicts depth is under study.
    distance: dict[str, float] = field(default_factory=dict)
    # (round, stage) of the stages loaded from a resume folder rather than run by this call:
    # `seconds` counts this call's work; each stage record keeps its own.
    resumed: list[list[int]] = field(default_factory=list)

    def to_json(self, path: Path) -> None:
        path.write_text(json.dumps(dataclasses.asdict(self), indent=1) + "\n")

    @classmethod
    def from_json(cls, path: Path) -> PurifyReport:
        data = json.loads(Path(path).read_text())
        data["stages"] = [StageRecord(**s) for s in data.get("stages", [])]
        return cls(**data)
