"""Shared fixtures."""

from __future__ import annotations

import os

import pytest
import torch

# the tests see only the datasets they write: no dataset an operating-system package installed
# on this machine (tests/test_data.py checks that search with a folder of its own)
os.environ["SGDGEOM_SYSTEM_DATASETS"] = ""


@pytest.fixture(autouse=True)
def _deterministic_threads():
    """Tests compare numbers; keep torch's thread count fixed for reproducibility."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
