"""Shared fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_threads():
    """Tests compare numbers; keep torch's thread count fixed for reproducibility."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
