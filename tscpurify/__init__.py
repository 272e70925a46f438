"""tscpurify: remove backdoors from trained neural networks with TSC (Two-stage Symmetry
Connectivity, Peng et al., ICML 2025).

    purified, report = tscpurify.purify(model, clean_loader)
"""

__version__ = "0.1.0"

from .defenses import defend  # noqa: E402
from .defenses.tsc import PRESETS, TSCSettings, purify  # noqa: E402
from .defenses.tsc_clip import purify_clip  # noqa: E402
from .errors import (  # noqa: E402
    CheckpointError,
    DataError,
    OutputError,
    SettingsError,
    SpecError,
    TscpurifyError,
)
from .permutation import PermutationSpec, apply_permutation, derive_spec, match  # noqa: E402

__all__ = ["PRESETS", "CheckpointError", "DataError", "OutputError", "PermutationSpec",
           "SettingsError", "SpecError", "TSCSettings", "TscpurifyError", "__version__",
           "apply_permutation", "defend", "derive_spec", "match", "purify", "purify_clip"]
