"""The self-supervised tests run single-threaded (their band images: tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Single-threaded, as in the curve tests: tiny models gain nothing from a thread pool, and
    these tests share the machine with long benchmarks they must not slow down."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
