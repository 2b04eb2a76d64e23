"""Fixtures for the loss tests (opt-in, so each test module chooses)."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def single_thread():
    """Run a module on one intra-op thread: its tensors are tiny, so thread hand-offs cost more
    than they save, and on a shared 2-core machine they cost several times the work itself."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
