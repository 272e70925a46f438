"""Defenses by name, behind one call: `defend(name, model, clean_loader, ...)`.

A defense sees the (possibly backdoored) model and a loader of clean data, nothing else:
never the attack, the trigger, poisoned samples or ASR.
"""

# Importing the modules registers their defenses (in .registered).
from . import (  # noqa: F401
    anp,
    clp,
    distill,
    fine_pruning,
    finetune,
    fst,
    ft_sam,
    ibau,
    mcr,
    nad,
    sau,
    tsc,
)
from .base import DefenseResult, defend
from .registered import DEFENSES

__all__ = ["DEFENSES", "DefenseResult", "defend"]
