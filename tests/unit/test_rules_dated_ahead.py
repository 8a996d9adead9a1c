"""The rules service refuses activity dated far after it reached the broker."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from aiokafka.structs import ConsumerRecord
from rules_factories import purchase

from services.common.config import Settings
from services.common.dlq import Refused, classify
from services.rules.app import RulesProcessor

RECEIVED = datetime(2026, 11, 29, 8, 0, tzinfo=UTC)
CREATE_TIME, LOG_APPEND_TIME = 0, 1


def _record(timestamp_ms: int | None, timestamp_type: int) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(
        topic="loyalty.activity.v1", partition=0, offset=1, timestamp=timestamp_ms,
        timestamp_type=timestamp_type, key=b"m-1", value=b"{}", checksum=None,
        serialized_key_size=3, serialized_value_size=2, headers=(),
    )  # fmt: skip


def _ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


def _check(
    at: datetime, stamp: int | None, kind: int = LOG_APPEND_TIME, limit: int = 86_400
) -> None:
    settings = Settings(database_url="postgresql://x@127.0.0.1:1/x", bootstrap_servers="x:1",
                        activity_max_ahead_seconds=limit)  # fmt: skip
    RulesProcessor(settings, "rules")._dated_ahead(
        _record(stamp, kind), purchase(amount=100, at=at)
    )


def _refused(at: datetime, stamp: int | None, kind: int = LOG_APPEND_TIME) -> str:
    with pytest.raises(Refused) as refused:
        _check(at, stamp, kind)
    label, reason = classify(refused.value)
    assert label == "dated_ahead"
    assert "ACTIVITY_MAX_AHEAD_SECONDS" in reason
    return reason


def test_an_event_a_day_ahead_or_less_is_taken_and_later_is_refused() -> None:
    for ahead in (timedelta(days=-400), timedelta(0), timedelta(hours=23), timedelta(days=1)):
        _check(RECEIVED + ahead, _ms(RECEIVED))  # a till's clock hours fast, a zone wrong
    reason = _refused(RECEIVED + timedelta(days=1, seconds=1), _ms(RECEIVED))
    assert "24.0 h after the broker received it" in reason


def test_a_broker_append_time_is_trusted_even_ahead_of_this_clock() -> None:
    later = datetime.now(UTC) + timedelta(days=400)  # a replay judges by the same time
    _check(later, _ms(later))


def test_a_producer_stamping_its_event_time_does_not_make_a_year_ahead_event_on_time() -> None:
    far = datetime.now(UTC) + timedelta(days=400)
    reason = _refused(far, _ms(far), CREATE_TIME)
    assert "after now" in reason


def test_a_create_time_in_the_past_is_the_reference_so_a_replay_refuses_the_same() -> None:
    reason = _refused(RECEIVED + timedelta(days=2), _ms(RECEIVED), CREATE_TIME)
    assert "48.0 h after its record's timestamp" in reason
    _check(RECEIVED + timedelta(hours=23), _ms(RECEIVED), CREATE_TIME)


def test_a_record_without_a_time_is_judged_against_now() -> None:
    _check(datetime.now(UTC) + timedelta(hours=23), -1, CREATE_TIME)
    far = datetime.now(UTC) + timedelta(days=400)
    assert "after now" in _refused(far, -1, CREATE_TIME)
    assert "after now" in _refused(far, None, LOG_APPEND_TIME)


def test_no_limit_takes_everything() -> None:
    far = datetime.now(UTC) + timedelta(days=400)
    _check(far, _ms(far), CREATE_TIME, limit=0)
    _check(far, -1, CREATE_TIME, limit=0)


def test_a_create_time_past_year_9999_is_judged_against_now_not_dead_lettered() -> None:
    # A producer stamping microseconds for milliseconds: a moment in year 58,881, which
    # `datetime` cannot hold; the check raised, and a valid purchase was a processing_error.
    micros = _ms(RECEIVED) * 1000
    _check(datetime.now(UTC) - timedelta(hours=1), micros, CREATE_TIME)
    far = datetime.now(UTC) + timedelta(days=400)
    assert "after now" in _refused(far, micros, CREATE_TIME)
    assert "after now" in _refused(far, micros, LOG_APPEND_TIME)
