"""The published JSON Schemas (schemas/json) hold what the services write, and refuse
what the models refuse: a producer that validates against them is not dead-lettered for
what they let through, and a consumer can rely on the fields they list as required.

Before 2026-11-29 they let through a visit with no booking and amounts like "abc" or "-5"
(each dead-lettered), and listed neither `type` nor `schema_version` as required in the
events we write."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import jsonschema
import orjson
import pytest
from pydantic import ValidationError
from rules_factories import T0, Run, purchase, refund, registered, review, sign_in, visit
from test_fast_event_json import history

from schemas.activity import parse_activity
from schemas.generate import JSON_DIR
from schemas.grants import parse_grant
from schemas.ledger import DeadLetter, parse_ledger_event
from services.ledger.journal import ledger_event_json
from services.rules.emit import grant_json


def _validator(name: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((JSON_DIR / f"{name}.schema.json").read_text(encoding="utf-8"))
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())


def _activity(type_: str, data: dict[str, Any], **envelope: Any) -> dict[str, Any]:
    return {
        "event_id": "e-1",
        "type": type_,
        "occurred_at": "2026-11-20T15:04:05+08:00",
        "member_id": "m-1",
        "data": data,
        **envelope,
    }


GOOD_ACTIVITIES = [
    _activity("purchase", {"order_id": "o", "amount": "2500.00",
                           "items": [{"project_code": "p", "amount": "2500.00"}]}),
    _activity("refund", {"order_id": "o", "amount": "100"}),
    _activity("refund", {"order_id": "o", "amount": "999999999999.99"}),
    _activity("refund", {"order_id": "o", "amount": "9999.9"}),
    _activity("refund", {"order_id": "o", "amount": "9999.99000"}),  # zeros past the fen
    _activity("check_in", {"kind": "sign_in"}),
    _activity("check_in", {"kind": "visit", "booking_id": "b", "arrived_at": None,
                           "booked_at": "2026-11-19T10:00:00+08:00",
                           "slot_start": "2026-11-20T15:00:00+08:00"}),
    _activity("review", {"review_id": "r", "rating": 5}),
    _activity("share", {"share_id": "s", "likes": 12, "approved": True}),
    _activity("referral", {"referrer_id": "m-2"}),
    _activity("member_registered", {"birthday": "02-29"}, store_id=None, extra_field=1),
]  # fmt: skip

BAD_ACTIVITIES = {
    "a visit without its booking": _activity("check_in", {"kind": "visit"}),
    "a visit with a null slot": _activity(
        "check_in", {"kind": "visit", "booking_id": "b", "slot_start": None,
                     "booked_at": "2026-11-19T10:00:00+08:00"},
    ),
    "a word for an amount": _activity("purchase", {"order_id": "o", "amount": "abc"}),
    "a negative amount": _activity("refund", {"order_id": "o", "amount": "-5"}),
    "a trillion": _activity("purchase", {"order_id": "o", "amount": "1000000000000"}),
    # The ledger's numeric(20,2) would round it up to 10000.00, a silver spend it is not.
    "a fraction of a fen": _activity("purchase", {"order_id": "o", "amount": "9999.995"}),
    "an item's fraction of a fen": _activity(
        "purchase", {"order_id": "o", "amount": "1",
                     "items": [{"project_code": "p", "amount": "0.001"}]},
    ),
    "a refund's fraction of a fen": _activity("refund", {"order_id": "o", "amount": "1.0001"}),
    "a rating of 6": _activity("review", {"review_id": "r", "rating": 6}),
    "no offset": _activity("check_in", {"kind": "sign_in"}, occurred_at="2026-11-20T15:04:05"),
    "an unknown type": _activity("teleport", {}),
    "a store id of 201 characters": _activity("check_in", {"kind": "sign_in"}, store_id="s" * 201),
    "an order id of 201": _activity("refund", {"order_id": "o" * 201, "amount": "1"}),
    "a project code of 201": _activity("purchase", {"order_id": "o", "amount": "1",
                                                    "items": [{"project_code": "p" * 201,
                                                               "amount": "1"}]}),
    "a referrer id of 201": _activity("referral", {"referrer_id": "m" * 201}),
    "a channel of 201": _activity("share", {"share_id": "s", "channel": "c" * 201}),
    # Year 1 passed both and then overflowed the rules' 12-month window (processing_error).
    "the year 1": _activity("check_in", {"kind": "sign_in"},
                            occurred_at="0001-01-01T10:00:00+08:00"),
    "before 1970": _activity("check_in", {"kind": "sign_in"},
                             occurred_at="1969-12-31T23:59:59+14:00"),
    "after 2999": _activity("check_in", {"kind": "sign_in"}, occurred_at="3000-01-01T00:00:00Z"),
    "a slot in the year 1": _activity(
        "check_in", {"kind": "visit", "booking_id": "b", "arrived_at": None,
                     "booked_at": "2026-11-19T10:00:00+08:00",
                     "slot_start": "0001-01-01T00:00:00+08:00"},
    ),
}  # fmt: skip


@pytest.mark.parametrize("event", GOOD_ACTIVITIES, ids=lambda e: str(e["type"]))
def test_what_the_activity_schema_takes_the_service_takes(event: dict[str, Any]) -> None:
    _validator("activity.v1").validate(event)
    parse_activity(json.dumps(event))


@pytest.mark.parametrize("event", BAD_ACTIVITIES.values(), ids=list(BAD_ACTIVITIES))
def test_what_the_service_refuses_the_activity_schema_refuses(event: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        parse_activity(json.dumps(event))
    assert not _validator("activity.v1").is_valid(event)


def sample_grants() -> list[Any]:
    """Grants of every type, as the rules service writes them (the AsyncAPI test's too)."""
    run = Run()
    run.feed(
        registered("m-1", referrer="m-2"),
        purchase(amount=12000, at=T0, order_id="A", items=["facial-package"]),
        refund("m-1", "A", 2000, at=T0 + timedelta(days=1)),
        sign_in(at=T0 + timedelta(days=2)),
        review(at=T0 + timedelta(days=2)),
        visit(slot=T0 + timedelta(days=3)),
    )
    return run.grants


def test_every_grant_the_rules_write_holds_to_the_grants_schema() -> None:
    grants = sample_grants()
    assert {g.type for g in grants} == {"points_granted", "points_revoked", "tier_evaluated"}
    validator = _validator("grants.v1")
    for grant in grants:
        document = orjson.loads(grant_json(grant))
        validator.validate(document)
        parse_grant(orjson.dumps(document))
    required = validator.schema["$defs"]["PointsGranted"]["required"]
    assert {"type", "schema_version", "event_id", "occurred_at", "member_id"} <= set(required)


def test_every_ledger_event_holds_to_the_ledger_schema() -> None:
    validator = _validator("ledger.v1")
    entries = history()
    assert len({e.kind for e in entries}) >= 5
    for entry in entries:
        document = orjson.loads(ledger_event_json(entry))
        validator.validate(document)
        parse_ledger_event(orjson.dumps(document))
    for name in ("PointsEarned", "TierChanged"):
        assert {"type", "schema_version"} <= set(validator.schema["$defs"][name]["required"])


def test_a_dead_letter_holds_to_the_dlq_schema() -> None:
    letter = DeadLetter(
        dlq_id="d", consumer="rules", source_topic="loyalty.activity.v1", source_partition=0,
        source_offset=7, reason="malformed JSON", original="{oops",
        original_encoding="utf-8", received_at=T0,
    )  # fmt: skip
    _validator("dlq.v1").validate(json.loads(letter.model_dump_json()))


# As the ledger and a consumer wrote them on 2026-11-28, before fields were added to them.
EARNED_BEFORE = {
    "event_id": "g-1", "type": "points_earned", "schema_version": 1,
    "occurred_at": "2026-11-20T07:04:05Z", "member_id": "m-10086",
    "data": {"points": 3850, "balance_after": 3850, "rule_id": "base", "ruleset_version": "2026.1",
             "source_event_id": "e-1", "redemption_id": None, "adjustment_id": None,
             "order_id": "o-1", "store_id": "sh-jingan", "expires_at": "2027-11-20T07:04:05Z",
             "reason": None, "operator": None},
}  # fmt: skip
LETTER_BEFORE = {
    "dlq_id": "d", "consumer": "rules", "source_topic": "loyalty.activity.v1",
    "source_partition": 0, "source_offset": 7, "reason": "malformed JSON", "original": "{oops",
    "original_encoding": "utf-8", "original_key": None, "received_at": "2026-11-28T01:00:00Z",
}  # fmt: skip


@pytest.mark.parametrize(("name", "document"), [("ledger.v1", EARNED_BEFORE),
                                                ("dlq.v1", LETTER_BEFORE)])  # fmt: skip
def test_events_written_before_a_field_was_added_still_hold_to_the_schema(
    name: str, document: dict[str, Any]
) -> None:
    """A field added later is written always but required never: the events already in the
    topics lack it (a replay from the start, a producer not upgraded yet)."""
    validator = _validator(name)
    validator.validate(document)
    added = {"ledger.v1": "source_type", "dlq.v1": "original_size"}[name]
    assert '"x-added-later": true' in json.dumps(validator.schema)
    assert added not in json.dumps(validator.schema.get("required", []))
