"""Markdown tables and plots of a bench run, derived from its rows alone."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..outputs import save_figure_atomic  # noqa: E402
from ..report.plots import profile_figure  # noqa: E402
from ..retune import UNINFORMATIVE_FLOOR, uninformative_floor  # noqa: E402
from .tuning import retune_asr  # noqa: E402

RETUNE_EPOCH = 2  # the re-tune column of the summary: ASR after this many epochs


def attack_name(cell: dict) -> str:
    """The grid's name for a row's attack (an alias such as badnets_r01, or the attack)."""
    return cell.get("attack_label") or cell["attack"]


def model_name(cell: dict) -> str:
    """The grid's name for a row's model (an alias such as cnn_w32, or the model)."""
    return cell.get("model_label") or cell["model"]


def aligned_distance(row: dict) -> float | None:
    """The row's distance from the suspect model up to permuting units, None if not recorded.
    Rows written before 2026-12-05 could hold an activation-matched distance above the raw one
    (permutation.model_distances now keeps the smaller); the smaller is taken here for them."""
    distance = row.get("distance")
    return min(distance["raw"], distance["aligned"]) if distance else None


def fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def retune_cell(row: dict) -> str:
    profile = row.get("retune")
    if not profile:
        return "–"
    return " / ".join(f"{a:.1f}" for a in profile["asr"])


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return mean(present) if present else None


def markdown_table(rows: list[dict]) -> str:
    """One line per cell, then each defense's means over all its cells; a grid with default
    and tuned rows gets one section per setting. Rows that recorded their stages (TSC's) get
    the stage tables after them."""
    settings = list(dict.fromkeys(r["cell"].get("setting", "default") for r in rows))
    parts = []
    for setting in settings:
        group = [r for r in rows if r["cell"].get("setting", "default") == setting]
        if len(settings) > 1:
            parts.append(f"### {setting} settings\n")
        parts.append(_cells_table(group))
        parts.append(_summary_table(group))
        parts.append(_floor_line(group))
        parts.append(_diagnostic_line(group))
    parts.append(stages_table(rows))
    return "\n".join(part for part in parts if part)


def stage_points(row: dict) -> list[tuple[str, float | None, float | None]]:
    """(label, ACC, ASR) along a row's recorded stages: before, each round's stage-1 point
    (S1), stage-2 point (S2) and, when one ran, the fine-tune after it (FT); [] without
    stages. "R2 S1" is round 2's stage-1 point, the model far from the suspect one."""
    if not row.get("stages"):
        return []
    points = [("before", row["before"]["acc"], row["before"]["asr"])]
    for stage in row["stages"]:
        name = f"R{stage['round'] + 1} S{stage['stage']}"
        points.append((name, stage["metrics"].get("acc"), stage["metrics"].get("asr")))
        if stage.get("finetuned"):
            points.append((f"R{stage['round'] + 1} FT", stage["finetuned"].get("acc"),
                           stage["finetuned"].get("asr")))
    return points


def _stage_order(label: str) -> tuple[int, int]:
    """Where a stage_points label sits along a run: before, then per round S1, S2, FT."""
    if label == "before":
        return (0, 0)
    round_, kind = label[1:].split(" ")
    return (int(round_), {"S1": 1, "S2": 2, "FT": 3}[kind])


def _staged_groups(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows with stages by "defense (setting)", each group's rows sharing one stage layout.
    Where the rows span several model entries (the width study's cnn_w16 and cnn_w32), each
    model is a group of its own, named after it: a mean across widths would hide the very
    difference such a grid is run to see."""
    staged = [r for r in rows if stage_points(r)]
    several_models = len({model_name(r["cell"]) for r in staged}) > 1
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in staged:
        cell = r["cell"]
        label = f"{cell['defense']} ({cell.get('setting', 'default')})"
        groups[f"{label} · {model_name(cell)}" if several_models else label].append(r)
    return {key: [r for r in group if [p[0] for p in stage_points(r)]
                  == [p[0] for p in stage_points(group[0])]]
            for key, group in groups.items()}


def _stage_means(group: list[dict]) -> list[tuple[str, float | None, float | None]]:
    """(label, mean ACC, mean ASR) at each stage point of a _staged_groups group."""
    points = [stage_points(r) for r in group]
    return [(label, _mean([p[i][1] for p in points]), _mean([p[i][2] for p in points]))
            for i, (label, _, _) in enumerate(points[0])]


def stages_table(rows: list[dict]) -> str:
    """Where a staged defense's removal and its accuracy cost arise: mean ACC / ASR at every
    stage point, per defense and setting, then per cell; "" when no row has stages."""
    groups = _staged_groups(rows)
    if not groups:
        return ""
    lines = ["", "### Along the stages (mean ACC / ASR at each point; R = round, S1 / S2 = "
                 "the stage's curve point, FT = the fine-tune after it)", ""]
    for name, group in groups.items():
        means = _stage_means(group)
        lines += [f"| {name} | cells | " + " | ".join(label for label, _, _ in means) + " |",
                  "|---|---|" + "---|" * len(means)]
        lines.append(f"| mean | {len(group)} | "
                     + " | ".join(f"{fmt(a)} / {fmt(b)}" for _, a, b in means) + " |")
        for r in group:
            cell = r["cell"]
            lines.append(f"| {attack_name(cell)}:{model_name(cell)}:{cell['seed']} | 1 | "
                         + " | ".join(f"{fmt(a)} / {fmt(b)}" for _, a, b in stage_points(r))
                         + " |")
        lines.append("")
    return "\n".join(lines)


def distance_vs_retune(rows: list[dict], epoch: int = RETUNE_EPOCH) -> dict[str, Any] | None:
    """The deep-purification diagnostic (docs/deep-purification.md): over the rows of real
    defenses (not the reference rows), the Spearman rank correlation between the aligned
    distance from the suspect model, which a defender can measure without knowing the attack,
    and the ASR after `epoch` re-tune epochs. None with fewer than 3 such rows."""
    pairs = [(aligned_distance(r), retune_asr(r, epoch)) for r in rows
             if r["cell"].get("base") and r.get("distance") and retune_asr(r, epoch) is not None]
    if len(pairs) < 3:
        return None
    distances, retunes = zip(*pairs, strict=True)
    if len(set(distances)) < 2 or len(set(retunes)) < 2:  # a constant has no rank correlation
        return {"rows": len(pairs), "spearman": None}
    from scipy.stats import spearmanr

    return {"rows": len(pairs), "spearman": float(spearmanr(distances, retunes).statistic)}


def _floor_line(rows: list[dict]) -> str:
    """Cells whose re-tune cannot tell dormant from gone: their floor learns the trigger at
    once."""
    cells = [f"{attack_name(r['cell'])}:{model_name(r['cell'])}:{r['cell']['seed']}"
             for r in rows if r["cell"]["defense"] == "clean_floor" and r.get("retune")
             and uninformative_floor(r["retune"]["asr"])]
    if not cells:
        return ""
    return (f"\nRe-tune uninformative in {', '.join(cells)}: the model trained without poison "
            f"learns the trigger within the first re-tune epoch (ASR ≥ "
            f"{UNINFORMATIVE_FLOOR:.0f}%), so there it cannot tell a dormant backdoor from "
            f"none.\n")


def _diagnostic_line(rows: list[dict]) -> str:
    found = distance_vs_retune(rows)
    if found is None or found["spearman"] is None:
        return ""
    return (f"\nDiagnostic: over {found['rows']} defended rows, the Spearman rank correlation "
            f"between the aligned distance from the suspect model and the ASR after "
            f"{RETUNE_EPOCH} re-tune epochs is {found['spearman']:+.2f} (negative: the further "
            f"a defense moved the model, the less of the backdoor came back).\n")


def _cells_table(rows: list[dict]) -> str:
    epochs = next((r["retune"]["epochs"] for r in rows if r.get("retune")), None)
    retune_head = f"ASR after re-tune {'/'.join(map(str, epochs))} ep" if epochs else "re-tune"
    lines = [f"| attack | model | seed | defense | ACC before | ASR before | ACC | ASR | RA | DER "
             f"| {retune_head} | steps | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c, b, a = r["cell"], r["before"], r["after"]
        lines.append(f"| {attack_name(c)} | {model_name(c)} | {c['seed']} | {c['defense']} | "
                     f"{fmt(b['acc'])} | {fmt(b['asr'])} | {fmt(a['acc'])} | {fmt(a['asr'])} | "
                     f"{fmt(a['ra'])} | {r['der']:.3f} | {retune_cell(r)} | "
                     f"{r.get('steps', 0)} | {r.get('seconds', 0.0):.0f} |")
    return "\n".join(lines) + "\n"


def summary(rows: list[dict]) -> list[dict[str, Any]]:
    """Per defense, in order of appearance: cells, mean ACC drop, ASR, RA, DER, re-tune ASR,
    steps and seconds."""
    by_defense: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_defense[r["cell"]["defense"]].append(r)
    return [{"defense": name, "cells": len(group),
             "acc_drop": mean(r["before"]["acc"] - r["after"]["acc"] for r in group),
             "asr": _mean([r["after"]["asr"] for r in group]),
             "ra": _mean([r["after"]["ra"] for r in group]),
             "der": mean(r["der"] for r in group),
             "retune_asr": _mean([retune_asr(r, RETUNE_EPOCH) for r in group]),
             "distance": _mean([aligned_distance(r) for r in group]),
             "steps": mean(r.get("steps", 0) for r in group),
             "seconds": mean(r.get("seconds", 0.0) for r in group)}
            for name, group in by_defense.items()]


def _summary_table(rows: list[dict]) -> str:
    lines = ["", f"| defense | cells | mean ACC drop | mean ASR | mean RA | mean DER | "
                 f"mean ASR after {RETUNE_EPOCH} re-tune epochs | aligned distance | steps | "
                 f"seconds |", "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary(rows):
        distance = "–" if s["distance"] is None else f"{s['distance']:.3f}"
        lines.append(f"| {s['defense']} | {s['cells']} | {s['acc_drop']:.2f} | {fmt(s['asr'])} | "
                     f"{fmt(s['ra'])} | {s['der']:.3f} | {fmt(s['retune_asr'])} | {distance} | "
                     f"{s['steps']:.0f} | {s['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def _per_model(line: dict[str, Any], key: str) -> str:
    """A candidate's values of `key` one per tuning model in the spec's order, "–" for a model
    it has not finished on, so that a half-run candidate does not read as the other model's."""
    values = dict(zip(line["models"], line[key], strict=True))
    return " / ".join(fmt(values[m]) if m in values else "–"
                      for m in line.get("slots") or line["models"])


def tuning_table(choice: dict[str, dict[str, Any]]) -> str:
    """Every candidate of every tuned defense on the tuning models, the chosen one marked
    (candidate None: nothing chosen yet); under the deep rule with the re-tune ASR per model
    and the clean floor's."""
    deep = any("retunes" in line for picked in choice.values() for line in picked["table"])
    slots = next((line.get("slots") for picked in choice.values() for line in picked["table"]
                  if line.get("slots")), None)
    per = f"per model ({' / '.join(slots)})" if slots else "per model"
    extra = (f" re-tune ASR {per} | floor {per} | mean re-tune ASR | passes every bound |"
             if deep else "")
    lines = [f"| defense | candidate | settings | ACC drop {per} | ASR {per} |" + extra
             + " mean drop | mean ASR | chosen |",
             "|---|---|---|---|---|" + "---|" * (4 if deep else 0) + "---|---|---|"]
    for name, picked in choice.items():
        none_pass = deep and not any(line.get("passes") for line in picked["table"])
        for line in picked["table"]:
            settings = ", ".join(f"{k}={v}" for k, v in line["overrides"].items()) or "defaults"
            chosen = line["candidate"] == picked["candidate"]
            # The deep rule keeps the default when no candidate passes: say so, so that
            # "chosen" is never read as "passed".
            mark = ("**yes** (none passes: the default stays)" if chosen and none_pass
                    else "**yes**" if chosen else "")
            passes = {True: "yes", False: "no", None: "–"}[line.get("passes")]
            retunes = (f" {_per_model(line, 'retunes')} | {_per_model(line, 'floors')} | "
                       f"{fmt(line['mean_retune'])} | {passes} |" if deep else "")
            lines.append(
                f"| {name} | {line['candidate']} | {settings} | {_per_model(line, 'drops')} | "
                f"{_per_model(line, 'asrs')} |{retunes} {fmt(line['mean_drop'])} | "
                f"{fmt(line['mean_asr'])} | {mark} |")
    return "\n".join(lines) + "\n"


def plot_bench(rows: list[dict], folder: Path) -> list[Path]:
    """asr_heatmap.png (attack × model rows, defense columns, mean over seeds),
    acc_vs_asr.png (one colour per defense), stages.png when rows recorded their stages (mean
    ACC and ASR at each stage point), when rows were re-tuned, retune.png (mean ASR
    against re-tune epochs per defense) and, per row that profiled its curves,
    profiles-<defense>-<attack>-<model>-s<seed>-<setting>.png."""
    folder.mkdir(parents=True, exist_ok=True)
    defenses = list(dict.fromkeys(r["cell"]["defense"] for r in rows))
    settings = list(dict.fromkeys(f"{attack_name(r['cell'])} / {model_name(r['cell'])}"
                                  for r in rows))
    values: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in rows:
        if r["after"]["asr"] is not None:
            values[(f"{attack_name(r['cell'])} / {model_name(r['cell'])}",
                    r["cell"]["defense"])].append(r["after"]["asr"])
    grid = [[mean(values[(s, d)]) if values[(s, d)] else float("nan") for d in defenses]
            for s in settings]
    fig, ax = plt.subplots(figsize=(1.2 * len(defenses) + 2, 0.6 * len(settings) + 1.5))
    image = ax.imshow(grid, cmap="Reds", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(defenses)), defenses, rotation=30, ha="right")
    ax.set_yticks(range(len(settings)), settings)
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, label="ASR after defense (%)")
    fig.tight_layout()
    heatmap = folder / "asr_heatmap.png"
    save_figure_atomic(fig, heatmap, dpi=110)
    plt.close(fig)

    # tab20 keeps up to 20 defenses apart; matplotlib's default cycle repeats after 10.
    palette = plt.get_cmap("tab20").colors
    color = {name: palette[i % len(palette)] for i, name in enumerate(defenses)}
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name in defenses:
        group = [r for r in rows if r["cell"]["defense"] == name and r["after"]["asr"] is not None]
        ax.scatter([r["after"]["asr"] for r in group], [r["after"]["acc"] for r in group],
                   label=name, s=25, color=color[name])
    ax.set_xlabel("ASR after defense (%)")
    ax.set_ylabel("ACC after defense (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    scatter = folder / "acc_vs_asr.png"
    save_figure_atomic(fig, scatter, dpi=110)
    plt.close(fig)
    plots = [heatmap, scatter]

    staged = _staged_groups(rows)
    if staged:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        # One axis for every group: the paper preset has no fine-tune after its last round,
        # another setting may run more rounds, so each point sits at its own stage's place.
        every = sorted({p[0] for group in staged.values() for p in stage_points(group[0])},
                       key=_stage_order)
        for name, group in staged.items():
            means = _stage_means(group)
            for ax, column in zip(axes, (1, 2), strict=True):
                ax.plot([every.index(point[0]) for point in means],
                        [point[column] for point in means],
                        marker="o", label=f"{name}, {len(group)} cells")
        for ax in axes:
            ax.set_xticks(range(len(every)), every, rotation=45, ha="right", fontsize=8)
        axes[0].set_ylabel("mean ACC (%)")
        axes[1].set_ylabel("mean ASR (%)")
        axes[1].set_ylim(-2, 102)
        for ax in axes:
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=7)
        fig.suptitle("Along the stages (R = round, S1 / S2 = curve points, FT = fine-tune)",
                     fontsize=10)
        fig.tight_layout()
        path = folder / "stages.png"
        save_figure_atomic(fig, path, dpi=110)
        plt.close(fig)
        plots.append(path)

    retuned = [r for r in rows if r.get("retune")]
    if retuned:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in defenses:
            group = [r for r in retuned if r["cell"]["defense"] == name]
            if not group:
                continue
            epochs = [0, *group[0]["retune"]["epochs"]]
            curve = [mean(r["after"]["asr"] for r in group),
                     *(mean(r["retune"]["asr"][i] for r in group)
                       for i in range(len(epochs) - 1))]
            style = "--" if name in ("none", "clean_floor") else "-"
            ax.plot(epochs, curve, style, marker="o", label=name, color=color[name])
        sizes = retuned[0]["retune"]
        ax.set_xlabel(f"re-tune epochs ({sizes['images']:,} images, {sizes['poisoned']} "
                      f"poisoned)")
        ax.set_ylabel("mean ASR (%)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = folder / "retune.png"
        save_figure_atomic(fig, path, dpi=110)
        plt.close(fig)
        plots.append(path)

    # Rows that profiled their curves (a grid's `profile_points`) get one figure each: why a
    # stage's point lost accuracy or kept the backdoor is read off its curve.
    for r in rows:
        cell = r["cell"]
        name = f"{cell['defense']} on {attack_name(cell)} / {model_name(cell)}, seed {cell['seed']}"
        fig = profile_figure(r.get("stages") or [], f"{name} ({cell['setting']}): along each curve")
        if fig is None:
            continue
        path = folder / (f"profiles-{cell['defense']}-{cell['attack']}-{cell['model']}-"
                         f"s{cell['seed']}-{cell['setting']}.png")
        save_figure_atomic(fig, path, dpi=110)
        plt.close(fig)
        plots.append(path)
    return plots
