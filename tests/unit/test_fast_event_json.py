"""`ledger_event_json` writes exactly the bytes `ledger_event(entry).model_dump_json()` writes.

The ledger events are the public contract: the fast writer must match pydantic byte for
byte (key order, ints, strings, times and their offsets), and where it cannot it must
hand over to the models so that they write or raise as before.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from msgspec.structs import replace
from pydantic_core import TzInfo

from services.ledger import accounting as acc
from services.ledger.journal import (
    entry_outbox_rows,
    ledger_event,
    ledger_event_json,
    outbox_rows,
)

SH = timezone(timedelta(hours=8))
T0 = datetime(2026, 3, 1, 9, 30, 15, 250000, tzinfo=SH)


def reference(entry: acc.Entry) -> bytes:
    return ledger_event(entry).model_dump_json().encode()


def outcome(write: Any, entry: acc.Entry) -> tuple[str, Any]:
    try:
        return "ok", write(entry)
    except Exception as exc:
        return "raised", (type(exc), str(exc))


def history() -> list[acc.Entry]:
    """Entries of every kind, from the accounting core as the services produce them."""
    book = acc.Book(member_id="m-1")
    entries: list[acc.Entry] = []
    commands: list[acc.Command] = [
        acc.Earn("g1", 800, T0, "base", "2026.1", "e1", order_id="o1", store_id="sh-jingan"),
        acc.Earn("g2", 300, T0 + timedelta(days=1), "sign_in", "2026.1", "e2", pending_days=7),
        acc.Redeem("r1", 600, T0 + timedelta(days=2), "red-1", store_id="sh-jingan"),
        acc.Revoke("v1", 500, T0 + timedelta(days=3), "o1", "base", "2026.1", "e3"),
        acc.Adjust("a1", 50, T0 + timedelta(days=4), '补偿 "goodwill"\n', "张三", "adj-1"),
        acc.Adjust("a2", -20, T0 + timedelta(days=5), "correction", "ops", "adj-2"),
        acc.Expire(T0 + timedelta(days=800)),
    ]
    for command in commands:
        for entry in acc.decide(book, command):
            book = acc.evolve(book, entry)
            entries.append(entry)
    return entries


def test_every_kind_the_core_produces_is_written_as_pydantic_writes_it() -> None:
    entries = history()
    assert {e.kind for e in entries} == set(acc.ENTRY_KINDS)
    for entry in entries:
        assert ledger_event_json(entry) == reference(entry)


@pytest.mark.parametrize(
    "zone",
    [UTC, timezone(timedelta(0)), TzInfo(0), TzInfo(28800), SH, ZoneInfo("Asia/Shanghai")],
)
@pytest.mark.parametrize("micro", [0, 1, 500000])
def test_times_keep_pydantics_format_in_every_zone(zone: Any, micro: int) -> None:
    at = datetime(2026, 7, 1, 23, 59, 59, micro, tzinfo=zone)
    entry = replace(history()[0], occurred_at=at, expires_at=at + timedelta(days=365))
    assert ledger_event_json(entry) == reference(entry)


def test_outbox_rows_of_entries_match_rows_of_their_events() -> None:
    entries = history()
    assert entry_outbox_rows("t", entries) == outbox_rows("t", map(ledger_event, entries))
    # An earn's grant's source type, by entry id (the journal does not keep it).
    types = {"g1": "purchase", "g2": "check_in"}
    events = [ledger_event(e, types.get(e.entry_id)) for e in entries]
    assert entry_outbox_rows("t", entries, types) == outbox_rows("t", events)


@pytest.mark.parametrize("source_type", ["refund", 'odd "quoted"\n', "lone \ud800 surrogate", 7])
def test_a_source_type_is_written_or_refused_as_pydantic_does(source_type: Any) -> None:
    for entry in history():
        assert outcome(lambda e: ledger_event_json(e, source_type), entry) == outcome(
            lambda e: ledger_event(e, source_type).model_dump_json().encode(), entry
        )


@pytest.mark.parametrize(
    "change",
    [
        {"occurred_at": datetime(2026, 1, 1, 12)},  # naive: the model refuses it
        {"expires_at": datetime(2026, 1, 1, 12)},
        {"kind": "gift"},  # no event type for it
        {"occurred_at": datetime(1900, 6, 1, 12, tzinfo=ZoneInfo("Asia/Shanghai"))},  # +08:05:43
        {"occurred_at": datetime(2026, 1, 1, tzinfo=timezone(timedelta(seconds=-61)))},
        {"points": True},  # a bool is not an int to orjson
        {"points": 2**70},  # beyond orjson's ints
        {"reason": "lone \ud800 surrogate"},
        {"store_id": 7},
    ],
)
def test_what_the_fast_writer_cannot_vouch_for_goes_through_the_models(
    change: dict[str, Any],
) -> None:
    entry = replace(history()[0], **change)
    assert outcome(ledger_event_json, entry) == outcome(reference, entry)


minute_zones = st.integers(-1439, 1439).map(lambda m: timezone(timedelta(minutes=m)))
odd_zones = st.one_of(
    st.integers(-86399, 86399).map(lambda s: timezone(timedelta(seconds=s))),
    st.integers(-86399, 86399).map(TzInfo),
    st.timezones(),  # includes local mean times with seconds in their offsets
    st.none(),
)
text = st.text(max_size=12)  # any code point but surrogates, control characters included
text_or_surrogates = st.text(st.characters(codec=None, exclude_categories=()), max_size=12)


def entries(
    zones: st.SearchStrategy[Any],
    ints: st.SearchStrategy[Any],
    text: st.SearchStrategy[str] = text,
) -> Any:
    times = st.datetimes(
        min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=zones
    )
    return st.builds(
        acc.Entry,
        entry_id=text,
        member_id=text,
        kind=st.sampled_from(acc.ENTRY_KINDS),
        points=ints,
        occurred_at=times,
        balance_after=ints,
        expires_at=st.none() | times,
        **{
            name: st.none() | text
            for name in (
                "rule_id",
                "ruleset_version",
                "source_event_id",
                "order_id",
                "store_id",
                "redemption_id",
                "adjustment_id",
                "reason",
                "operator",
            )
        },
    )


@settings(max_examples=400, deadline=None)
@given(entries(st.just(UTC) | minute_zones, st.integers(-(2**63), 2**63 - 1)))
def test_entries_are_written_as_pydantic_writes_them(entry: acc.Entry) -> None:
    assert ledger_event_json(entry) == reference(entry)


@settings(max_examples=400, deadline=None)
@given(
    entries(st.just(UTC) | minute_zones | odd_zones, st.integers(-(2**70), 2**70) | st.booleans())
)
def test_any_entry_is_written_or_refused_exactly_as_pydantic_does(entry: acc.Entry) -> None:
    assert outcome(ledger_event_json, entry) == outcome(reference, entry)
