"""Protobuf enum values <-> the contract's values (finish reasons, tiers), for every boundary."""

from __future__ import annotations

from contract.tiers import Tier
from wire.pb.slai.v1 import common_pb2

FINISH_TO_PB = {
    None: common_pb2.FINISH_REASON_UNSPECIFIED,
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "abort": common_pb2.FINISH_REASON_ABORT,
    "ignored": common_pb2.FINISH_REASON_IGNORED,
    "error": common_pb2.FINISH_REASON_ERROR,
}
FINISH_FROM_PB = {v: k for k, v in FINISH_TO_PB.items()}

TIER_TO_PB = {Tier.PAYING: common_pb2.TIER_PAYING, Tier.FREE: common_pb2.TIER_FREE}
TIER_FROM_PB = {common_pb2.TIER_PAYING: Tier.PAYING, common_pb2.TIER_FREE: Tier.FREE}


def tier_from_pb(value: int) -> Tier:
    """TIER_UNSPECIFIED -> FREE (the deployment default); unknown values are rejected."""
    if value == common_pb2.TIER_UNSPECIFIED:
        return Tier.FREE
    try:
        return TIER_FROM_PB[value]
    except KeyError:
        raise ValueError(f"tier: unknown value {value}") from None
