"""The rules' grant builders and `grant_json` match the contract models byte for byte.

Grants are the public contract on `loyalty.grants.v1`, and their ids make a replay
byte-identical: the unvalidated builders must give exactly the model pydantic validates
from the same JSON (fields in declaration order), and the fast writer must write what
`model_dump_json` writes, or hand over to it where it cannot vouch for a value.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from pydantic_core import TzInfo
from rules_factories import DEFAULT, T0, purchase, refund, ruleset
from test_rules_properties import fast, run, streams

from schemas.activity import Activity
from schemas.grants import (
    TIERS,
    GrantData,
    GrantEvent,
    PointsGranted,
    PointsRevoked,
    RevokeData,
    TierData,
    TierEvaluated,
    grant_adapter,
    grant_id,
)
from services.rules.emit import grant_json, granted, revoked, tier_report


def reference(grant: GrantEvent) -> bytes:
    return grant.model_dump_json().encode()


def outcome(write: Any, grant: GrantEvent) -> tuple[str, Any]:
    try:
        return "ok", write(grant)
    except Exception as exc:
        return "raised", (type(exc), str(exc))


def in_field_order(model: BaseModel) -> bool:
    return list(model.__dict__) == list(type(model).model_fields)


def one_of_each(event: Activity, at: datetime | None = None, spend: str = "1234.5") -> list[Any]:
    until = (at or event.occurred_at) + timedelta(days=365)
    return [
        *granted(event, DEFAULT, "base", 120, order_id="o-1"),
        *granted(event, DEFAULT, "share", 100),  # no order: None fields
        *revoked(event, "base", 60, order_id="o-1", version="2025.9", member_id="m-9"),
        tier_report(
            event.event_id,
            at or event.occurred_at,
            event.member_id,
            DEFAULT,
            previous="member",
            tier="silver",
            spend=Decimal(spend),
            valid_until=until,
        ),
        tier_report(
            event.event_id,
            at or event.occurred_at,
            event.member_id,
            DEFAULT,
            previous="gold",
            tier="diamond",
            spend=Decimal("-3"),
            valid_until=None,
        ),  # the top tier (no next tier), spend floored at zero, no end
    ]


def test_builders_give_the_validated_model_in_field_order() -> None:
    grants = one_of_each(purchase(amount=100))
    assert {g.type for g in grants} == {"points_granted", "points_revoked", "tier_evaluated"}
    for grant in grants:
        validated = grant_adapter.validate_json(reference(grant))
        assert grant == validated
        assert in_field_order(grant)
        assert in_field_order(grant.data)
        assert grant.model_fields_set == validated.model_fields_set
        assert reference(grant) == validated.model_dump_json().encode()


def test_builders_give_what_pydantic_builds_from_the_same_values() -> None:
    # Defaults (schema_version, type) come from the models here, literals in the builders.
    event = purchase(amount=100)
    envelope = {"occurred_at": event.occurred_at, "member_id": event.member_id}
    assert granted(event, DEFAULT, "base", 120, order_id="o-1") == [
        PointsGranted(
            event_id=grant_id(event.event_id, "base", event.member_id, "grant"),
            **envelope,
            data=GrantData(
                rule_id="base",
                ruleset_version=DEFAULT.version,
                points=120,
                source_event_id=event.event_id,
                source_type="purchase",
                store_id=event.store_id,
                order_id="o-1",
                pending_days=DEFAULT.pending_days,
            ),
        )
    ]
    assert revoked(event, "base", 60, order_id="o-1", version="2025.9") == [
        PointsRevoked(
            event_id=grant_id(event.event_id, "base", event.member_id, "revoke"),
            **envelope,
            data=RevokeData(
                rule_id="base",
                ruleset_version="2025.9",
                points=60,
                source_event_id=event.event_id,
                order_id="o-1",
                store_id=event.store_id,
            ),
        )
    ]
    until = event.occurred_at + timedelta(days=365)
    report = tier_report(event.event_id, event.occurred_at, event.member_id, DEFAULT,
                         previous="member", tier="silver", spend=Decimal("12000.5"),
                         valid_until=until)  # fmt: skip
    assert report == TierEvaluated(
        event_id=grant_id(event.event_id, DEFAULT.rule_ids.tier, event.member_id, "tier"),
        **envelope,
        data=TierData(
            tier="silver",
            previous_tier="member",
            qualifying_spend=Decimal("12000.5"),
            tier_valid_until=until,
            ruleset_version=DEFAULT.version,
            source_event_id=event.event_id,
            next_tier="gold",
            next_tier_spend=DEFAULT.tiers.thresholds["gold"],
        ),
    )


def test_tier_amounts_are_written_as_money_whatever_their_exponent() -> None:
    # A rule set's thresholds load as written: 1E+4 and 30000.50 are still "10000" and
    # "30000.50" on the wire, as pydantic's Money serializer writes them.
    odd = ruleset(tiers={"thresholds": {"silver": Decimal("1E+4"), "gold": Decimal("30000.50"),
                                        "diamond": Decimal("1E+5")}})  # fmt: skip
    event = purchase(amount=100)
    for previous, tier, spend in [("member", "member", "1E+2"), ("member", "silver", "0.10")]:
        report = tier_report(event.event_id, event.occurred_at, event.member_id, odd,
                             previous=previous, tier=tier, spend=Decimal(spend),
                             valid_until=None)  # fmt: skip
        assert grant_json(report) == reference(report)
    assert b'"next_tier_spend":"10000"' in grant_json(
        tier_report(event.event_id, event.occurred_at, event.member_id, odd,
                    previous="member", tier="member", spend=Decimal(0), valid_until=None)
    )  # fmt: skip


def test_every_grant_type_is_written_as_pydantic_writes_it() -> None:
    for grant in one_of_each(purchase(amount=100)):
        assert grant_json(grant) == reference(grant)


def test_plain_grants_are_written_without_the_models(monkeypatch: pytest.MonkeyPatch) -> None:
    grants = one_of_each(purchase(amount=100))
    expected = [reference(g) for g in grants]

    def refuse(self: BaseModel, **_: Any) -> str:
        raise AssertionError(f"{type(self).__name__} went through model_dump_json")

    for cls in (PointsGranted, PointsRevoked, TierEvaluated):
        monkeypatch.setattr(cls, "model_dump_json", refuse)
    assert [grant_json(g) for g in grants] == expected


@pytest.mark.parametrize(
    "zone",
    [UTC, timezone(timedelta(0)), TzInfo(0), TzInfo(28800), ZoneInfo("Asia/Shanghai")],
)
@pytest.mark.parametrize("micro", [0, 1, 500000])
def test_times_keep_pydantics_format_in_every_zone(zone: Any, micro: int) -> None:
    at = datetime(2026, 7, 1, 23, 59, 59, micro, tzinfo=zone)
    for grant in one_of_each(purchase(amount=100, at=at), at=at):
        assert grant_json(grant) == reference(grant)


@pytest.mark.parametrize(
    "at",
    [
        datetime(1900, 6, 1, 12, tzinfo=ZoneInfo("Asia/Shanghai")),  # +08:05:43
        datetime(2026, 1, 1, tzinfo=timezone(timedelta(seconds=-61))),
    ],
)
def test_offsets_with_seconds_go_through_the_models(at: datetime) -> None:
    # The contract's parse refuses such offsets; a Python caller can still build them.
    for grant in one_of_each(purchase(amount=100), at=at):
        assert grant_json(grant) == reference(grant)


@fast
@given(streams)
def test_grants_of_any_stream_are_written_as_pydantic_writes_them(
    events: list[Activity],
) -> None:
    for grant in run(events).grants:
        assert grant_json(grant) == reference(grant)


minute_zones = st.integers(-1439, 1439).map(lambda m: timezone(timedelta(minutes=m)))
odd_zones = st.one_of(
    st.integers(-86399, 86399).map(lambda s: timezone(timedelta(seconds=s))),
    st.timezones(),  # includes local mean times with seconds in their offsets
)
times = st.datetimes(
    min_value=datetime(1, 1, 2),
    max_value=datetime(9999, 12, 30),
    timezones=minute_zones | odd_zones,
)
ids = st.text(max_size=12)  # any code point but surrogates (the ids hash their UTF-8)
text = st.text(st.characters(codec=None, exclude_categories=()), max_size=12)  # surrogates too
amounts = st.decimals(allow_nan=False, allow_infinity=False, places=None) | st.sampled_from(
    [Decimal("1E+3"), Decimal("0.10"), Decimal("-0"), Decimal("12345678901234567890.123")]
)


@settings(max_examples=300, deadline=None)
@given(
    event_id=ids,
    member_id=ids.filter(bool),
    rule_id=ids,
    version=text,
    order_id=text,
    points=st.integers(1, 2**70),
    at=times,
    until=st.none() | times,
    spend=amounts,
    tiers=st.tuples(st.sampled_from(TIERS), st.sampled_from(TIERS)),
)
def test_any_grant_is_written_or_refused_exactly_as_pydantic_does(
    event_id: str,
    member_id: str,
    rule_id: str,
    version: str,
    order_id: str,
    points: int,
    at: datetime,
    until: datetime | None,
    spend: Decimal,
    tiers: tuple[Any, Any],
) -> None:
    event = refund("m-1", "o-1", "10", at=T0)
    event = event.model_copy(
        update={"event_id": event_id, "member_id": member_id, "occurred_at": at}
    )
    grants = [
        *granted(event, DEFAULT, rule_id, points, order_id=order_id, version=version),
        *revoked(event, rule_id, points, order_id=order_id, version=version),
        tier_report(
            event_id,
            at,
            member_id,
            DEFAULT,
            previous=tiers[0],
            tier=tiers[1],
            spend=spend,
            valid_until=until,
        ),
    ]
    for grant in grants:
        assert outcome(grant_json, grant) == outcome(reference, grant)
