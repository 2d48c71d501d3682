"""Workflow tests run torch on one thread.

SparseGPT's float rounding depends on the thread count and the Sparse Expansion builder runs its
SparseGPT loops single-threaded (``cpu_threads=1``), so bit-exact comparisons between a workflow
and a direct library call need the same count; tiny models gain nothing from more threads.
"""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every workflow test: ``one_thread`` (tests/conftest.py)."""
