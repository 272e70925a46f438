"""report.md: a person's view of a PurifyReport."""

from __future__ import annotations

from ..retune import uninformative_floor
from .concerns import concerns
from .schema import PurifyReport


def fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def render_markdown(report: PurifyReport, plots: list[str] = ()) -> str:
    lines = [f"# {report.defense.upper()} purification report", "",
             f"tscpurify {report.tool_version}, seed {report.seed}, "
             f"{len(report.clean_indices) or 'user-supplied'} clean samples."]
    if report.source:
        lines.append(f"Model: `{report.source.get('run', '?')}` "
                     f"({report.source.get('arch', '?')}, attack recorded: "
                     f"{report.source.get('attack', 'none')}).")
    if report.symmetry:
        lines.append(f"Permutation symmetry: {report.symmetry['groups']} groups, moving "
                     f"{100 * report.symmetry['coverage']:.1f}% of the weights.")
    lines += ["", "## Before and after", "", "| | ACC % | ASR % | RA % |", "|---|---|---|---|"]
    for name, metrics in (("before", report.before), ("after", report.after)):
        if metrics:
            lines.append(f"| {name} | {fmt(metrics.get('acc'))} | {fmt(metrics.get('asr'))} | "
                         f"{fmt(metrics.get('ra'))} |")
    before, after = report.before or {}, report.after or {}
    if all(isinstance(m.get(k), (int, float)) for m in (before, after) for k in ("acc", "asr")):
        lines += ["", f"Clean accuracy {before['acc']:.2f}% → {after['acc']:.2f}% (a drop of "
                      f"{before['acc'] - after['acc']:.2f} points); the trigger sends "
                      f"{after['asr']:.2f}% of the poisoned test images to the target, "
                      f"{before['asr']:.2f}% before."]
    lines += [line for concern in concerns(report)
              for line in ("", f"**Warning:** {concern[0].upper()}{concern[1:]}.")]
    if report.distance:
        lines += ["", f"Moved from the suspect model (relative L2 over the parameters): "
                      f"{report.distance['raw']:.3f} raw, {report.distance['aligned']:.3f} with "
                      f"its units aligned to the suspect's. Measurable without knowing the attack; "
                      f"whether it predicts a backdoor's return is under study "
                      f"(docs/deep-purification.md)."]
    if report.retune:
        some = next(iter(report.retune.values()))
        epochs = some["epochs"]
        lines += ["", "## Does the backdoor come back?", "",
                  f"Each model fine-tuned on {some['images']:,} training images of which "
                  f"{some['poisoned']} carry the trigger and the target label (tscpurify.retune); "
                  f"ASR % after each epoch. A purified backdoor that returns much faster than "
                  f"in a model trained without poison was dormant, not removed.", "",
                  "| model | " + " | ".join(f"epoch {e}" for e in epochs) + " |",
                  "|---" * (len(epochs) + 1) + "|"]
        labels = {"before": "suspect", "after": "purified", "floor": "trained without poison"}
        for name, profile in report.retune.items():
            lines.append(f"| {labels.get(name, name)} | "
                         + " | ".join(fmt(a) for a in profile["asr"]) + " |")
        floor, purified = report.retune.get("floor"), report.retune.get("after")
        if floor is None:
            lines += ["", "No model trained without poison was given (`--retune-floor RUN`): "
                          "without it, only the suspect's row tells how fast a trigger is "
                          "learnt here."]
        elif purified is not None:
            # The comparison the check exists for, at the second epoch (the first if only one).
            i = min(1, len(epochs) - 1)
            gap = purified["asr"][i] - floor["asr"][i]
            lines += ["", f"After {epochs[i]} epoch(s): purified {fmt(purified['asr'][i])}%, "
                          f"trained without poison {fmt(floor['asr'][i])}% ({gap:+.2f} points)."]
        if floor and uninformative_floor(floor["asr"]):
            lines += ["", f"The model trained without poison learns this trigger within "
                          f"{floor['epochs'][0]} epoch(s) ({fmt(floor['asr'][0])}%): at these "
                          f"sizes the check cannot tell a dormant backdoor from none. Re-tune "
                          f"with fewer poisoned images (`--retune-poisoned`) to separate them."]
    if report.stages:
        lines += ["", "## Stages", "", "| round | stage | t | ACC % | ASR % | after fine-tune "
                  "ACC / ASR % | seconds |", "|---|---|---|---|---|---|---|"]
        for s in report.stages:
            tuned = (f"{fmt(s.finetuned.get('acc'))} / {fmt(s.finetuned.get('asr'))}"
                     if s.finetuned else "–")
            lines.append(f"| {s.round + 1} | {s.stage} | {s.t:g} | {fmt(s.metrics.get('acc'))} | "
                         f"{fmt(s.metrics.get('asr'))} | {tuned} | "
                         f"{sum(s.seconds.values()):.0f} |")
    if any(s.profile for s in report.stages):
        lines += ["", "## Along the curves", "",
                  "ACC / ASR (%) and clean loss at each t; the point taken is in bold.", ""]
        for s in report.stages:
            if not s.profile:
                continue
            lines += [f"Round {s.round + 1}, stage {s.stage}:", "",
                      "| t | " + " | ".join(f"{p['t']:g}" for p in s.profile) + " |",
                      "|---" * (len(s.profile) + 1) + "|"]
            for key in ("acc", "asr", "loss"):
                if key in s.profile[0]:
                    cells = [(f"**{fmt(p[key])}**" if abs(p["t"] - s.t) < 1e-9 else fmt(p[key]))
                             for p in s.profile]
                    lines.append(f"| {key} | " + " | ".join(cells) + " |")
            lines.append("")
    if report.seconds:
        lines += ["", "## Time", "", "| phase | seconds |", "|---|---|"]
        # "total" is the purification's own (the phases before it); the checks after it
        # (distance, re-tune) are timed apart.
        lines += [f"| {'**total** of the purification' if k == 'total' else k} | {v:.1f} |"
                  for k, v in report.seconds.items()]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    lines += ["", "## Settings", "", "```json"]
    import json
    lines += [json.dumps(report.settings, indent=1), "```", ""]
    return "\n".join(lines)
