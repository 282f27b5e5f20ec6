"""Fixtures for the scheduler service's in-process tests."""

from __future__ import annotations

import pytest

from tests.scheduler_svc.helpers import RecordingRunner, start_stack


@pytest.fixture
async def stack():
    """A factory: ``await stack(runners=None, **config)`` starts a scheduler over in-process executors
    (one ``RecordingRunner`` by default); every stack it made is closed after the test."""
    stacks = []

    async def make(runners=None, **config):
        st = await start_stack(runners or [RecordingRunner()], **config)
        stacks.append(st)
        return st

    yield make
    for st in stacks:
        await st.close()
