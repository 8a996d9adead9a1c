"""Grant events on `loyalty.grants.v1`: what the rules service decided, for the ledger.

Every event id is derived from the source event id and the rule (see `grant_id`), so a
redelivered or replayed activity yields byte-identical grants that the ledger dedupes.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

from pydantic import Field, TypeAdapter

from schemas.envelope import Internal, InternalTime, Money

GRANTS_TOPIC = "loyalty.grants.v1"

# Fixed namespace: changing it would change every derived id and break dedupe on replay.
_GRANT_NAMESPACE = uuid.UUID("6f1c2a4e-9b0d-4c53-8a61-3e2f7d5b9c10")

Tier = Literal["member", "silver", "gold", "diamond"]
TIERS: tuple[Tier, ...] = ("member", "silver", "gold", "diamond")


def grant_id(source_event_id: str, rule_id: str, member_id: str, kind: str = "grant") -> str:
    """Deterministic output id: same source event + rule + member => same id, forever."""
    return str(uuid.uuid5(_GRANT_NAMESPACE, f"{kind}|{source_event_id}|{rule_id}|{member_id}"))


class _Grant(Internal):
    event_id: str
    schema_version: int = 1
    occurred_at: InternalTime
    member_id: str


class GrantData(Internal):
    rule_id: str
    ruleset_version: str
    points: int = Field(gt=0)
    source_event_id: str
    source_type: str
    store_id: str | None = None
    order_id: str | None = None
    # Days the points stay pending before they can be spent (rule-set setting, default 0).
    pending_days: int = Field(default=0, ge=0)


class PointsGranted(_Grant):
    type: Literal["points_granted"] = "points_granted"
    data: GrantData


class RevokeData(Internal):
    """Points to take back (a positive number) because a purchase was refunded."""

    rule_id: str
    ruleset_version: str
    points: int = Field(gt=0)
    source_event_id: str
    order_id: str
    store_id: str | None = None


class PointsRevoked(_Grant):
    type: Literal["points_revoked"] = "points_revoked"
    data: RevokeData


class TierData(Internal):
    tier: Tier
    previous_tier: Tier
    qualifying_spend: Money
    tier_valid_until: InternalTime | None
    ruleset_version: str
    source_event_id: str
    # The next tier up and the qualifying spend it needs, from the rule set in force.
    next_tier: Tier | None = None
    next_tier_spend: Money | None = None


class TierEvaluated(_Grant):
    """Sent whenever a purchase or refund moves qualifying spend or tier."""

    type: Literal["tier_evaluated"] = "tier_evaluated"
    data: TierData


GrantEvent = Annotated[PointsGranted | PointsRevoked | TierEvaluated, Field(discriminator="type")]
GRANT_TYPES = (PointsGranted, PointsRevoked, TierEvaluated)
grant_adapter: TypeAdapter[GrantEvent] = TypeAdapter(GrantEvent)


def parse_grant(raw: bytes | str) -> GrantEvent:
    return grant_adapter.validate_json(raw)
