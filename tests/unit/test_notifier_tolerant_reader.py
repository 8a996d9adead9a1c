"""The notifier reads the ledger topic as a tolerant reader: a kind of event a newer ledger
publishes is skipped, while a broken event of a known kind still goes to the DLQ."""

from __future__ import annotations

import orjson
import pytest
from pydantic import ValidationError

from services.notifier.app import parse_or_skip

EARNED = {
    "event_id": "e-1",
    "type": "points_earned",
    "schema_version": 1,
    "occurred_at": "2026-03-01T10:00:00+08:00",
    "member_id": "m-1",
    "data": {"points": 100, "balance_after": 100, "rule_id": "base", "ruleset_version": "v1",
             "source_event_id": "a-1", "expires_at": "2027-03-01T10:00:00+08:00"},
}  # fmt: skip


def test_a_known_event_is_parsed() -> None:
    event = parse_or_skip(orjson.dumps(EARNED))
    assert event is not None
    assert (event.type, event.member_id) == ("points_earned", "m-1")


def test_an_event_of_a_kind_a_newer_ledger_publishes_is_skipped() -> None:
    newer = {**EARNED, "type": "points_transferred", "data": {"to": "m-2", "points": 50}}
    assert parse_or_skip(orjson.dumps(newer)) is None


@pytest.mark.parametrize(
    "raw",
    [
        orjson.dumps({**EARNED, "data": {"points": "many"}}),  # a known kind, broken
        orjson.dumps({**EARNED, "type": 7}),  # no type name at all
        orjson.dumps([EARNED]),  # not an object
        b"{not json",
    ],
    ids=["known-kind-broken", "type-not-a-name", "not-an-object", "not-json"],
)
def test_bad_input_still_raises_for_the_dlq(raw: bytes) -> None:
    with pytest.raises(ValidationError):  # pydantic's error, as the DLQ classifies it
        parse_or_skip(raw)
