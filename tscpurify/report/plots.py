"""PNG plots drawn from a PurifyReport (never from live models)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on servers or CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from .schema import PurifyReport  # noqa: E402


def profile_figure(stages: list[dict], title: str = "") -> Figure | None:
    """ACC and ASR against t, one panel per stage (a row per round), from stage records as
    plain dicts (`round`, `stage`, `t`, `profile`: a report's stages or a bench row's); None
    if no stage was profiled."""
    stages = [s for s in stages if s.get("profile")]
    if not stages:
        return None
    rounds = max(s["round"] for s in stages) + 1
    fig, axes = plt.subplots(rounds, 2, figsize=(9, 3 * rounds), squeeze=False, sharey=True)
    for ax in axes.flat:
        ax.set_visible(False)
    for s in stages:
        ax = axes[s["round"]][s["stage"] - 1]
        ax.set_visible(True)
        ts = [p["t"] for p in s["profile"]]
        for key, style in (("acc", "o-"), ("asr", "s--")):
            if s["profile"][0].get(key) is not None:
                ax.plot(ts, [p[key] for p in s["profile"]], style, label=key.upper(), ms=4)
        ax.axvline(s["t"], color="grey", lw=1, ls=":")
        ax.set_title(f"round {s['round'] + 1}, stage {s['stage']} (point at t={s['t']:g})",
                     fontsize=10)
        ax.set_xlabel("t")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
    axes[0][0].set_ylabel("%")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_profiles(report: PurifyReport, path: Path) -> bool:
    """The report's curve profiles (`profile_figure`); returns False if there is nothing to plot."""
    fig = profile_figure([dataclasses.asdict(s) for s in report.stages])
    if fig is None:
        return False
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_before_after(report: PurifyReport, path: Path) -> bool:
    if not report.before or not report.after:
        return False
    keys = [k for k in ("acc", "asr", "ra") if report.before.get(k) is not None]
    fig, ax = plt.subplots(figsize=(5, 3))
    width = 0.38
    xs = range(len(keys))
    ax.bar([x - width / 2 for x in xs], [report.before[k] for k in keys], width, label="before")
    ax.bar([x + width / 2 for x in xs], [report.after[k] for k in keys], width, label="after")
    ax.set_xticks(list(xs), [k.upper() for k in keys])
    ax.set_ylim(0, 100)
    ax.set_ylabel("%")
    ax.legend()
    ax.set_title(f"{report.defense.upper()}: before and after")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


RETUNE_LABELS = {"before": "suspect model", "after": "purified", "floor": "trained without poison"}


def plot_retune(report: PurifyReport, path: Path) -> bool:
    """ASR against re-tuning epochs for each re-tuned model (epoch 0: before re-tuning)."""
    if not report.retune:
        return False
    fig, ax = plt.subplots(figsize=(5, 3.2))
    start = {"before": report.before.get("asr"), "after": report.after.get("asr")}
    for name, profile in report.retune.items():
        first = start.get(name)
        epochs = ([0] if first is not None else []) + profile["epochs"]
        asr = ([first] if first is not None else []) + profile["asr"]
        ax.plot(epochs, asr, "--" if name == "floor" else "-", marker="o",
                label=RETUNE_LABELS.get(name, name))
    some = next(iter(report.retune.values()))
    ax.set_xlabel(f"re-tuning epochs ({some['images']:,} images, {some['poisoned']} poisoned)")
    ax.set_ylabel("ASR (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Does the backdoor come back?")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
