"""Exceptions the library raises on bad input.

Only the CLI turns these into a one-line message and exit code 2; anything else
is a bug and keeps its traceback.
"""


class TscpurifyError(Exception):
    """Base class: a problem with the user's input, not with the library."""


class DataError(TscpurifyError):
    """A data set is missing, malformed, or does not fit the model."""


class CheckpointError(TscpurifyError):
    """A checkpoint or run folder cannot be loaded safely or does not match its sidecar."""


class SpecError(TscpurifyError):
    """A model's permutation symmetry cannot be derived or a spec does not fit a model."""


class SettingsError(TscpurifyError):
    """A setting is out of range or an unknown name was asked for."""


class OutputError(TscpurifyError):
    """An output folder cannot be written without risking data: it exists, is in use, is a
    symlink or the current folder, overlaps the input, or its parent is read-only."""


class OutputBusyError(OutputError):
    """Another process holds the output's lock (it is writing the same folder or file)."""
