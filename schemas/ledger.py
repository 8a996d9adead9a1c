"""Ledger events on `loyalty.ledger.v1`: the public record of every point movement."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, TypeAdapter

from schemas.envelope import ADDED_LATER, Internal, InternalTime, Money
from schemas.grants import Tier

LEDGER_TOPIC = "loyalty.ledger.v1"
DLQ_TOPIC = "loyalty.dlq.v1"


class _LedgerEvent(Internal):
    event_id: str
    schema_version: int = 1
    occurred_at: InternalTime
    member_id: str


class MovementData(Internal):
    """Points moved (signed: negative leaves the balance), the balance after, the cause."""

    points: int
    balance_after: int
    rule_id: str | None = None
    ruleset_version: str | None = None
    source_event_id: str | None = None
    redemption_id: str | None = None
    adjustment_id: str | None = None
    order_id: str | None = None
    store_id: str | None = None
    expires_at: InternalTime | None = None
    reason: str | None = None
    operator: str | None = None
    # points_earned: the type of the activity whose grant this is (`purchase`, `refund`,
    # `check_in`, …), so that a refund's re-priced bonus is not taken for a reward; null on
    # other events and on earns published before it was added.
    source_type: str | None = Field(default=None, json_schema_extra=ADDED_LATER)


class PointsEarned(_LedgerEvent):
    type: Literal["points_earned"] = "points_earned"
    data: MovementData


class PointsRedeemed(_LedgerEvent):
    type: Literal["points_redeemed"] = "points_redeemed"
    data: MovementData


class PointsRevoked(_LedgerEvent):
    type: Literal["points_revoked"] = "points_revoked"
    data: MovementData


class PointsExpired(_LedgerEvent):
    type: Literal["points_expired"] = "points_expired"
    data: MovementData


class PointsAdjusted(_LedgerEvent):
    type: Literal["points_adjusted"] = "points_adjusted"
    data: MovementData


class PointsExpiring(_LedgerEvent):
    type: Literal["points_expiring"] = "points_expiring"
    data: MovementData


class TierChangedData(Internal):
    previous_tier: Tier
    tier: Tier
    qualifying_spend: Money
    tier_valid_until: InternalTime | None
    ruleset_version: str
    source_event_id: str


class TierChanged(_LedgerEvent):
    type: Literal["tier_changed"] = "tier_changed"
    data: TierChangedData


LedgerEvent = Annotated[
    PointsEarned
    | PointsRedeemed
    | PointsRevoked
    | PointsExpired
    | PointsAdjusted
    | PointsExpiring
    | TierChanged,
    Field(discriminator="type"),
]
LEDGER_TYPES = (
    PointsEarned,
    PointsRedeemed,
    PointsRevoked,
    PointsExpired,
    PointsAdjusted,
    PointsExpiring,
    TierChanged,
)
ledger_event_adapter: TypeAdapter[LedgerEvent] = TypeAdapter(LedgerEvent)


def parse_ledger_event(raw: bytes | str) -> LedgerEvent:
    return ledger_event_adapter.validate_json(raw)


class DeadLetter(Internal):
    """What a consumer writes to `loyalty.dlq.v1` for a message it cannot use; and a
    service's outbox relay (`consumer` "<service>-relay", `source_offset` -1) for an event
    the broker refused as larger than it takes, on its way to `source_topic`."""

    dlq_id: str
    consumer: str
    source_topic: str
    source_partition: int
    source_offset: int
    reason: str
    # The original bytes, decoded as UTF-8 when they are text, else base64; only their start
    # when the letter would be too big for the broker (`original_truncated`): the whole
    # bytes stay in the `dead_letters` table.
    original: str
    original_encoding: Literal["utf-8", "base64"]
    original_key: str | None = None
    received_at: InternalTime
    original_truncated: bool = Field(default=False, json_schema_extra=ADDED_LATER)
    # Of the original bytes; absent in older letters.
    original_size: int | None = Field(default=None, json_schema_extra=ADDED_LATER)
