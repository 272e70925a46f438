"""How one purification job runs around the defense: which clean data it takes, what it
measures along the way, and where it computes. Declared once here; the purify CLI's flags are
generated from it and `purify_run` takes it, so the two cannot drift."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from .data import CLEAN_FRACTION
from .data.subset import subset_kind
from .errors import SettingsError

LOSSES = ("auto", "ce", "simclr")
AUTO_DEVICE = "auto"


def resolve_device(name: str) -> str:
    """'auto' as CUDA when PyTorch sees a GPU, else the CPU; any other name checked as given
    (cpu, cuda, cuda:N or mps) and refused when its hardware is absent."""
    if name == AUTO_DEVICE:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SettingsError(f"--device {name} asked for, but PyTorch sees no CUDA device")
    if name != "cpu" and not name.startswith("cuda") and name != "mps":
        raise SettingsError(f"--device must be auto, cpu, cuda[:N] or mps, got {name!r}")
    if name == "mps" and not torch.backends.mps.is_available():  # else a traceback mid-run
        raise SettingsError("--device mps asked for, but PyTorch sees no MPS device (Apple "
                            "silicon)")
    return name


@dataclass(frozen=True)
class JobSettings:
    clean_fraction: float = field(default=CLEAN_FRACTION, metadata={
        "help": "clean data: a fraction (<1) or count (≥1) of the training split, "
                "class-stratified and seeded (unlabelled: a uniform sample)"})
    loss: str = field(default="auto", metadata={
        "help": "the curves' objective. auto: simclr for an encoder run folder (unlabelled "
                "clean images, no label read; the point defaults to t = 0.25), ce "
                "(cross-entropy on labelled clean data) for a classifier. simclr on a "
                "classifier contrasts its logits"})
    profile_test: int = field(default=2000, metadata={
        "help": "test images used for the metrics along each curve (0 = all)"})
    profile_train: int = field(default=1000, metadata={
        "help": "encoders: labelled training images of the linear probe that scores each point "
                "along the curves"})
    seed: int = field(default=0, metadata={
        "help": "random seed of the clean subset, the permutations and the training"})
    device: str = field(default=AUTO_DEVICE, metadata={
        "help": "auto (cuda when available, else cpu), cpu, cuda, cuda:N or mps"})
    threads: int | None = field(default=None, metadata={
        "help": "CPU threads of PyTorch (None: its own default). Recorded in the report, and "
                "part of what --resume checks: another count rounds differently"})

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise SettingsError(f"unknown loss {self.loss!r}; choices: {', '.join(LOSSES)}")
        subset_kind(self.clean_fraction)  # a fraction or a whole count, checked before work
        if self.profile_test < 0 or self.profile_train < 0:
            raise SettingsError(f"profile sizes must be ≥ 0, got --profile-test "
                                f"{self.profile_test}, --profile-train {self.profile_train}")
        if self.threads is not None and self.threads < 1:
            raise SettingsError(f"threads must be ≥ 1 or None, got {self.threads}")
        # Far past the cores only oversubscribes; past ~thousands torch's pool fails to map
        # its stacks with a misleading out-of-memory error, so refuse it plainly.
        limit = 4 * (os.cpu_count() or 1)
        if self.threads is not None and self.threads > limit:
            raise SettingsError(f"threads {self.threads} is more than 4 × this machine's "
                                f"{os.cpu_count()} cores; use at most {limit}")

    def apply_threads(self) -> None:
        """Set PyTorch's CPU thread count, when the job names one."""
        if self.threads is not None:
            torch.set_num_threads(self.threads)
