"""tscpurify: remove backdoors from trained neural networks with TSC (Two-stage Symmetry
Connectivity, Peng et al., ICML 2025).

    purified, report = tscpurify.purify(model, clean_loader)
"""

from .defenses import defend
from .defenses.tsc import PRESETS, TSCSettings, purify
from .defenses.tsc_clip import purify_clip
from .errors import (
    CheckpointError,
    DataError,
    OutputError,
    SettingsError,
    SpecError,
    TscpurifyError,
)
from .permutation import PermutationSpec, apply_permutation, derive_spec, match
from .version import __version__

__all__ = ["PRESETS", "CheckpointError", "DataError", "OutputError", "PermutationSpec",
           "SettingsError", "SpecError", "TSCSettings", "TscpurifyError", "__version__",
           "apply_permutation", "defend", "derive_spec", "match", "purify", "purify_clip"]
