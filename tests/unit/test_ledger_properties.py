"""Property tests: random member histories of earn, redeem, revoke, adjust and expire.

The invariants checked after every step (time moves forward, as on one partition):

1. conservation: ``sum(lot.remaining) - debt == earned - redeemed - revoked - expired
   + adjusted``; so at any moment ``t`` before the first remaining lot's expiry,
   ``available(book, t) - debt`` equals that signed total;
2. per entry: ``delta(sum of remaining) - debt_delta == entry.points``;
3. no lot below zero (kept lots have ``0 < remaining <= points``), debt >= 0;
4. FIFO: a redemption takes a prefix of the unexpired lots in expiry order, each but the
   last emptied, so it never takes from a later-expiring lot while an earlier-expiring
   unexpired lot still has points; it never touches an expired lot;
5. refusals are exact: ``BelowMinimum`` iff spendable < minimum, else
   ``InsufficientPoints`` iff spendable < points; a redemption never leaves spendable < 0;
6. a revoke drains the refunded order's own unexpired lots before any other lot;
7. debt > 0 implies nothing unexpired is left (debt is only created once the lots are
   exhausted, and every earning pays debt first);
8. after ``Expire(now)`` no lot with ``expires_at <= now`` keeps points;
9. ``replay(journal) == `` the book built step by step; entry ids are unique;
   ``replay_as_of(journal)`` too, and it folds any part of a journal without refusing;
10. pending points (an earn with ``pending_days``) are never spent by a redemption or a
    debt-refusing deduction before their ``available_from``, and never counted in
    ``available``; ``available + pending`` is what the unexpired lots hold.

And the fast paths equal the plain code they replaced, kept here as the reference:

11. ``apply(book, command)`` is ``decide`` followed by the fold of ``evolve`` over its
    entries (same book, same entries, same refusal), for every kind of command;
12. `evolve` (lots kept in order, a new lot inserted in place) gives the same book as
    rebuilding and re-sorting every lot, also for out-of-order times and for entries that
    do not fit (the same `JournalError`); the reads that find the unexpired lots by
    bisection (`available`, `pending`, `unexpired_lots`, `spendable_lots`, the due lots of
    `Expire`) equal a scan of every lot, at and around every lot's expiry, in any zone.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from msgspec.structs import replace

from services.ledger.accounting import (
    Adjust,
    BelowMinimum,
    Book,
    Command,
    Earn,
    Entry,
    Expire,
    InsufficientPoints,
    JournalError,
    LedgerError,
    Lot,
    Redeem,
    Revoke,
    _check_shape,
    _fifo_key,
    add_months,
    apply,
    available,
    decide,
    evolve,
    pending,
    replay,
    replay_as_of,
    spendable,
    spendable_lots,
    unexpired_lots,
)

SH = timezone(timedelta(hours=8))
T0 = datetime(2025, 1, 31, 10, 0, tzinfo=SH)
M = "m-prop"
ORDERS = ("o1", "o2", "o3", None)

points = st.integers(min_value=1, max_value=3000)
SHAPES: dict[str, st.SearchStrategy[tuple[Any, ...]]] = {
    "earn": st.tuples(
        st.just("earn"),
        points,
        st.sampled_from(ORDERS),
        st.sampled_from([1, 1, 2, 3, 12]),
        st.sampled_from([0, 0, 0, 7, 30]),
    ),
    "redeem": st.tuples(st.just("redeem"), points, st.sampled_from([0, 500])),
    "revoke": st.tuples(st.just("revoke"), st.integers(1, 1500), st.sampled_from(ORDERS[:3])),
    "adjust": st.tuples(
        st.just("adjust"), st.integers(-1500, 3000).filter(lambda p: p != 0), st.booleans()
    ),
    "expire": st.tuples(st.just("expire")),
}
# Earnings and redemptions weighted up, so balances build, lots lapse and FIFO has choices.
KINDS = ["earn"] * 4 + ["redeem"] * 3 + ["revoke", "adjust", "expire"]
op = st.sampled_from(KINDS).flatmap(lambda kind: SHAPES[kind])
# (minutes to advance, operation): advances up to ~3 months so lots do lapse mid-history.
history = st.lists(st.tuples(st.integers(0, 60 * 24 * 90), op), max_size=40)


def command_for(n: int, now: datetime, spec: tuple[Any, ...]) -> Command:
    kind = spec[0]
    entry_id = f"x{n}"
    if kind == "earn":
        return Earn(
            entry_id=entry_id,
            points=spec[1],
            occurred_at=now,
            rule_id="base",
            ruleset_version="v1",
            source_event_id=f"ev{n}",
            order_id=spec[2],
            lifetime_months=spec[3],
            pending_days=spec[4],
        )
    if kind == "redeem":
        return Redeem(
            entry_id=entry_id, points=spec[1], at=now, redemption_id=f"r{n}", min_balance=spec[2]
        )
    if kind == "revoke":
        return Revoke(
            entry_id=entry_id,
            points=spec[1],
            occurred_at=now,
            order_id=spec[2],
            rule_id="base",
            ruleset_version="v1",
            source_event_id=f"ev{n}",
        )
    if kind == "adjust":
        return Adjust(
            entry_id=entry_id,
            points=spec[1],
            at=now,
            reason="prop",
            operator="op",
            adjustment_id=f"a{n}",
            allow_debt=spec[2],
        )
    return Expire(now)


def attempt(book: Book, command: Command) -> list[Entry] | LedgerError:
    try:
        return decide(book, command)
    except LedgerError as refused:
        return refused


def signed_total(book: Book) -> int:
    return book.earned - book.redeemed - book.revoked - book.expired + book.adjusted


def check_book(book: Book, now: datetime) -> None:
    assert book.debt >= 0
    for lot in book.lots:
        assert 0 < lot.remaining <= lot.points
        assert lot.member_id == M
    assert list(book.lots) == sorted(book.lots, key=lambda x: (x.expires_at, x.earned_at, x.lot_id))
    # (1) conservation, and its reading through `available` before any expiry.
    assert book.outstanding - book.debt == signed_total(book)
    before_any_expiry = min((lot.expires_at for lot in book.lots), default=now) - timedelta(
        microseconds=1
    )
    held = available(book, before_any_expiry) + pending(book, before_any_expiry)
    assert held - book.debt == signed_total(book)
    # (7)
    if book.debt > 0:
        assert available(book, now) == pending(book, now) == 0
    assert 0 <= spendable(book, now) <= available(book, now)
    # (10)
    assert available(book, now) + pending(book, now) == sum(
        lot.remaining for lot in unexpired_lots(book, now)
    )


def check_entry(before: Book, after: Book, entry: Entry) -> None:
    # (2) per-entry conservation.
    assert after.outstanding - before.outstanding - entry.debt_delta == entry.points
    assert entry.balance_after == available(after, entry.occurred_at)
    assert entry.member_id == M
    if entry.kind in ("earn", "revoke", "redeem", "expire"):
        assert (entry.points > 0) == (entry.kind == "earn")


def check_fifo(before: Book, entry: Entry, now: datetime, may_take_pending: bool = False) -> None:
    """(4): the allocations are the greedy prefix of the spendable lots in FIFO order, then
    (a debt-allowing deduction only) of the pending ones; (10) pending last."""
    ready = spendable_lots(before, now)
    live = ready + [lot for lot in unexpired_lots(before, now) if lot not in ready]
    by_id = {lot.lot_id: lot for lot in live}
    taken = dict(entry.allocations)
    assert all(lot_id in by_id for lot_id in taken)  # never an expired lot
    ids = [lot.lot_id for lot in live]
    prefix = ids[: len(taken)]
    assert list(taken) == prefix
    for lot_id in prefix[:-1]:
        assert taken[lot_id] == by_id[lot_id].remaining
    # The plain statement: nothing later-expiring is touched while earlier points remain.
    ready_ids = {lot.lot_id for lot in ready}
    if not may_take_pending:
        assert all(lot_id in ready_ids for lot_id in taken)  # (10) never pending points
    for lot_id in taken.keys() & ready_ids:
        later = by_id[lot_id]
        for lot in ready:
            if lot.expires_at < later.expires_at:
                assert taken.get(lot.lot_id, 0) == lot.remaining


@settings(max_examples=400, deadline=None)
@given(history)
def test_random_histories_keep_the_books(steps: list[tuple[int, tuple[Any, ...]]]) -> None:
    book = Book(member_id=M)
    journal: list[Entry] = []
    now = T0
    for n, (advance, spec) in enumerate(steps):
        now = now + timedelta(minutes=advance)
        command = command_for(n, now, spec)
        outcome = attempt(book, command)
        if isinstance(outcome, BelowMinimum):
            assert isinstance(command, Redeem)
            assert spendable(book, now) == outcome.available < command.min_balance
            continue
        if isinstance(outcome, InsufficientPoints):
            assert isinstance(command, Redeem | Adjust)
            assert spendable(book, now) == outcome.available < outcome.requested
            if isinstance(command, Redeem):
                assert outcome.available >= command.min_balance
                assert outcome.requested == command.points
            else:
                assert not command.allow_debt
                assert outcome.requested == -command.points
            continue
        assert not isinstance(outcome, LedgerError)
        entries = outcome

        if isinstance(command, Redeem):
            assert spendable(book, now) >= max(command.min_balance, command.points)
            [entry] = entries
            check_fifo(book, entry, now)
            assert spendable(evolve(book, entry), now) == spendable(book, now) - command.points
        if isinstance(command, Adjust) and command.points < 0:
            check_fifo(book, entries[0], now, may_take_pending=command.allow_debt)
        if isinstance(command, Revoke):
            # (6) own lots first.
            [entry] = entries
            live = unexpired_lots(book, now)
            own = {lot.lot_id: lot.remaining for lot in live if lot.order_id == command.order_id}
            taken = dict(entry.allocations)
            if any(lot_id not in own for lot_id in taken):
                assert all(taken.get(lot_id) == rest for lot_id, rest in own.items())
            assert sum(taken.values()) == min(command.points, sum(lot.remaining for lot in live))
        if isinstance(command, Earn | Adjust) and command.points > 0:
            [entry] = entries
            assert entry.debt_delta == -min(book.debt, command.points)

        for entry in entries:
            after = evolve(book, entry)
            check_entry(book, after, entry)
            book = after
            journal.append(entry)
        check_book(book, now)
        if isinstance(command, Expire):
            # (8)
            assert all(lot.expires_at > now for lot in book.lots)
            assert decide(book, command) == []

    # (9)
    assert replay(M, journal) == book
    assert len({entry.entry_id for entry in journal}) == len(journal)
    # (13) the lenient ?as_of= fold is the strict one on a whole journal, and folds any
    # part of one (not a consistent journal) without refusing, keeping lots and debt sane.
    assert replay_as_of(M, journal) == book
    for part in (journal[::2], journal[1::2], journal[len(journal) // 2 :]):
        shown = replay_as_of(M, part)
        assert shown.debt >= 0
        assert all(0 < lot.remaining <= lot.points for lot in shown.lots)
        assert [_fifo_key(lot) for lot in shown.lots] == sorted(map(_fifo_key, shown.lots))


@settings(max_examples=300, deadline=None)
@given(history, st.integers(0, 60 * 24 * 400))
def test_a_late_sweep_writes_the_same_expiry_entries(
    steps: list[tuple[int, tuple[Any, ...]]], extra_minutes: int
) -> None:
    """Expire entries depend on the lot, not on when the sweeper runs."""
    book = Book(member_id=M)
    now = T0
    for n, (advance, spec) in enumerate(steps):
        now = now + timedelta(minutes=advance)
        if spec[0] == "expire":
            continue
        try:
            entries = decide(book, command_for(n, now, spec))
        except (BelowMinimum, InsufficientPoints):
            continue
        for entry in entries:
            book = evolve(book, entry)
    early = decide(book, Expire(now))
    late = decide(book, Expire(now + timedelta(minutes=extra_minutes)))
    assert late[: len(early)] == early


@given(
    st.datetimes(
        min_value=datetime(2000, 1, 1),
        max_value=datetime(2090, 12, 31),
        timezones=st.just(SH),
    ),
    st.integers(-240, 240),
    st.integers(-240, 240),
)
def test_add_months_properties(moment: datetime, a: int, b: int) -> None:
    shifted = add_months(moment, a)
    assert (shifted.year * 12 + shifted.month) - (moment.year * 12 + moment.month) == a
    assert shifted.day <= moment.day
    assert shifted.time() == moment.time()
    assert shifted.tzinfo is moment.tzinfo
    if moment.day <= 28:
        assert shifted.day == moment.day
        assert add_months(add_months(moment, a), b) == add_months(moment, a + b)
    if a > 0:
        assert shifted > moment


# --------------------------------------------------------------------------- fast paths


def attempt_apply(book: Book, command: Command) -> tuple[Book, list[Entry]] | LedgerError:
    try:
        return apply(book, command)
    except LedgerError as refused:
        return refused


def fold(book: Book, entries: list[Entry]) -> Book:
    for entry in entries:
        book = evolve(book, entry)
    return book


@pytest.mark.parametrize("kind", list(SHAPES))
@settings(max_examples=150, deadline=None)
@given(steps=history, last=st.data())
def test_apply_is_decide_then_evolve(
    kind: str, steps: list[tuple[int, tuple[Any, ...]]], last: st.DataObject
) -> None:
    """(11), at every step of a random history that ends with a command of ``kind``."""
    steps = [*steps, (last.draw(st.integers(0, 60 * 24 * 90)), last.draw(SHAPES[kind]))]
    book = Book(member_id=M)
    now = T0
    for n, (advance, spec) in enumerate(steps):
        now = now + timedelta(minutes=advance)
        command = command_for(n, now, spec)
        decided = attempt(book, command)
        applied = attempt_apply(book, command)
        if isinstance(decided, LedgerError):
            assert isinstance(applied, LedgerError)
            assert (type(applied), applied.args) == (type(decided), decided.args)
            continue
        assert applied == (fold(book, decided), decided)
        book, _ = applied


def reference_evolve(book: Book, entry: Entry) -> Book:
    """`evolve` as it was: every lot into a dict, then all of them re-sorted."""
    if entry.member_id != book.member_id:
        raise JournalError(f"{entry.entry_id}: belongs to {entry.member_id}, not {book.member_id}")
    _check_shape(entry)

    lots = {lot.lot_id: lot for lot in book.lots}
    for lot_id, part in entry.allocations:
        lot = lots.get(lot_id)
        if lot is None or part > lot.remaining:
            raise JournalError(f"{entry.entry_id}: takes {part} from lot {lot_id} it lacks")
        lots[lot_id] = replace(lot, remaining=lot.remaining - part)

    debt = book.debt + entry.debt_delta
    if debt < 0:
        raise JournalError(f"{entry.entry_id}: pays off more debt than is owed")

    if entry.creates_lot:
        if entry.entry_id in lots:
            raise JournalError(f"{entry.entry_id}: lot already exists")
        assert entry.expires_at is not None
        remaining = entry.points + entry.debt_delta
        if remaining > 0:
            lots[entry.entry_id] = Lot(
                lot_id=entry.entry_id,
                member_id=entry.member_id,
                points=entry.points,
                remaining=remaining,
                earned_at=entry.occurred_at,
                expires_at=entry.expires_at,
                source_event_id=entry.source_event_id,
                order_id=entry.order_id,
                rule_id=entry.rule_id,
                available_from=entry.available_from,
                ruleset_version=entry.ruleset_version,
                adjustment_id=entry.adjustment_id,
            )

    moved = -entry.points
    return replace(
        book,
        lots=tuple(sorted((lot for lot in lots.values() if lot.remaining > 0), key=_fifo_key)),
        debt=debt,
        earned=book.earned + (entry.points if entry.kind == "earn" else 0),
        redeemed=book.redeemed + (moved if entry.kind == "redeem" else 0),
        revoked=book.revoked + (moved if entry.kind == "revoke" else 0),
        expired=book.expired + (moved if entry.kind == "expire" else 0),
        adjusted=book.adjusted + (entry.points if entry.kind == "adjust" else 0),
    )


def evolve_outcome(step: Callable[[Book, Entry], Book], book: Book, entry: Entry) -> Book | str:
    try:
        return step(book, entry)
    except JournalError as refused:
        return str(refused)


def check_reads_scan_every_lot(book: Book, at: datetime) -> None:
    """The bisection reads against the plain scans they replaced."""
    live = sorted(
        (lot for lot in book.lots if lot.remaining > 0 and lot.expires_at > at), key=_fifo_key
    )
    assert unexpired_lots(book, at) == live
    assert spendable_lots(book, at) == [lot for lot in live if not lot.pending_at(at)]
    # `available` and `pending` split the unexpired points by `available_from` alone (a
    # running balance counts a lot dated later); `pending_at` also holds a lot dated later.
    held = [lot for lot in live if lot.available_from is not None and lot.available_from > at]
    assert available(book, at) == sum(lot.remaining for lot in live if lot not in held)
    assert pending(book, at) == sum(lot.remaining for lot in held)
    assert all(lot.pending_at(at) for lot in held)
    assert [lot for lot in live if lot.pending_at(at) and lot not in held] == [
        lot for lot in live if lot.available_from is None and lot.earned_at > at
    ]
    due = sorted(
        (lot for lot in book.lots if lot.remaining > 0 and lot.expires_at <= at), key=_fifo_key
    )
    swept = decide(book, Expire(at))
    assert [e.allocations for e in swept] == [((lot.lot_id, lot.remaining),) for lot in due]


# Times also go back (up to ~13 months), so new lots land before, between and after others.
unordered_history = st.lists(st.tuples(st.integers(-60 * 24 * 400, 60 * 24 * 90), op), max_size=40)


@settings(max_examples=300, deadline=None)
@given(unordered_history)
def test_fast_paths_equal_the_plain_code(steps: list[tuple[int, tuple[Any, ...]]]) -> None:
    """(12)"""
    book = Book(member_id=M)
    journal: list[Entry] = []
    now = T0
    for n, (advance, spec) in enumerate(steps):
        now = now + timedelta(minutes=advance)
        outcome = attempt(book, command_for(n, now, spec))
        if isinstance(outcome, LedgerError):
            continue
        for entry in outcome:
            after = evolve(book, entry)
            assert after == reference_evolve(book, entry)
            book = after
            journal.append(entry)
        # Every earlier entry again: lots that exist already, or lack the points taken.
        for entry in journal:
            assert evolve_outcome(evolve, book, entry) == evolve_outcome(
                reference_evolve, book, entry
            )
        moments = {now, now.astimezone(UTC)}
        for lot in book.lots:
            for edge in (lot.expires_at, lot.available_from or lot.earned_at):
                moments |= {edge, edge - timedelta(microseconds=1), edge.astimezone(UTC)}
        for moment in moments:
            check_reads_scan_every_lot(book, moment)
