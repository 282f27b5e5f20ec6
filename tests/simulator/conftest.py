"""Fixtures for the simulator tests."""

from __future__ import annotations

import pytest

from simulator.workloads import PAPER_TRACE


@pytest.fixture
def needs_trace():
    if not PAPER_TRACE.is_file():
        pytest.skip(f"paper trace not present at {PAPER_TRACE}")
    return PAPER_TRACE
