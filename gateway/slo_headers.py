"""A request's own latency objectives from llm-d's SLO headers: they may loosen its tier's, never tighten them.

llm-d's endpoint picker lets a client state the latency it needs with two headers (HTTP) or the
same keys as gRPC metadata::

    x-llm-d-slo-ttft-ms: 2000     # time to first token, milliseconds
    x-llm-d-slo-tpot-ms: 250      # time per output token (our TBT objective), milliseconds

The tier, which the API key alone decides (gateway/auth.py), grants the tightest objectives a
request may have. A header looser than its tier's objective replaces it (the scheduler then has
more room for others); a tighter one is capped at the tier's, so no header buys a better tier.
A tier objective of 0 means "the scheduler's default", which the gateway does not know, so it
cannot tell loose from tight there: the header is checked but not applied (docs/gateway.md,
"SLO headers"). A value that is not a positive number of milliseconds is an error naming the
header (HTTP 400 / INVALID_ARGUMENT).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from gateway.config import TierPolicy
from gateway.validation import clip

TTFT_HEADER = "x-llm-d-slo-ttft-ms"
TPOT_HEADER = "x-llm-d-slo-tpot-ms"
# header -> the TierPolicy field it may loosen
HEADER_FIELDS = ((TTFT_HEADER, "ttft_slo_s"), (TPOT_HEADER, "tbt_slo_s"))


def _values(carrier: Any, name: str) -> list[str]:
    """Every value of ``name`` in HTTP headers (a Starlette ``Headers``) or gRPC metadata (key, value) pairs."""
    if carrier is None:
        return []
    getlist = getattr(carrier, "getlist", None)
    if getlist is not None:  # HTTP: case-insensitive, repeated headers kept
        return list(getlist(name))
    out = []
    for item in carrier:  # gRPC metadata: keys arrive lower-case
        key, value = item[0], item[1]
        if key == name:
            out.append(value if isinstance(value, str) else value.decode("utf-8", "replace"))
    return out


def parse_slo_ms(name: str, raw: str) -> float:
    """A header's objective in seconds; ValueError naming the header unless it is a positive, finite number of ms."""
    try:
        ms = float(raw.strip())
    except ValueError:
        ms = math.nan
    if not (math.isfinite(ms) and ms > 0):
        raise ValueError(f"{name}: expected a positive number of milliseconds, got {clip(raw)}")
    return ms / 1e3


def requested_objectives(carrier: Any) -> dict[str, float]:
    """The objectives the headers ask for: TierPolicy field -> seconds (only those present)."""
    out = {}
    for name, field in HEADER_FIELDS:
        values = _values(carrier, name)
        if not values:
            continue
        if len({v.strip() for v in values}) > 1:
            raise ValueError(f"{name}: given {len(values)} times with different values")
        out[field] = parse_slo_ms(name, values[0])
    return out


def with_slo_headers(tier: TierPolicy, carrier: Any) -> TierPolicy:
    """``tier`` with each objective loosened to what the headers ask, where that is looser; never tighter."""
    asked = requested_objectives(carrier)
    changes = {}
    for field, seconds in asked.items():
        granted = getattr(tier, field)
        if granted > 0 and seconds > granted:  # 0 = the scheduler's default: unknown here, left alone
            changes[field] = seconds
    return dataclasses.replace(tier, **changes) if changes else tier


__all__ = ["TPOT_HEADER", "TTFT_HEADER", "parse_slo_ms", "requested_objectives", "with_slo_headers"]
