"""Lifecycle events: the core records these plain values; telemetry turns them into span events."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class EventKind(enum.IntEnum):
    QUEUED = 0
    SCHEDULED = 1  # first time the request gets work in a plan (after each admission)
    PREEMPTED = 2
    FIRST_TOKEN = 3
    FINISHED = 4


@dataclass(frozen=True, slots=True)
class LifecycleEvent:
    kind: EventKind
    req_id: str
    time_s: float  # scheduler clock
    detail: str = ""  # finish reason, victim cause, ...
