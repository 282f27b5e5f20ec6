"""Service tiers and their default objectives: the one definition the gateway, scheduler and simulator share."""

from __future__ import annotations

import enum


class Tier(enum.IntEnum):
    """Service tier. Lower value = more important (used directly as a sort key)."""

    PAYING = 0
    FREE = 1


# The paper's two tiers: paying users get a 0.1 s time-between-tokens objective, free users 0.5 s.
PAYING_TBT_S = 0.1
FREE_TBT_S = 0.5
DEFAULT_TBT_S = {Tier.PAYING: PAYING_TBT_S, Tier.FREE: FREE_TBT_S}
