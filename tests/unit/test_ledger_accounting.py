"""Examples for the pure ledger core: one scenario per rule of DOMAIN.md."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from msgspec.structs import fields, replace

from services.ledger.accounting import (
    Adjust,
    Allocation,
    BelowMinimum,
    Book,
    Command,
    Earn,
    Entry,
    Expire,
    InsufficientPoints,
    JournalError,
    Redeem,
    Revoke,
    add_months,
    available,
    decide,
    evolve,
    expire_entry_id,
    replay,
    replay_as_of,
    spendable,
)

SH = timezone(timedelta(hours=8))
T0 = datetime(2025, 1, 10, 12, 0, tzinfo=SH)
M = "m-10086"


def at(days: float) -> datetime:
    return T0 + timedelta(days=days)


def earn(
    entry_id: str,
    points: int,
    when: datetime = T0,
    *,
    order_id: str | None = None,
    months: int = 12,
) -> Earn:
    return Earn(
        entry_id=entry_id,
        points=points,
        occurred_at=when,
        rule_id="base",
        ruleset_version="2025.1",
        source_event_id=f"ev-{entry_id}",
        order_id=order_id,
        store_id="sh-jingan",
        lifetime_months=months,
    )


def revoke(entry_id: str, points: int, when: datetime, order_id: str) -> Revoke:
    return Revoke(
        entry_id=entry_id,
        points=points,
        occurred_at=when,
        order_id=order_id,
        rule_id="base",
        ruleset_version="2025.1",
        source_event_id=f"ev-{entry_id}",
    )


def redeem(entry_id: str, points: int, when: datetime, min_balance: int = 500) -> Redeem:
    return Redeem(
        entry_id=entry_id,
        points=points,
        at=when,
        redemption_id=f"r-{entry_id}",
        min_balance=min_balance,
    )


def adjust(entry_id: str, points: int, when: datetime, *, allow_debt: bool = False) -> Adjust:
    return Adjust(
        entry_id=entry_id,
        points=points,
        at=when,
        reason="goodwill",
        operator="op-7",
        adjustment_id=f"adj-{entry_id}",
        allow_debt=allow_debt,
    )


def run(*commands: Command, book: Book | None = None) -> tuple[Book, list[Entry]]:
    book = book or Book(member_id=M)
    journal: list[Entry] = []
    for command in commands:
        for entry in decide(book, command):
            book = evolve(book, entry)
            journal.append(entry)
    return book, journal


def remaining(book: Book) -> dict[str, int]:
    return {lot.lot_id: lot.remaining for lot in book.lots}


# --------------------------------------------------------------------------- add_months


@pytest.mark.parametrize(
    ("start", "months", "expected"),
    [
        (datetime(2025, 3, 15, 9, 30, tzinfo=SH), 12, datetime(2026, 3, 15, 9, 30, tzinfo=SH)),
        (datetime(2024, 1, 31, tzinfo=SH), 1, datetime(2024, 2, 29, tzinfo=SH)),
        (datetime(2025, 1, 31, tzinfo=SH), 1, datetime(2025, 2, 28, tzinfo=SH)),
        (datetime(2025, 3, 31, tzinfo=SH), 1, datetime(2025, 4, 30, tzinfo=SH)),
        (datetime(2024, 2, 29, tzinfo=SH), 12, datetime(2025, 2, 28, tzinfo=SH)),
        (datetime(2024, 2, 29, tzinfo=SH), 48, datetime(2028, 2, 29, tzinfo=SH)),
        (datetime(2025, 12, 31, tzinfo=SH), 2, datetime(2026, 2, 28, tzinfo=SH)),
        (datetime(2025, 11, 30, tzinfo=SH), 1, datetime(2025, 12, 30, tzinfo=SH)),
        (datetime(2025, 3, 31, tzinfo=SH), -1, datetime(2025, 2, 28, tzinfo=SH)),
        (datetime(2025, 1, 15, tzinfo=SH), -13, datetime(2023, 12, 15, tzinfo=SH)),
        (datetime(2025, 5, 31, tzinfo=SH), 0, datetime(2025, 5, 31, tzinfo=SH)),
    ],
)
def test_add_months_clamps_to_month_end(start: datetime, months: int, expected: datetime) -> None:
    result = add_months(start, months)
    assert result == expected
    assert result.tzinfo is start.tzinfo


# --------------------------------------------------------------------------- earn


def test_earn_creates_a_lot_expiring_12_calendar_months_later() -> None:
    book, [entry] = run(earn("e1", 3850, datetime(2025, 8, 31, 15, tzinfo=SH), order_id="o1"))
    assert entry.kind == "earn"
    assert entry.points == 3850
    assert entry.expires_at == datetime(2026, 8, 31, 15, tzinfo=SH)
    assert entry.balance_after == 3850
    assert entry.debt_delta == 0
    assert entry.allocations == ()
    assert (entry.rule_id, entry.ruleset_version, entry.source_event_id) == (
        "base",
        "2025.1",
        "ev-e1",
    )
    [lot] = book.lots
    assert lot.lot_id == "e1"
    assert (lot.points, lot.remaining, lot.order_id, lot.rule_id) == (3850, 3850, "o1", "base")
    assert lot.source_event_id == "ev-e1"
    assert book.earned == 3850
    assert book.debt == 0


def test_earn_lifetime_months_is_data() -> None:
    _, [entry] = run(earn("e1", 10, datetime(2025, 1, 31, tzinfo=SH), months=1))
    assert entry.expires_at == datetime(2025, 2, 28, tzinfo=SH)


# 17:00 UTC on 28 February 2023 is 01:00 on 1 March in Shanghai.
UTC_STAMP = datetime(2023, 2, 28, 17, 0, tzinfo=UTC)
SHANGHAI = ZoneInfo("Asia/Shanghai")


@pytest.mark.parametrize("stamped", [UTC_STAMP, UTC_STAMP.astimezone(SH)], ids=["utc", "+08"])
def test_a_lots_months_are_counted_on_the_rule_sets_calendar_whatever_the_offset(
    stamped: datetime,
) -> None:
    """Counted on UTC's calendar, 28 Feb 2023 + 12 months is 28 Feb 2024, 01:00 on 29 Feb in
    Shanghai: a day early. On Shanghai's, 1 Mar 2023 01:00 + 12 months is 1 Mar 2024 01:00."""
    command = replace(earn("e1", 100, stamped), zone=SHANGHAI)
    _, [entry] = run(command)
    assert entry.expires_at == datetime(2024, 3, 1, 1, 0, tzinfo=SHANGHAI)
    assert entry.expires_at.utcoffset() == stamped.utcoffset()  # written as it came


def test_an_adjustments_months_are_counted_on_the_rule_sets_calendar() -> None:
    command = replace(adjust("a1", 500, UTC_STAMP), zone=SHANGHAI)
    _, [entry] = run(command)
    assert entry.expires_at == datetime(2024, 3, 1, 1, 0, tzinfo=SHANGHAI)


@pytest.mark.parametrize("points", [0, -5])
def test_commands_reject_non_positive_points(points: int) -> None:
    with pytest.raises(ValueError, match="positive"):
        earn("e1", points)
    with pytest.raises(ValueError, match="positive"):
        redeem("r1", points, T0)
    with pytest.raises(ValueError, match="positive"):
        revoke("v1", points, T0, "o1")


def test_naive_times_are_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        earn("e1", 10, datetime(2025, 1, 1))
    with pytest.raises(ValueError, match="timezone-aware"):
        Expire(datetime(2025, 1, 1))


# --------------------------------------------------------------------------- reads


def test_reads_never_count_a_lot_past_its_expiry_even_before_the_sweep() -> None:
    book, _ = run(earn("e1", 800, T0, months=1), earn("e2", 300, at(5)))
    expiry = add_months(T0, 1)
    assert available(book, expiry - timedelta(microseconds=1)) == 1100
    assert available(book, expiry) == 300  # expires_at is exclusive: gone at that instant
    assert available(book, expiry + timedelta(days=1)) == 300
    assert book.outstanding == 1100  # still on the books until the expire entry


# --------------------------------------------------------------------------- redeem


def test_redeem_is_fifo_by_soonest_expiry_not_by_earning_order() -> None:
    book, _ = run(
        earn("long", 1000, T0, months=12),  # earned first, expires last
        earn("short", 400, at(1), months=2),
        earn("mid", 600, at(2), months=6),
    )
    book, [entry] = run(redeem("r1", 700, at(3)), book=book)
    assert entry.kind == "redeem"
    assert entry.points == -700
    assert entry.allocations == (Allocation("short", 400), Allocation("mid", 300))
    assert entry.redemption_id == "r-r1"
    assert entry.balance_after == 1300
    assert entry.debt_delta == 0
    assert remaining(book) == {"mid": 300, "long": 1000}
    assert book.redeemed == 700


def test_redeem_is_all_or_nothing() -> None:
    book, _ = run(earn("e1", 900))
    with pytest.raises(InsufficientPoints) as refused:
        decide(book, redeem("r1", 901, at(1)))
    assert (refused.value.available, refused.value.requested) == (900, 901)
    # Nothing was taken: the same full amount is still redeemable.
    book, [entry] = run(redeem("r2", 900, at(1)), book=book)
    assert entry.balance_after == 0
    assert book.lots == ()


def test_redeem_needs_a_balance_of_at_least_500() -> None:
    book, _ = run(earn("e1", 499))
    with pytest.raises(BelowMinimum) as refused:
        decide(book, redeem("r1", 100, at(1)))  # a lucky draw, but the balance is 499
    assert (refused.value.available, refused.value.minimum) == (499, 500)

    book, _ = run(earn("e2", 1), book=book)
    book, [entry] = run(redeem("r2", 100, at(1)), book=book)  # 500 is enough
    assert entry.balance_after == 400
    with pytest.raises(BelowMinimum):
        decide(book, redeem("r3", 100, at(1)))


def test_below_minimum_is_checked_before_insufficient() -> None:
    book, _ = run(earn("e1", 300))
    with pytest.raises(BelowMinimum):
        decide(book, redeem("r1", 5000, at(1)))


def test_redeem_min_balance_comes_from_the_policy() -> None:
    book, _ = run(earn("e1", 300))
    _, [entry] = run(redeem("r1", 100, at(1), min_balance=0), book=book)
    assert entry.balance_after == 200


def test_redeem_cannot_spend_expired_points() -> None:
    book, _ = run(earn("old", 5000, T0, months=1), earn("new", 600, at(20)))
    when = add_months(T0, 1) + timedelta(hours=1)  # "old" expired, sweeper has not run
    assert available(book, when) == 600
    with pytest.raises(InsufficientPoints):
        decide(book, redeem("r1", 601, when))
    _, [entry] = run(redeem("r2", 600, when), book=book)
    assert entry.allocations == (Allocation("new", 600),)


# --------------------------------------------------------------------------- revoke / debt


def test_revoke_takes_the_purchases_own_lots_first() -> None:
    book, _ = run(
        earn("other", 500, T0, order_id="o0", months=3),  # expires sooner
        earn("own", 1000, at(1), order_id="o1"),
        earn("own-bonus", 100, at(1), order_id="o1"),
    )
    book, [entry] = run(revoke("v1", 1050, at(2), "o1"), book=book)
    assert entry.kind == "revoke"
    assert entry.points == -1050
    assert entry.order_id == "o1"
    assert entry.allocations == (Allocation("own", 1000), Allocation("own-bonus", 50))
    assert entry.debt_delta == 0
    assert remaining(book) == {"other": 500, "own-bonus": 50}


def test_revoke_falls_back_to_other_lots_fifo_then_debt() -> None:
    book, _ = run(
        earn("own", 1000, T0, order_id="o1"),
        earn("later", 200, at(1), order_id="o2", months=12),
        earn("sooner", 300, at(2), order_id="o3", months=3),
    )
    book, _ = run(redeem("r1", 900, at(3)), book=book)  # takes sooner 300, own 600
    assert remaining(book) == {"own": 400, "later": 200}
    book, [entry] = run(revoke("v1", 1000, at(4), "o1"), book=book)
    assert entry.allocations == (Allocation("own", 400), Allocation("later", 200))
    assert entry.debt_delta == 400
    assert entry.balance_after == 0
    assert book.debt == 400
    assert book.revoked == 1000
    assert book.lots == ()


def test_debt_from_a_refund_after_spending_is_paid_first_by_later_earnings() -> None:
    # Earn 1,000 on o1, spend it all, then o1 is refunded.
    book, _ = run(earn("e1", 1000, T0, order_id="o1"), redeem("r1", 1000, at(1)))
    book, [v] = run(revoke("v1", 1000, at(2), "o1"), book=book)
    assert v.debt_delta == 1000
    assert book.debt == 1000
    assert spendable(book, at(2)) == 0

    # A 300-point earning goes entirely to the debt: no lot.
    book, [e2] = run(earn("e2", 300, at(3)), book=book)
    assert e2.points == 300
    assert e2.debt_delta == -300
    assert e2.balance_after == 0
    assert book.debt == 700
    assert book.lots == ()

    # An 1,000-point earning pays the remaining 700 and keeps 300.
    book, [e3] = run(earn("e3", 1000, at(4)), book=book)
    assert e3.debt_delta == -700
    assert e3.balance_after == 300
    assert book.debt == 0
    [lot] = book.lots
    assert (lot.lot_id, lot.points, lot.remaining) == ("e3", 1000, 300)
    assert book.earned == 2300
    assert book.outstanding - book.debt == (
        book.earned - book.redeemed - book.revoked - book.expired + book.adjusted
    )


def test_revoke_ignores_expired_lots() -> None:
    book, _ = run(earn("own", 1000, T0, order_id="o1", months=1))
    book, [entry] = run(revoke("v1", 1000, add_months(T0, 1), "o1"), book=book)
    assert entry.allocations == ()
    assert entry.debt_delta == 1000
    # The expired lot is still swept as an expiry, not silently netted.
    _, [x] = run(Expire(add_months(T0, 1)), book=book)
    assert x.points == -1000


# --------------------------------------------------------------------------- adjust


def test_positive_adjustment_creates_a_lot_after_paying_debt() -> None:
    book, _ = run(adjust("a0", -200, T0, allow_debt=True))
    assert book.debt == 200
    book, [entry] = run(adjust("a1", 500, at(1)), book=book)
    assert entry.kind == "adjust"
    assert (entry.points, entry.debt_delta, entry.balance_after) == (500, -200, 300)
    assert (entry.reason, entry.operator, entry.adjustment_id) == ("goodwill", "op-7", "adj-a1")
    assert entry.expires_at == add_months(at(1), 12)
    [lot] = book.lots
    assert (lot.lot_id, lot.remaining) == ("a1", 300)
    assert (lot.source_event_id, lot.adjustment_id) == (None, "adj-a1")
    assert book.adjusted == 300
    assert book.debt == 0


def test_negative_adjustment_consumes_fifo() -> None:
    book, _ = run(earn("late", 500, T0, months=12), earn("soon", 500, T0, months=2))
    book, [entry] = run(adjust("a1", -600, at(1)), book=book)
    assert entry.points == -600
    assert entry.allocations == (Allocation("soon", 500), Allocation("late", 100))
    assert entry.debt_delta == 0
    assert book.adjusted == -600


def test_negative_adjustment_beyond_the_balance_is_refused_unless_debt_is_allowed() -> None:
    book, _ = run(earn("e1", 100))
    with pytest.raises(InsufficientPoints):
        decide(book, adjust("a1", -150, at(1)))
    book, [entry] = run(adjust("a2", -150, at(1), allow_debt=True), book=book)
    assert entry.allocations == (Allocation("e1", 100),)
    assert entry.debt_delta == 50
    assert book.debt == 50


def test_adjustment_needs_points_reason_and_operator() -> None:
    with pytest.raises(ValueError, match="move points"):
        adjust("a1", 0, T0)
    with pytest.raises(ValueError, match="reason"):
        replace(adjust("a1", 5, T0), reason=" ")
    with pytest.raises(ValueError, match="operator"):
        replace(adjust("a1", 5, T0), operator="")


# --------------------------------------------------------------------------- expire


def test_expire_writes_one_entry_per_lapsed_lot_with_a_deterministic_id() -> None:
    book, _ = run(
        earn("a", 300, T0, months=1),
        earn("b", 200, at(1), months=1),
        earn("c", 700, at(2), months=12),
    )
    book, _ = run(redeem("r1", 100, at(3)), book=book)  # a: 200 left
    sweep_at = add_months(at(1), 1)
    book_after, entries = run(Expire(sweep_at), book=book)
    assert [(e.kind, e.points, e.allocations) for e in entries] == [
        ("expire", -200, (Allocation("a", 200),)),
        ("expire", -200, (Allocation("b", 200),)),
    ]
    assert [e.entry_id for e in entries] == [expire_entry_id("a"), expire_entry_id("b")]
    assert entries[0].entry_id == str(
        uuid.uuid5(uuid.UUID("3d6b0c7e-52a1-4f0e-9c2b-8e41a7d9f5c3"), "a|expire")
    )
    # Dated when the points lapsed, not when the sweeper ran.
    assert [e.occurred_at for e in entries] == [add_months(T0, 1), add_months(at(1), 1)]
    assert [e.balance_after for e in entries] == [900, 700]
    # What caused it, as every ledger event says: the grant's rule and rule-set version.
    assert [(e.rule_id, e.ruleset_version) for e in entries] == [("base", "2025.1")] * 2
    assert entries[0].source_event_id == "ev-a"
    assert remaining(book_after) == {"c": 700}
    assert book_after.expired == 400
    # Sweeping again finds nothing; a later sweep would have written the same entries.
    assert decide(book_after, Expire(sweep_at)) == []
    assert decide(book, Expire(sweep_at + timedelta(days=30))) == entries


def test_an_adjustments_lot_expires_naming_the_adjustment_not_a_source_event() -> None:
    """Its expiry carried the adjustment's id as `source_event_id`, `adjustment_id` null."""
    book, _ = run(adjust("a1", 800, T0))
    (lot,) = book.lots
    assert (lot.source_event_id, lot.adjustment_id) == (None, "adj-a1")
    (entry,) = decide(book, Expire(at(400)))
    assert (entry.kind, entry.points) == ("expire", -800)
    assert (entry.source_event_id, entry.adjustment_id) == (None, "adj-a1")
    assert (entry.rule_id, entry.ruleset_version) == (None, None)
    # A grant's lot names its source event and no adjustment, as before.
    book, _ = run(earn("g", 100, T0))
    (entry,) = decide(book, Expire(at(400)))
    assert (entry.source_event_id, entry.adjustment_id) == ("ev-g", None)


def test_expire_leaves_unexpired_lots_alone() -> None:
    book, _ = run(earn("a", 300, T0, months=1))
    assert decide(book, Expire(add_months(T0, 1) - timedelta(seconds=1))) == []
    assert len(decide(book, Expire(add_months(T0, 1)))) == 1


# --------------------------------------------------------------------------- evolve / replay


def test_replay_of_the_journal_rebuilds_the_book() -> None:
    book, journal = run(
        earn("e1", 1000, T0, order_id="o1"),
        earn("e2", 800, at(10), order_id="o2", months=1),
        redeem("r1", 1500, at(11)),
        revoke("v1", 1000, at(12), "o1"),
        earn("e3", 50, at(13)),
        adjust("a1", 900, at(14)),
        Expire(at(60)),
    )
    assert replay(M, journal) == book
    assert replay(M, []) == Book(member_id=M)
    assert [e.kind for e in journal] == ["earn", "earn", "redeem", "revoke", "earn", "adjust"]


def test_evolve_rejects_entries_that_do_not_fit() -> None:
    book, [entry] = run(earn("e1", 100))
    with pytest.raises(JournalError, match="belongs to"):
        evolve(Book(member_id="someone-else"), entry)
    with pytest.raises(JournalError, match="already exists"):
        evolve(book, entry)
    over = Entry(
        entry_id="r1",
        member_id=M,
        kind="redeem",
        points=-200,
        occurred_at=at(1),
        allocations=(Allocation("e1", 200),),
    )
    with pytest.raises(JournalError, match="lacks"):
        evolve(book, over)
    with pytest.raises(JournalError, match="add up"):
        evolve(book, replace(over, points=-50, allocations=(Allocation("e1", 40),)))
    with pytest.raises(JournalError, match="never creates debt"):
        evolve(
            book, replace(over, points=-150, allocations=(Allocation("e1", 100),), debt_delta=50)
        )
    with pytest.raises(JournalError, match="more debt"):
        evolve(book, replace(entry, entry_id="e2", debt_delta=-10))
    with pytest.raises(JournalError, match="expires_at"):
        evolve(book, replace(entry, entry_id="e2", expires_at=None))
    with pytest.raises(JournalError, match="negative"):
        evolve(book, replace(over, points=5))


def test_as_of_folds_a_part_of_the_journal_that_is_not_consistent() -> None:
    """Earn 1000 on o1, redeem it, refund o1 (debt 1000), then a late purchase dated before
    the refund pays 300 of that debt. Up to a moment between the late purchase and the
    refund, the entries (in seq order) pay debt not owed yet: `replay` refuses them; the
    ?as_of= fold shows the late purchase's 300 in its lot and no debt."""
    _, journal = run(
        earn("e1", 1000, at(0), order_id="o1"),
        redeem("r1", 1000, at(10)),
        revoke("v1", 1000, at(20), "o1"),
        earn("e2", 300, at(15)),
    )
    assert [e.debt_delta for e in journal] == [0, 0, 1000, -300]
    part = [e for e in journal if e.occurred_at <= at(17)]
    with pytest.raises(JournalError, match="more debt"):
        replay(M, part)
    shown = replay_as_of(M, part)
    assert (shown.debt, shown.earned, shown.redeemed, remaining(shown)) == (
        0,
        1300,
        1000,
        {"e2": 300},
    )
    assert available(shown, at(17)) == 300
    # The whole journal: exactly the strict fold.
    assert replay_as_of(M, journal) == replay(M, journal)
    assert replay_as_of(M, journal).debt == 700


def test_as_of_caps_allocations_at_what_the_lots_hold_then() -> None:
    """A consuming entry that takes from a lot not there (created by an entry dated later)
    or holding less then: it takes what is there; its total still counts in full."""
    _, [e1] = run(earn("e1", 100, at(5)))
    take = Entry(
        entry_id="r1",
        member_id=M,
        kind="redeem",
        points=-150,
        occurred_at=at(6),
        allocations=(Allocation("e1", 100), Allocation("gone", 50)),
    )
    with pytest.raises(JournalError, match="lacks"):
        replay(M, [e1, take])
    shown = replay_as_of(M, [e1, take])
    assert (shown.lots, shown.redeemed, shown.debt) == ((), 150, 0)
    with pytest.raises(JournalError, match="belongs to"):
        replay_as_of("someone-else", [e1])


def test_spendable_subtracts_debt_when_times_arrive_out_of_order() -> None:
    # A lot that is still valid at an earlier moment while debt exists (out-of-order times).
    book, _ = run(earn("e1", 1000, T0, months=1))
    book, _ = run(revoke("v1", 1200, add_months(T0, 1), "o9"), book=book)  # lot expired
    assert book.debt == 1200
    earlier = at(1)
    assert available(book, earlier) == 1000
    assert spendable(book, earlier) == 0
    with pytest.raises(BelowMinimum):
        decide(book, redeem("r1", 100, earlier))


def test_entries_are_timezone_agnostic_instants() -> None:
    book, _ = run(earn("e1", 600, T0))
    utc_now = T0.astimezone(UTC) + timedelta(days=1)
    _, [entry] = run(redeem("r1", 600, utc_now), book=book)
    assert entry.balance_after == 0


def test_pending_points_are_shown_not_spent_until_available_from() -> None:
    from services.ledger.accounting import pending, spendable_lots

    t0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone(timedelta(hours=8)))
    book = Book(member_id="m-1")
    for entry_id, pts, days in (("e1", 600, 0), ("e2", 900, 7)):
        cmd = Earn(
            entry_id=entry_id,
            points=pts,
            occurred_at=t0,
            rule_id="base",
            ruleset_version="v1",
            source_event_id=entry_id,
            pending_days=days,
        )
        [entry] = decide(book, cmd)
        book = evolve(book, entry)
    assert [lot.available_from for lot in book.lots if lot.lot_id == "e2"] == [
        t0 + timedelta(days=7)
    ]
    assert available(book, t0) == 600
    assert pending(book, t0) == 900
    assert [lot.lot_id for lot in spendable_lots(book, t0)] == ["e1"]
    with pytest.raises(InsufficientPoints):
        decide(book, Redeem(entry_id="r1", points=700, at=t0, redemption_id="r1"))
    later = t0 + timedelta(days=7)
    assert available(book, later) == 1500
    assert pending(book, later) == 0
    [entry] = decide(book, Redeem(entry_id="r2", points=700, at=later, redemption_id="r2"))
    assert dict(entry.allocations) == {"e1": 600, "e2": 100}
    # The journal keeps the pending moment, so a replay restores it.
    assert replay("m-1", [*_journal_of(book, t0)]).lots == book.lots


def test_points_dated_ahead_of_the_clock_are_pending_until_then() -> None:
    """A till whose clock runs fast dates a grant in the future: the reads show it pending
    until its moment (reads.py), so the core must not let a redemption spend it sooner."""
    from services.ledger.accounting import pending, spendable_lots

    now = at(30)
    book, _ = run(earn("soon", 1000, now + timedelta(hours=2)))
    assert spendable(book, now) == 0
    assert spendable_lots(book, now) == []
    assert book.lots[0].pending_at(now)
    with pytest.raises(BelowMinimum):
        decide(book, redeem("r1", 600, now))
    # As a running balance (an entry's balance_after) it counts: journaled before.
    assert (available(book, now), pending(book, now)) == (1000, 0)
    later = now + timedelta(hours=2)
    assert spendable(book, later) == 1000
    assert not book.lots[0].pending_at(later)
    [entry] = decide(book, redeem("r2", 600, later))
    assert dict(entry.allocations) == {"soon": 600}


def _journal_of(book: Book, t0: datetime) -> list[Entry]:
    return [
        Entry(
            entry_id=lot.lot_id,
            member_id=book.member_id,
            kind="earn",
            points=lot.points,
            occurred_at=lot.earned_at,
            expires_at=lot.expires_at,
            available_from=lot.available_from,
            source_event_id=lot.source_event_id,
            rule_id=lot.rule_id,
            ruleset_version=lot.ruleset_version,
        )
        for lot in book.lots
    ]


# --------------------------------------------------------------------------- fields carried over


def _sentinels(cls: type[object]) -> dict[str, object]:
    """A distinct object per field: equal to no default and to no other field."""
    return {f.name: object() for f in fields(cls)}  # type: ignore[arg-type]


def test_evolve_carries_over_every_book_field_it_does_not_compute() -> None:
    """`evolve` builds its Book field by field: a field added to Book must survive it."""
    computed = {"lots", "debt", "earned", "redeemed", "revoked", "expired", "adjusted"}
    carried = {k: v for k, v in _sentinels(Book).items() if k not in computed}
    assert "member_id" in carried
    book = Book(**carried)  # type: ignore[arg-type]
    [entry] = decide(Book(member_id=M), earn("e1", 100))
    after = evolve(book, replace(entry, member_id=book.member_id))
    assert after == replace(book, **{name: getattr(after, name) for name in computed})
    assert after.earned == 100
