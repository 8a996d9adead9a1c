"""Events take the tzinfo object stored states have, and nothing the rules decide changes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from rules_factories import DEFAULT, T0, purchase, refund, sign_in

from schemas.activity import activity_adapter
from services.rules.engine import evaluate
from services.rules.state import MemberState, dump_state, load_state, shared_tz, with_shared_tz


def parsed(at: str) -> datetime:
    """A moment as the consumer's parse makes it: a tzinfo object of its own."""
    event = activity_adapter.validate_python({
        "event_id": "e", "type": "check_in", "occurred_at": at, "member_id": "m-1",
        "data": {"kind": "sign_in"},
    })  # fmt: skip
    return event.occurred_at


@pytest.mark.parametrize(
    "at", ["2026-03-02T10:00:00+08:00", "2026-03-02T02:00:00Z", "2026-03-02T10:00:00.5-05:30"]
)
def test_a_parsed_moment_takes_the_tzinfo_object_of_a_stored_one(at: str) -> None:
    stored = load_state(
        b'{"member_id": "m-1", "tier_valid_until": "%s"}' % at.encode()
    ).tier_valid_until
    assert stored is not None
    moment = parsed(at)
    assert moment.tzinfo is not stored.tzinfo  # each parse makes its own
    shared = shared_tz(moment)
    assert shared.tzinfo is stored.tzinfo
    assert shared == moment
    assert shared.isoformat() == moment.isoformat()
    assert shared.utcoffset() == moment.utcoffset()
    assert shared_tz(shared) is shared


def test_naive_moments_zones_and_odd_offsets_are_left_alone() -> None:
    naive = datetime(2026, 3, 2, 10)
    zoned = datetime(2026, 3, 2, 10, tzinfo=ZoneInfo("Asia/Shanghai"))
    seconds = datetime(2026, 3, 2, 10, tzinfo=timezone(timedelta(hours=1, seconds=30)))
    fraction = datetime(2026, 3, 2, 10, tzinfo=timezone(timedelta(microseconds=-500_000)))
    assert shared_tz(fraction) == fraction
    assert shared_tz(fraction).utcoffset() == fraction.utcoffset()
    assert shared_tz(naive) is naive
    assert shared_tz(zoned) is zoned
    assert shared_tz(seconds) == seconds
    assert shared_tz(seconds).isoformat() == seconds.isoformat()
    assert shared_tz(datetime(2026, 3, 2, 2, tzinfo=UTC)).tzinfo is UTC


def test_the_same_stream_decides_the_same_with_and_without_shared_tzinfo() -> None:
    """Grants and stored state are byte for byte the same: only object identity changed.
    The state goes through storage between events, as in the service."""
    stream = [
        purchase(amount=30000, at=T0, order_id="o-1"),
        sign_in(at=T0 + timedelta(hours=1)),
        purchase(amount=500, at=T0 + timedelta(days=1), order_id="o-2"),
        refund("m-1", "o-1", "20000.00", at=T0 + timedelta(days=2)),
    ]
    outputs = []
    for share in (False, True):
        state, out = MemberState(member_id="m-1"), []
        for raw in stream:
            event = activity_adapter.validate_json(raw.model_dump_json())
            if share:
                event = with_shared_tz(event)
            result = evaluate(load_state(dump_state(state)), event, DEFAULT, {})
            state = result.state
            out.append([g.model_dump_json() for g in result.grants])
        outputs.append((out, dump_state(state)))
    assert outputs[0] == outputs[1]
    assert any(outputs[0][0])  # the stream paid something
