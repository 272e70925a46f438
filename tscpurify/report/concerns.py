"""What a person must not miss in a purification's numbers, in plain sentences: the CLI prints
them as `warning:` lines and report.md puts them under the before-and-after table.

A purification that cost a large share of the model's accuracy, left the trigger working, or
left a backdoor that re-tuning wakes up still writes its model (the user asked for it, and may
want to inspect it); these sentences make sure that the one line a user reads says so. The
bounds are the benchmark's targets (README: ASR ≤ 5%, an accuracy drop ≤ 3 points) and the
re-tune reading of docs/deep-purification.md; they judge a finished run, never steer one.
"""

from __future__ import annotations

from ..retune import uninformative_floor
from .schema import PurifyReport

MAX_ASR = 5.0  # % of triggered test images sent to the target: above it, not removed
MAX_ACC_DROP = 3.0  # points of clean accuracy: above it, a cost to point out
DORMANT_GAP = 20.0  # re-tune ASR points above the floor's: the backdoor woke up


def _number(metrics: dict | None, key: str) -> float | None:
    value = (metrics or {}).get(key)
    return float(value) if isinstance(value, (int, float)) else None


def concerns(report: PurifyReport) -> list[str]:
    """The sentences, most serious first; none for a run within every bound."""
    found = []
    asr = _number(report.after, "asr")
    if asr is not None and asr > MAX_ASR:
        found.append(f"the trigger still works on {asr:.2f}% of the poisoned test images "
                     f"(target ≤ {MAX_ASR:g}%): this run did not remove the backdoor")
    before, after = _number(report.before, "acc"), _number(report.after, "acc")
    if before is not None and after is not None and before - after > MAX_ACC_DROP:
        found.append(f"clean accuracy fell by {before - after:.2f} points ({before:.2f}% → "
                     f"{after:.2f}%), more than the {MAX_ACC_DROP:g} of the benchmark's target; "
                     f"TSC costs more with fewer clean images or shorter curves "
                     f"(docs/ablations.md, studies 1-2)")
    purified, floor = (report.retune or {}).get("after"), (report.retune or {}).get("floor")
    if purified and floor and not uninformative_floor(floor["asr"]):
        i = min(1, len(purified["epochs"]) - 1)  # the second checkpoint, as report.md reads it
        if purified["asr"][i] - floor["asr"][i] > DORMANT_GAP:
            found.append(f"re-tuned on a few poisoned images, the purified model's backdoor is "
                         f"back at {purified['asr'][i]:.1f}% after {purified['epochs'][i]} "
                         f"epoch(s), where a model trained without poison is at "
                         f"{floor['asr'][i]:.1f}%: it is dormant, not removed")
    return found
