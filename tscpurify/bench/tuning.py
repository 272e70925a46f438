"""One tuning rule for every defense, TSC included.

A grid's [tuning] section lists, for each defense it tunes, the same number of candidate
settings (at most 4, one of them the published default), and the tuning models: BadNets and
Blended backdoors at seeds ≥ 100, never a benchmark seed. Every candidate runs on every tuning
model at the grid's step budget; then, per defense:

    RULE: the lowest mean ASR among the candidates whose mean accuracy drop is ≤ max_drop
    points (3 by default); a tie (equal mean ASR to two decimals) goes to the smaller mean drop,
    then to the candidate listed first. If no candidate keeps the drop within max_drop, the one
    with the smallest mean drop.

A grid may instead ask for the deep rule (`rule = "deep"`, docs/deep-purification.md), which
also re-tunes every candidate (the grid's [retune]) and the clean floor of each tuning model:

    DEEP RULE: among the candidates that, on every tuning model, keep ASR ≤ max_asr, the ASR
    after `retune_epoch` re-tune epochs ≤ the clean floor's + floor_margin points, and the
    accuracy drop ≤ max_drop: the lowest mean re-tune ASR; a tie (two decimals) goes to the
    smaller mean drop, then to the candidate listed first. If none passes, the published
    default.

ASR enters only here, on the tuning models; the benchmark cells never feed back into a choice.
The choice is written to `tuned.toml` beside the results, with the table that justified it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from typing import Any

from ..errors import SettingsError
from ..outputs import write_atomic

RULE = ("lowest mean ASR among candidates whose mean accuracy drop is <= {max_drop} points; "
        "ties (equal mean ASR to two decimals) to the smaller mean drop, then to the candidate "
        "listed first; if none keeps the drop within {max_drop}, the smallest mean drop")
DEEP_RULE = ("among candidates that on every tuning model keep ASR <= {max_asr}, ASR after "
             "{retune_epoch} re-tune epochs <= the clean floor's + {floor_margin} points and the "
             "accuracy drop <= {max_drop}: the lowest mean re-tune ASR; ties (two decimals) to "
             "the smaller mean drop, then to the candidate listed first; if none passes, the "
             "published default")
RULES = ("asr", "deep")
FLOOR = "floor"  # the setting label of a deep rule's clean-floor runs on the tuning models
TUNING_ATTACKS = ("badnets", "blended")
MIN_TUNING_SEED = 100
MAX_CANDIDATES = 4
TUNING_KEYS = {"model", "models", "max_drop", "candidates", "count", "rule", "retune_epoch",
               "max_asr", "floor_margin"}


@dataclass(frozen=True)
class TuningSpec:
    """The [tuning] section, checked."""

    model: str  # a key of the grid's [models]
    models: tuple[tuple[str, int], ...]  # (attack, seed) of each tuning model
    max_drop: float
    count: int  # candidates per tuned defense, the same for all
    candidates: dict[str, dict[str, dict[str, Any]]]  # row → candidate → overrides
    tuned_as: dict[str, str]  # row → the tuned row whose choice it takes ("" = not tuned)
    kind: str = "asr"  # "asr" (the one rule) or "deep" (re-tune ASR against the clean floor)
    retune_epoch: int = 2  # deep rule only
    max_asr: float = 2.0
    floor_margin: float = 10.0

    @property
    def deep(self) -> bool:
        return self.kind == "deep"

    @property
    def rule(self) -> str:
        if self.deep:
            return DEEP_RULE.format(max_asr=self.max_asr, retune_epoch=self.retune_epoch,
                                    floor_margin=self.floor_margin, max_drop=self.max_drop)
        return RULE.format(max_drop=self.max_drop)


def _number(section: dict[str, Any], key: str, default: float) -> float:
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise SettingsError(f"grid: [tuning] {key} must be a number ≥ 0, got {value!r}")
    return float(value)


def parse_tuning(section: Any, tune_as: dict[str, str | None], models: dict[str, Any],
                 benchmark_seeds: list[int],
                 check: Callable[[str, dict[str, Any]], None],
                 retune_epochs: tuple[int, ...] | None = None) -> TuningSpec:
    """Check the [tuning] section against the grid; `tune_as` maps each row to the row whose
    candidates tune it (itself for a defense, a variant's `tune_as`, None for references),
    `check(row, overrides)` raises on settings the row's defense does not take, and
    `retune_epochs` are the grid's [retune] checkpoints (None: no [retune])."""
    if not isinstance(section, dict):
        raise SettingsError("grid: [tuning] must be a table")
    unknown = sorted(set(section) - TUNING_KEYS)
    if unknown:
        raise SettingsError(f"grid: unknown [tuning] key(s) {', '.join(unknown)}; known: "
                            f"{', '.join(sorted(TUNING_KEYS))}")
    model = section.get("model", next(iter(models), ""))
    if model not in models:
        raise SettingsError(f"grid: [tuning] model {model!r} is not one of the grid's models")
    pairs = []
    for entry in section.get("models", []):
        if (not isinstance(entry, dict) or not isinstance(entry.get("attack"), str)
                or not isinstance(entry.get("seed"), int) or isinstance(entry.get("seed"), bool)):
            raise SettingsError(f"grid: each [tuning] model is {{attack = \"...\", seed = N}}, "
                                f"got {entry!r}")
        attack, seed = entry["attack"], entry["seed"]
        if attack not in TUNING_ATTACKS:
            raise SettingsError(f"grid: tuning models use {' or '.join(TUNING_ATTACKS)} only, "
                                f"got {attack!r}")
        if seed < MIN_TUNING_SEED or seed in benchmark_seeds:
            raise SettingsError(f"grid: tuning seed {seed} must be ≥ {MIN_TUNING_SEED} and not "
                                f"a benchmark seed")
        pairs.append((attack, seed))
    if not pairs:
        raise SettingsError("grid: [tuning] needs models = [{attack = ..., seed = ...}, ...]")
    max_drop = _number(section, "max_drop", 3.0)
    kind = section.get("rule", "asr")
    if kind not in RULES:
        raise SettingsError(f"grid: [tuning] rule must be one of {', '.join(RULES)}, got "
                            f"{kind!r}")
    retune_epoch = section.get("retune_epoch", 2)
    if kind == "deep" and (retune_epochs is None or retune_epoch not in retune_epochs):
        raise SettingsError(f"grid: the deep rule reads the ASR after {retune_epoch!r} re-tune "
                            f"epochs: the grid's [retune] epochs must include it")
    candidates = section.get("candidates", {})
    if not isinstance(candidates, dict) or not candidates:
        raise SettingsError("grid: [tuning.candidates.DEFENSE] tables are missing")
    count = section.get("count", max(len(c) for c in candidates.values()
                                     if isinstance(c, dict)))
    if not isinstance(count, int) or not 1 <= count <= MAX_CANDIDATES:
        raise SettingsError(f"grid: [tuning] count must be 1..{MAX_CANDIDATES}, got {count!r}")
    for row, listed in candidates.items():
        if tune_as.get(row) != row:
            raise SettingsError(f"grid: [tuning.candidates.{row}] names no tunable defense of "
                                f"this grid")
        if not isinstance(listed, dict) or len(listed) != count:
            listed_count = len(listed) if isinstance(listed, dict) else listed
            raise SettingsError(f"grid: every tuned defense lists the same number of candidates "
                                f"({count}); {row} lists {listed_count!r}")
        if listed.get("default") != {}:
            raise SettingsError(f"grid: {row}'s candidates must include default = {{}} (the "
                                f"published default is always a candidate)")
        for name, overrides in listed.items():
            if not isinstance(overrides, dict):
                raise SettingsError(f"grid: candidate {row}.{name} must be a table")
            check(row, overrides)
    tuned_as = {row: (target if target in candidates else "")
                for row, target in tune_as.items() if target is not None}
    return TuningSpec(model=model, models=tuple(pairs), max_drop=max_drop, count=count,
                      candidates=candidates, tuned_as=tuned_as, kind=kind,
                      retune_epoch=retune_epoch, max_asr=_number(section, "max_asr", 2.0),
                      floor_margin=_number(section, "floor_margin", 10.0))


def retune_asr(row: dict, epoch: int) -> float | None:
    """ASR after `epoch` re-tune epochs, or None when the row has no such measurement."""
    profile = row.get("retune")
    if not profile or epoch not in profile["epochs"]:
        return None
    return profile["asr"][profile["epochs"].index(epoch)]


def _model(row: dict) -> str:
    return f"{row['cell'].get('attack_label') or row['cell']['attack']}:{row['cell']['seed']}"


def summarise(rows: list[dict], spec: TuningSpec) -> dict[str, list[dict[str, Any]]]:
    """Per tuned row, one line per candidate: mean ACC drop and mean ASR over the tuning
    models that finished (with the per-model numbers); under the deep rule also the re-tune
    ASR per model, its mean, the clean floor's re-tune ASR on the same models, and whether it
    passes every bound on them (None until its runs and floors are in)."""
    floors = {_model(r): retune_asr(r, spec.retune_epoch) for r in rows
              if r["cell"]["defense"] == "clean_floor" and r["cell"]["setting"] == FLOOR}
    # Runs in the spec's order of tuning models, whichever finished first, so that the
    # per-model columns of every candidate read the same model in the same place.
    order = {f"{attack}:{seed}": i for i, (attack, seed) in enumerate(spec.models)}
    table: dict[str, list[dict[str, Any]]] = {}
    for row_name, listed in spec.candidates.items():
        lines = []
        for candidate in listed:
            runs = sorted((r for r in rows
                           if r["cell"]["defense"] == row_name
                           and r["cell"]["setting"] == candidate),
                          key=lambda r: order.get(_model(r), len(order)))
            drops = [r["before"]["acc"] - r["after"]["acc"] for r in runs]
            asrs = [r["after"]["asr"] for r in runs]
            line = {"candidate": candidate, "overrides": listed[candidate],
                    "models": [_model(r) for r in runs], "slots": list(order),
                    "drops": drops, "asrs": asrs,
                    "mean_drop": mean(drops) if drops else None,
                    "mean_asr": mean(asrs) if asrs else None}
            if spec.deep:
                retunes = [retune_asr(r, spec.retune_epoch) for r in runs]
                line.update(retunes=retunes, floors=[floors.get(m) for m in line["models"]],
                            mean_retune=(mean(retunes) if retunes and None not in retunes
                                         else None))
                # On the models run so far; a candidate passes only if it does on all of them.
                known = runs and None not in retunes and None not in line["floors"]
                line["passes"] = passes_deep(line, spec) if known else None
            lines.append(line)
        table[row_name] = lines
    return table


def passes_deep(line: dict[str, Any], spec: TuningSpec) -> bool:
    """Whether a summarised candidate meets every bound of the deep rule on every model."""
    return all(asr <= spec.max_asr and drop <= spec.max_drop
               and retune <= floor + spec.floor_margin
               for asr, drop, retune, floor in zip(line["asrs"], line["drops"],
                                                   line["retunes"], line["floors"], strict=True))


def pick(lines: list[dict[str, Any]], spec: TuningSpec) -> str:
    """The spec's rule (module docstring) over summarised candidates; all must have results."""
    if any(line["mean_asr"] is None for line in lines) or spec.deep and any(
            line["mean_retune"] is None or None in line["floors"] for line in lines):
        raise SettingsError("cannot choose before every candidate has run on the tuning models")
    # min() keeps the first of equal keys, which is the listing order.
    if spec.deep:
        passing = [line for line in lines if passes_deep(line, spec)]
        if not passing:
            return "default"
        return min(passing, key=lambda line: (round(line["mean_retune"], 2),
                                              line["mean_drop"]))["candidate"]
    eligible = [line for line in lines if line["mean_drop"] <= spec.max_drop]
    if not eligible:
        return min(lines, key=lambda line: line["mean_drop"])["candidate"]
    return min(eligible, key=lambda line: (round(line["mean_asr"], 2),
                                           line["mean_drop"]))["candidate"]


def choose(rows: list[dict], spec: TuningSpec,
           partial: bool = False) -> dict[str, dict[str, Any]]:
    """Per tuned row: the chosen candidate, its overrides and the table behind the choice.
    `partial`: only the rows whose candidates have all run (each row's choice reads its own
    candidates alone, so it is the same whenever the others finish); else every row must be
    complete."""
    expected = len(spec.models)
    choice = {}
    for row_name, lines in summarise(rows, spec).items():
        complete = all(len(line["asrs"]) == expected for line in lines)
        if partial and (not complete or spec.deep and any(
                line["mean_retune"] is None or None in line["floors"] for line in lines)):
            continue
        if not complete:
            raise SettingsError(f"tuning of {row_name} is incomplete: every candidate needs "
                                f"{expected} tuning models")
        chosen = pick(lines, spec)
        choice[row_name] = {"candidate": chosen, "overrides": spec.candidates[row_name][chosen],
                            "table": lines}
    return choice


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise SettingsError(f"cannot write {value!r} to a TOML preset")


def tuned_toml(choice: dict[str, dict[str, Any]], spec: TuningSpec) -> str:
    """The chosen settings as a TOML preset: one table per defense row, its overrides only."""
    lines = [f"# Chosen on tuning models {', '.join(f'{a}:{s}' for a, s in spec.models)} "
             f"({spec.model}) by the rule: {spec.rule}."]
    for row_name, picked in choice.items():
        lines += ["", f"# {row_name}: candidate {picked['candidate']!r}", f"[{row_name}]"]
        lines += [f"{key} = {_toml_value(value)}" for key, value in picked["overrides"].items()]
    return "\n".join(lines) + "\n"


def write_tuned(path: Path, choice: dict[str, dict[str, Any]], spec: TuningSpec) -> None:
    write_atomic(path, tuned_toml(choice, spec))  # a reader never sees half a preset
