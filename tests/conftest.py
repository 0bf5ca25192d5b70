"""Test fixtures: one intra-op thread per test (the suite runs two pytest-xdist workers on
two cores; tiny ops thrash with two intra-op threads each)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
