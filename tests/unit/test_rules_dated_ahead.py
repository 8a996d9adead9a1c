"""The rules service refuses activity dated far after the broker received it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from aiokafka.structs import ConsumerRecord
from rules_factories import purchase

from services.common.config import Settings
from services.common.dlq import Refused, classify
from services.rules.app import RulesProcessor

RECEIVED = datetime(2026, 11, 29, 8, 0, tzinfo=UTC)


def _record(timestamp_ms: int | None) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(
        topic="loyalty.activity.v1", partition=0, offset=1, timestamp=timestamp_ms,
        timestamp_type=0, key=b"m-1", value=b"{}", checksum=None, serialized_key_size=3,
        serialized_value_size=2, headers=(),
    )  # fmt: skip


def _check(ahead: timedelta, limit: int = 86_400, stamp: int | None = None) -> None:
    settings = Settings(database_url="postgresql://x@127.0.0.1:1/x", bootstrap_servers="x:1",
                        activity_max_ahead_seconds=limit)  # fmt: skip
    received_ms = int(RECEIVED.timestamp() * 1000) if stamp is None else stamp
    RulesProcessor(settings, "rules")._dated_ahead(
        _record(received_ms), purchase(amount=100, at=RECEIVED + ahead)
    )


def test_an_event_a_day_ahead_or_less_is_taken_and_later_is_refused() -> None:
    for ahead in (timedelta(days=-400), timedelta(0), timedelta(hours=23), timedelta(days=1)):
        _check(ahead)  # a till's clock minutes or hours fast, a zone written wrong
    with pytest.raises(Refused) as refused:
        _check(timedelta(days=1, seconds=1))
    label, reason = classify(refused.value)
    assert label == "dated_ahead"
    assert "24.0 h after the broker received it" in reason
    assert "ACTIVITY_MAX_AHEAD_SECONDS" in reason


def test_no_limit_or_no_broker_time_takes_everything() -> None:
    _check(timedelta(days=400), limit=0)
    _check(timedelta(days=400), stamp=-1)  # a record the broker gave no time
