"""The committed JSON Schemas are what the models say, and inbound events are tolerant."""

import json
from decimal import Decimal

import pytest
from pydantic import ValidationError
from rules_factories import DEFAULT

from schemas.activity import Purchase, parse_activity
from schemas.envelope import MAX_ID_CHARS
from schemas.generate import JSON_DIR, render_all
from schemas.grants import PointsGranted, grant_id, parse_grant
from schemas.ledger import PointsEarned, parse_ledger_event
from services.common.dlq import classify
from services.rules.engine import evaluate
from services.rules.state import MemberState, with_shared_tz


def test_committed_json_schemas_are_up_to_date() -> None:
    for filename, text in render_all().items():
        path = JSON_DIR / filename
        assert path.exists(), f"{filename} missing: run `make schemas`"
        assert path.read_text(encoding="utf-8") == text, f"{filename} is stale: run `make schemas`"


def test_activity_keeps_unknown_fields_and_parses_decimal_amounts() -> None:
    event = parse_activity(
        b'{"event_id":"e","type":"purchase","occurred_at":"2026-11-20T15:04:05+08:00",'
        b'"member_id":"m","data":{"order_id":"o","amount":"2500.10","items":[]},"new_field":1}'
    )
    assert isinstance(event, Purchase)
    assert event.data.amount == Decimal("2500.10")
    assert event.model_extra == {"new_field": 1}


def test_grants_and_ledger_events_with_added_fields_still_parse() -> None:
    """CONTRACT.md: adding fields is fine. A consumer (the ledger reading grants, the
    notifier reading ledger events) ignores one it does not know instead of dead-lettering
    the event, and the published schemas do not forbid them either."""
    grant = parse_grant(
        b'{"event_id":"g","type":"points_granted","occurred_at":"2026-11-20T15:04:05+08:00",'
        b'"member_id":"m","schema_version":1,"added":true,"data":{"rule_id":"base",'
        b'"ruleset_version":"2026.1","points":10,"source_event_id":"e","source_type":"purchase",'
        b'"added_too":[1]}}'
    )
    assert isinstance(grant, PointsGranted)
    assert grant.data.points == 10
    event = parse_ledger_event(
        b'{"event_id":"l","type":"points_earned","occurred_at":"2026-11-20T15:04:05+08:00",'
        b'"member_id":"m","schema_version":1,"added":1,"data":{"entry_id":"l","points":10,'
        b'"balance_after":10,"rule_id":"base","ruleset_version":"2026.1",'
        b'"source_event_id":"e","added_too":"x"}}'
    )
    assert isinstance(event, PointsEarned)
    assert event.data.balance_after == 10
    for filename, text in render_all().items():
        assert '"additionalProperties": false' not in text, filename


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"{not json", "json_invalid"),
        (
            b'{"event_id":"e","type":"teleport","occurred_at":"2026-11-20T15:04:05+08:00",'
            b'"member_id":"m","data":{}}',
            "union_tag_invalid",
        ),
        (
            b'{"event_id":"e","type":"purchase","occurred_at":"2026-11-20T15:04:05",'
            b'"member_id":"m","data":{"order_id":"o","amount":"1"}}',
            "timezone_aware",
        ),
        (
            b'{"event_id":"e","type":"purchase","occurred_at":"2026-11-20T15:04:05+08:00",'
            b'"member_id":"m","data":{"order_id":"o","amount":"-1"}}',
            "value_error",
        ),
        (
            b'{"event_id":"e","type":"purchase","schema_version":2,'
            b'"occurred_at":"2026-11-20T15:04:05+08:00",'
            b'"member_id":"m","data":{"order_id":"o","amount":"1"}}',
            "literal_error",
        ),
        (
            b'{"event_id":"e","type":"check_in","occurred_at":"2026-11-20T15:04:05+08:00",'
            b'"member_id":"m","data":{"kind":"visit","booking_id":"b-1",'
            b'"arrived_at":"2026-11-20T15:04:05+08:00"}}',
            "value_error",
        ),
    ],
)
def test_bad_activity_is_refused_with_a_reason(raw: bytes, fragment: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse_activity(raw)
    assert fragment in {e["type"] for e in info.value.errors()}


def test_a_visit_without_its_booking_names_what_is_missing() -> None:
    with pytest.raises(ValidationError, match="a visit needs booked_at, slot_start"):
        parse_activity(
            b'{"event_id":"e","type":"check_in","occurred_at":"2026-11-20T15:04:05+08:00",'
            b'"member_id":"m","data":{"kind":"visit","booking_id":"b-1"}}'
        )
    # A missed visit (no arrival) and a sign-in (no booking) are valid.
    parse_activity(
        b'{"event_id":"e","type":"check_in","occurred_at":"2026-11-20T15:04:05+08:00",'
        b'"member_id":"m","data":{"kind":"visit","booking_id":"b-1",'
        b'"booked_at":"2026-11-18T15:00:00+08:00","slot_start":"2026-11-20T15:00:00+08:00",'
        b'"arrived_at":null}}'
    )
    parse_activity(
        b'{"event_id":"e","type":"check_in","occurred_at":"2026-11-20T15:04:05+08:00",'
        b'"member_id":"m","data":{"kind":"sign_in"}}'
    )


def test_grant_ids_are_deterministic_and_distinct_per_rule_and_member() -> None:
    a = grant_id("evt-1", "base", "m-1")
    assert a == grant_id("evt-1", "base", "m-1")
    assert a != grant_id("evt-1", "big_ticket", "m-1")
    assert a != grant_id("evt-1", "base", "m-2")
    assert a != grant_id("evt-1", "base", "m-1", kind="revoke")


def _unbounded_strings(node: object, path: str = "") -> list[str]:
    """The places in a JSON schema where any string of any length is valid."""
    if isinstance(node, list):
        return [p for i, n in enumerate(node) for p in _unbounded_strings(n, f"{path}[{i}]")]
    if not isinstance(node, dict):
        return []
    found = []
    if node.get("type") == "string" and not {"maxLength", "pattern", "enum", "const"} & set(node):
        found.append(path)
    for key, value in node.items():
        if key != "then":  # the visit's extra `required`, whose properties are bounded above
            found += _unbounded_strings(value, f"{path}/{key}")
    return found


def test_every_string_of_the_activity_contract_is_bounded() -> None:
    """The rules service copies upstream ids into grants and the ledger into its events:
    an activity of a 1 MB store id was accepted, its grant refused by the broker."""
    schema = json.loads((JSON_DIR / "activity.v1.schema.json").read_text(encoding="utf-8"))
    assert _unbounded_strings(schema) == []


def test_ids_of_200_characters_are_taken_and_longer_ones_refused() -> None:
    def purchase(store_id: str, order_id: str) -> bytes:
        return json.dumps(
            {"event_id": "e", "type": "purchase", "occurred_at": "2026-11-20T15:04:05+08:00",
             "member_id": "m", "store_id": store_id,
             "data": {"order_id": order_id, "amount": "1",
                      "items": [{"project_code": "p", "category": "c" * MAX_ID_CHARS,
                                 "amount": "1"}]}}
        ).encode()  # fmt: skip

    event = parse_activity(purchase("s" * MAX_ID_CHARS, "o" * MAX_ID_CHARS))
    assert isinstance(event, Purchase)
    assert event.store_id == "s" * 200
    for store_id, order_id in (("s" * 201, "o"), ("s", "o" * 201), ("s" * 1_048_000, "o")):
        with pytest.raises(ValidationError) as info:
            parse_activity(purchase(store_id, order_id))
        assert {e["type"] for e in info.value.errors()} == {"string_too_long"}


@pytest.mark.parametrize(
    "where", ["event_id", "member_id", "store_id", "order_id", "category", "referrer_id"]
)
def test_a_nul_in_any_upstream_string_is_refused(where: str) -> None:
    """Postgres's text columns refuse NUL: an order id holding one was paid by the rules
    (their state is JSON) and every grant of it dead-lettered by the ledger."""
    fields = {"event_id": "e", "member_id": "m", "store_id": "s", "order_id": "o",
              "category": "c", "referrer_id": "r"}  # fmt: skip
    fields[where] = "a\u0000b"
    if where == "referrer_id":
        raw = {"event_id": fields["event_id"], "type": "referral", "member_id": "m",
               "occurred_at": "2026-11-20T15:04:05+08:00",
               "data": {"referrer_id": fields["referrer_id"]}}  # fmt: skip
    else:
        raw = {"event_id": fields["event_id"], "type": "purchase", "member_id": fields["member_id"],
               "occurred_at": "2026-11-20T15:04:05+08:00", "store_id": fields["store_id"],
               "data": {"order_id": fields["order_id"], "amount": "1",
                        "items": [{"project_code": "p", "category": fields["category"],
                                   "amount": "1"}]}}  # fmt: skip
    with pytest.raises(ValidationError) as info:
        parse_activity(json.dumps(raw).encode())
    assert {e["type"] for e in info.value.errors()} == {"string_pattern_mismatch"}


def test_a_spend_past_what_the_ledger_stores_is_refused() -> None:
    """asyncpg wrote a Decimal of a huge exponent as 0: a tier report of 1E+131072 was
    stored as a spend of 0.00 instead of being dead-lettered."""

    def report(spend: str) -> bytes:
        return json.dumps(
            {"event_id": "g", "type": "tier_evaluated", "member_id": "m",
             "occurred_at": "2026-11-20T15:04:05+08:00",
             "data": {"tier": "diamond", "previous_tier": "member", "qualifying_spend": spend,
                      "tier_valid_until": None, "ruleset_version": "v", "source_event_id": "e"}}
        ).encode()  # fmt: skip

    assert parse_grant(report("999999999999999999.99")).data.qualifying_spend < 10**18
    for spend in ("1000000000000000000", "1E+131072"):
        with pytest.raises(ValidationError):
            parse_grant(report(spend))


def test_an_event_stored_before_the_bounds_is_read_back_without_them() -> None:
    """The rules keep what they acted on (`rules_activity`, `rules_held`); a referral paid
    late re-reads the referee's purchase: refused under a bound added since, the
    referrer's own event was dead-lettered, naming a field it does not have."""
    raw = json.dumps(
        {"event_id": "e", "type": "purchase", "occurred_at": "2026-11-20T15:04:05+08:00",
         "member_id": "m", "store_id": "s" * 300,
         "data": {"order_id": "o\u0000", "amount": "1", "items": []}}
    ).encode()  # fmt: skip
    with pytest.raises(ValidationError):
        parse_activity(raw)
    event = parse_activity(raw, stored=True)
    assert isinstance(event, Purchase)
    assert (event.store_id, event.data.order_id) == ("s" * 300, "o\u0000")
    # Nothing else is loosened: a stored payload that never was valid is still refused.
    with pytest.raises(ValidationError):
        parse_activity(raw.replace(b'"amount": "1"', b'"amount": "-1"'), stored=True)


def test_an_amount_finer_than_a_fen_is_refused_unless_stored_before_the_bound() -> None:
    def bought(amount: str) -> bytes:
        return json.dumps(
            {"event_id": "e", "type": "purchase", "occurred_at": "2026-11-20T15:04:05+08:00",
             "member_id": "m", "data": {"order_id": "o", "amount": amount, "items": []}}
        ).encode()  # fmt: skip

    assert parse_activity(bought("9999.99000")).data.amount == Decimal("9999.99")
    with pytest.raises(ValidationError) as refused:
        parse_activity(bought("9999.995"))
    label, reason = classify(refused.value)
    assert label == "schema_violation"
    assert "two decimals" in reason
    assert parse_activity(bought("9999.995"), stored=True).data.amount == Decimal("9999.995")


def _sign_in(at: str) -> bytes:
    return json.dumps(
        {"event_id": "e", "type": "check_in", "occurred_at": at, "member_id": "m",
         "data": {"kind": "sign_in"}}
    ).encode()  # fmt: skip


@pytest.mark.parametrize("at", ["1970-01-01T00:00:00+14:00", "2999-12-31T23:59:59-12:00"])
def test_activity_at_either_end_of_its_years_is_taken_and_evaluated(at: str) -> None:
    """The rules' window arithmetic (a year back, a year on, into the shared zone) holds
    at both bounds: year 1 passed the model and then raised OverflowError in it."""
    event = with_shared_tz(parse_activity(_sign_in(at)))
    assert evaluate(MemberState(member_id="m"), event, DEFAULT, {}).grants


@pytest.mark.parametrize("at", ["0001-01-01T00:00:00+08:00", "1969-12-31T23:59:59Z",
                                "3000-01-01T00:00:00+14:00"])  # fmt: skip
def test_activity_outside_its_years_is_a_schema_violation(at: str) -> None:
    with pytest.raises(ValidationError) as refused:
        parse_activity(_sign_in(at))
    label, reason = classify(refused.value)
    assert label == "schema_violation"
    assert "years 1970 to 2999" in reason


def test_activity_stored_before_the_years_were_bounded_is_read_back() -> None:
    assert parse_activity(_sign_in("1900-06-01T00:00:00Z"), stored=True).occurred_at.year == 1900


def test_our_own_events_keep_any_time_they_were_written_with() -> None:
    """Grants and ledger events of an activity taken before the bound are in the topics:
    a redelivery or a replay must not dead-letter them."""
    grant = parse_grant(
        b'{"event_id":"g","type":"points_granted","occurred_at":"1900-11-20T15:04:05+08:00",'
        b'"member_id":"m","data":{"rule_id":"sign_in","ruleset_version":"2026.1","points":5,'
        b'"source_event_id":"e","source_type":"check_in"}}'
    )
    assert grant.occurred_at.year == 1900
