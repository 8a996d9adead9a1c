"""The notifier's payload: the event's JSON handed to the column's codec as it is.

It used to go through `orjson.loads` to a dict that the codec dumped again; an
`orjson.Fragment` is written verbatim, and Postgres stores the same JSON value either way
(the column is `json` since migration 0013: the text as sent).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import orjson

from schemas.ledger import (
    LedgerEvent,
    MovementData,
    PointsEarned,
    PointsExpiring,
    TierChanged,
    TierChangedData,
)

SH = timezone(timedelta(hours=8))
AT = datetime(2026, 3, 1, 9, 30, 15, 250000, tzinfo=SH)


def json_codec(value: object) -> bytes:
    """What the pool's json encoder sends (services/common/runtime.py)."""
    return orjson.dumps(value)


EVENTS: list[LedgerEvent] = [
    PointsEarned(
        event_id="e1",
        occurred_at=AT,
        member_id="m-1",
        data=MovementData(
            points=10000,
            balance_after=10000,
            rule_id="base",
            ruleset_version="2026.1",
            source_event_id="s1",
            order_id="o1",
            store_id="sh-jingan",
            expires_at=AT.replace(year=2027),
            reason='补偿 "goodwill"\n\\',
        ),
    ),
    TierChanged(
        event_id="t1",
        occurred_at=AT,
        member_id="m-1",
        data=TierChangedData(
            previous_tier="member",
            tier="silver",
            qualifying_spend=Decimal("10000.00"),
            tier_valid_until=datetime(2027, 12, 31, 16, tzinfo=UTC),
            ruleset_version="2026.1",
            source_event_id="s1",
        ),
    ),
    PointsExpiring(
        event_id="w1",
        occurred_at=datetime(2026, 3, 1, tzinfo=UTC),
        member_id="m-1",
        data=MovementData(points=-300, balance_after=900, expires_at=AT),
    ),
]


def test_the_codec_sends_the_events_json_verbatim_and_the_same_value_as_before() -> None:
    for event in EVENTS:
        text = event.model_dump_json()
        now = json_codec(orjson.Fragment(text))
        before = json_codec(orjson.loads(text))
        assert now == text.encode()
        assert orjson.loads(now) == orjson.loads(before)
