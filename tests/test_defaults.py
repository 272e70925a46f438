"""Each default is declared once: a second literal copy would drift (the clean fraction was
written four times, the backdoor's training epochs 6 in one place and 5 in the others)."""

import re
from pathlib import Path

import tscpurify
from tscpurify.data import CLEAN_FRACTION
from tscpurify.training import TrainSettings

PACKAGE = Path(tscpurify.__file__).parent


def lines_mentioning(pattern: str) -> list[tuple[str, str]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for line in path.read_text().splitlines():
            if re.search(pattern, line):
                found.append((str(path.relative_to(PACKAGE)), line.strip()))
    return found


def test_the_clean_fraction_is_declared_once():
    literal = [(f, line) for f, line in lines_mentioning(r"clean[_-]fraction|CLEAN_FRACTION")
               if re.search(r"\b0?\.05\b", line)]
    assert literal == [("data/subset.py", "CLEAN_FRACTION = 0.05")]
    assert CLEAN_FRACTION == 0.05


def test_backdoor_training_epochs_come_from_train_settings():
    literal = [(f, line) for f, line in lines_mentioning(r"TrainSettings\(|train_epochs")
               if re.search(r"(train_)?epochs\s*[=:]\s*(int\s*=\s*)?\d", line)]
    assert literal == []
    from tscpurify.bench.grid import TRAIN_EPOCHS, Cell

    assert Cell.__dataclass_fields__["train_epochs"].default == TRAIN_EPOCHS \
        == TrainSettings().epochs



def test_the_curve_knobs_are_declared_once_in_curve_settings():
    """TSC and MCR hold a CurveSettings; none of its knobs is a field of theirs again."""
    import dataclasses

    from tscpurify.curve import CurveSettings
    from tscpurify.defenses.mcr import MCRSettings
    from tscpurify.defenses.tsc import TSCSettings

    knobs = {f.name for f in dataclasses.fields(CurveSettings)}
    for cls in (TSCSettings, MCRSettings):
        assert isinstance(cls().curve, CurveSettings)
        assert knobs.isdisjoint(f.name for f in dataclasses.fields(cls)), cls.__name__
    declared = [(f, line) for f, line in lines_mentioning(r"cosine_t_max\s*:")]
    assert declared == [("curve/train.py", "cosine_t_max: int | None = field(default=100, "
                                           "metadata={")]
