"""Pure ledger accounting core: lots, debt, FIFO-by-expiry spending, and the journal fold.

No I/O, no clock, no logging: every moment comes in as an argument. The shape is the
classic event-sourcing pair:

* ``decide(book, command) -> list[Entry]`` looks at a member's book and a command and
  returns the journal entries that record what happened (or raises a refusal such as
  `BelowMinimum` / `InsufficientPoints`). It never changes anything.
* ``evolve(book, entry) -> Book`` applies one entry. It never re-decides: every entry
  carries its own allocations (which lot gave how many points) and its change in debt, so
  replaying a journal gives the same book on any machine, under any rule set, forever.
* ``apply(book, command) -> (Book, list[Entry])`` is `decide` with the book after its
  entries: `decide` already folds them (to stamp ``balance_after``), so a caller that
  keeps the book need not fold each entry a second time.
* ``replay(member_id, entries)`` is the fold of `evolve`, for rebuilding read models.

Definitions (the numbers the HTTP API and the reports expose):

* A *lot* is the points of one earning entry (an earn, or a positive adjustment); its
  ``lot_id`` is that entry's id. A lot is *unexpired at t* iff ``expires_at > t``.
* ``available(book, t)`` is the sum of the remaining points of lots unexpired at ``t``
  and no longer held (``available_from`` not after ``t``, below); a read never counts an
  expired lot, even before the sweeper (`Expire`) wrote its entry.
* ``debt`` is points owed: a revoke (refund) or a debt-allowing deduction that the lots
  could not cover. Later earnings (earns and positive adjustments) pay it off first.
* A lot is *pending at t* iff ``available_from > t`` (a rule set may hold points for N
  days, `Earn.pending_days`), or, with no ``available_from``, iff ``earned_at > t`` (a
  grant dated ahead of the clock, a till whose clock runs fast: the reads show it pending
  until then, so a redemption must not spend it either): it is shown (`pending`) and not
  spent by a redemption; ``available`` leaves out only the first kind, since as a running
  balance (``balance_after``) it counts the lots journaled before an entry, whatever their
  dates. A refund may still take a pending lot back (its own purchase's points), and a
  debt-allowing deduction takes it before it creates debt, so debt still only exists
  while no unexpired lot (pending or not) has points left.
* ``spendable(book, t) = max(0, sum of spendable_lots(book, t) - debt)`` is what a
  redemption or a (debt-refusing) deduction may take. When a member's commands arrive in
  time order, debt is only ever positive while no unexpired lot has points left, so then
  spendable equals available (bar lots dated after ``t``); the subtraction only matters
  for out-of-order times.

Conservation (holds after every entry, whatever the times):

    sum(lot.remaining for lot in book.lots) - book.debt
        == earned - redeemed - revoked - expired + adjusted

where the totals are gross: ``earned`` counts the points of earn entries including the
part that paid off debt, ``revoked`` includes the part that became debt, ``adjusted`` is
the signed sum of adjustments. At any moment before the first lot's expiry the left-hand
sum of remaining equals ``available + pending``.

Every entry also satisfies, per entry, ``delta(sum of remaining) - debt_delta == points``.

Adjustments: a positive adjustment behaves like an earn (pays debt first, then creates a
lot that expires ``lifetime_months`` later). A negative adjustment consumes lots FIFO by
expiry; if it is larger than what is spendable it is refused with `InsufficientPoints`,
unless the operator passes ``allow_debt=True``, in which case the shortfall becomes debt.

Idempotency (the same redemption id or source event delivered twice) is the store's job:
entry ids are deterministic, so the adapter dedupes on ``entry_id`` before calling
`decide`/`evolve`.
"""

from __future__ import annotations

import calendar
import uuid
from bisect import bisect_right
from collections.abc import Iterable
from datetime import datetime, timedelta, tzinfo
from operator import attrgetter
from typing import Literal, NamedTuple, assert_never

import msgspec
from msgspec.structs import replace

__all__ = [
    "DEFAULT_LIFETIME_MONTHS",
    "DEFAULT_MIN_BALANCE",
    "ENTRY_KINDS",
    "Adjust",
    "Allocation",
    "BelowMinimum",
    "Book",
    "Command",
    "Earn",
    "Entry",
    "EntryKind",
    "Expire",
    "InsufficientPoints",
    "JournalError",
    "LedgerError",
    "Lot",
    "Redeem",
    "Revoke",
    "add_months",
    "apply",
    "available",
    "decide",
    "derived_entry_id",
    "evolve",
    "expire_entry_id",
    "months_later",
    "pending",
    "replay",
    "replay_as_of",
    "spendable",
    "spendable_lots",
    "unexpired_lots",
]

EntryKind = Literal["earn", "redeem", "revoke", "expire", "adjust"]
ENTRY_KINDS: tuple[EntryKind, ...] = ("earn", "redeem", "revoke", "expire", "adjust")

DEFAULT_LIFETIME_MONTHS = 12
DEFAULT_MIN_BALANCE = 500
# DOMAIN.md: members are warned 30 and 7 days before points expire.
WARNING_DAYS: tuple[int, ...] = (30, 7)

# Fixed namespace: changing it would change every derived entry id and break dedupe.
_LEDGER_NAMESPACE = uuid.UUID("3d6b0c7e-52a1-4f0e-9c2b-8e41a7d9f5c3")


# --------------------------------------------------------------------------- errors


class LedgerError(Exception):
    """Base of everything this core raises on purpose."""


class BelowMinimum(LedgerError):
    """Redemption refused: the spendable balance is under the redemption minimum."""

    def __init__(self, available: int, minimum: int) -> None:
        super().__init__(f"balance {available} is below the redemption minimum {minimum}")
        self.available = available
        self.minimum = minimum


class InsufficientPoints(LedgerError):
    """Refused: the spendable balance cannot cover the points asked for."""

    def __init__(self, available: int, requested: int) -> None:
        super().__init__(f"requested {requested} points but only {available} are available")
        self.available = available
        self.requested = requested


class JournalError(LedgerError):
    """An entry does not fit the book it is applied to (corrupt or out-of-order journal)."""


# --------------------------------------------------------------------------- time


def add_months(moment: datetime, months: int) -> datetime:
    """Calendar-month arithmetic, clamping the day to the target month's last day.

    ``add_months(2024-01-31, 1) == 2024-02-29``; time of day and tzinfo are kept.
    """
    index = moment.year * 12 + (moment.month - 1) + months
    year, month0 = divmod(index, 12)
    month = month0 + 1
    # Every month has 28 days: only a later day needs the month's length.
    day = moment.day if moment.day <= 28 else min(moment.day, calendar.monthrange(year, month)[1])
    return moment.replace(year=year, month=month, day=day)


def months_later(moment: datetime, months: int, zone: tzinfo | None = None) -> datetime:
    """`moment` plus calendar months counted on `zone`'s calendar, in `moment`'s offset.

    The rule set's zone (DOMAIN: days are Asia/Shanghai days): a producer's UTC stamp for
    01:00 on 1 March in Shanghai still reads 28 February, and counted there a 12-month
    lot would lapse on 29 February of a leap year, a day early. None: `moment`'s own
    calendar.
    """
    if zone is None:
        return add_months(moment, months)
    offset = moment.utcoffset()
    if offset == zone.utcoffset(moment):
        # Written in the zone's offset (the usual case): its calendar as it reads, at a
        # fifth of the cost of converting there and back (this runs on every purchase),
        # unless the zone's offset changes in between (summer time).
        later = add_months(moment, months)
        if zone.utcoffset(later) == offset:
            return later
    return add_months(moment.astimezone(zone), months).astimezone(moment.tzinfo)


def _require_aware(name: str, moment: datetime) -> None:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware")


def _require_positive(name: str, value: int) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")


# --------------------------------------------------------------------------- state

# The values here are frozen msgspec Structs: immutable and compared by value like frozen
# dataclasses, but built in C. A frozen dataclass's __init__ sets each field through
# object.__setattr__, and the ledger builds several values per grant (an Entry 2.1 against
# 0.15 us). gc=False: they hold only immutable values, so they cannot be part of a cycle.


class Lot(msgspec.Struct, frozen=True, gc=False):
    """Points from one earning entry; ``lot_id`` is that entry's id."""

    lot_id: str
    member_id: str
    points: int
    remaining: int
    earned_at: datetime
    expires_at: datetime
    source_event_id: str | None
    order_id: str | None = None
    rule_id: str | None = None
    # Pending until then (None: available from ``earned_at``).
    available_from: datetime | None = None
    # Of the grant that created the lot (None for an adjustment): its expiry and warnings
    # carry it, as every ledger event carries what caused it.
    ruleset_version: str | None = None
    # Of the adjustment that created the lot (then ``source_event_id`` is None), likewise.
    adjustment_id: str | None = None

    def pending_at(self, at: datetime) -> bool:
        return (self.available_from or self.earned_at) > at


def _fifo_key(lot: Lot) -> tuple[datetime, datetime, str]:
    """Spending order: soonest expiry first, then oldest, then id (a total order)."""
    return (lot.expires_at, lot.earned_at, lot.lot_id)


_lot_id = attrgetter("lot_id")
_expires_at = attrgetter("expires_at")


def _first_unexpired(lots: tuple[Lot, ...], at: datetime) -> int:
    """Index of the first lot unexpired at ``at``, for ``lots`` in FIFO order.

    FIFO order is expiry order, so the expired lots are a prefix: a bisection, and usually
    one comparison (a swept book has none), instead of one per lot. Each comparison is
    dear: every parsed datetime has its own tzinfo object, so it calls two ``utcoffset``.
    """
    if not lots or lots[0].expires_at > at:
        return 0
    return bisect_right(lots, at, key=_expires_at)


class Book(msgspec.Struct, frozen=True, gc=False):
    """One member's state, a fold of their journal.

    ``lots`` holds only lots with points remaining, in FIFO order (see `_fifo_key`); a lot
    past its expiry stays here until an expire entry empties it, but is never counted.
    `evolve` keeps that order without re-sorting and the reads rely on it, so a book
    built by hand (from the database) must sort its lots by `_fifo_key`.
    """

    member_id: str
    lots: tuple[Lot, ...] = ()
    debt: int = 0
    earned: int = 0
    redeemed: int = 0
    revoked: int = 0
    expired: int = 0
    adjusted: int = 0

    @property
    def outstanding(self) -> int:
        """Remaining points in all kept lots, expired-but-unswept included."""
        return sum(lot.remaining for lot in self.lots)


class Allocation(NamedTuple):
    """``points`` taken from lot ``lot_id`` by a consuming entry."""

    lot_id: str
    points: int


def unexpired_lots(book: Book, at: datetime) -> list[Lot]:
    """Lots with points that are still valid at ``at``, in spending (FIFO) order."""
    return [lot for lot in book.lots[_first_unexpired(book.lots, at) :] if lot.remaining > 0]


def spendable_lots(book: Book, at: datetime) -> list[Lot]:
    """Unexpired lots no longer pending at ``at``, in spending (FIFO) order."""
    return [lot for lot in unexpired_lots(book, at) if not lot.pending_at(at)]


def available(book: Book, at: datetime) -> int:
    """Remaining points of lots unexpired and not held (``available_from``) at ``at``:
    the running balance an entry records (``balance_after``). A lot dated after ``at``
    counts, as in journal order (a late entry sees the lots journaled before it); only a
    redemption or a deduction, deciding at the clock's moment, leaves such a lot to its
    moment (`spendable`). Comparing ``earned_at`` of every lot here, for every entry, cost
    the ledger a sixth of its CPU in the benchmark (datetimes under different tzinfo
    objects compare through two ``utcoffset`` calls)."""
    return sum(
        lot.remaining
        for lot in book.lots[_first_unexpired(book.lots, at) :]
        if lot.available_from is None or lot.available_from <= at
    )


def pending(book: Book, at: datetime) -> int:
    """Remaining points of unexpired lots held (``available_from``) at ``at``: with
    `available`, every unexpired point once. (The member view also shows a lot dated after
    its moment as pending: reads.py.)"""
    return sum(
        lot.remaining
        for lot in book.lots[_first_unexpired(book.lots, at) :]
        if lot.available_from is not None and lot.available_from > at
    )


def spendable(book: Book, at: datetime) -> int:
    """What a redemption may take: the lots spendable at ``at`` (none dated after it) minus
    what is owed, never negative."""
    return max(0, sum(lot.remaining for lot in spendable_lots(book, at)) - book.debt)


# --------------------------------------------------------------------------- commands


class Earn(msgspec.Struct, frozen=True, gc=False):
    """Points granted by a rule. Debt is paid first; the rest becomes a new lot."""

    entry_id: str
    points: int
    occurred_at: datetime
    rule_id: str
    ruleset_version: str
    source_event_id: str
    order_id: str | None = None
    store_id: str | None = None
    lifetime_months: int = DEFAULT_LIFETIME_MONTHS
    # Days the points stay pending before they can be spent (rule-set data, default 0).
    pending_days: int = 0
    # The calendar the lifetime is counted on (`months_later`): the rule set's zone.
    zone: tzinfo | None = None

    def __post_init__(self) -> None:
        _require_positive("points", self.points)
        _require_positive("lifetime_months", self.lifetime_months)
        _require_aware("occurred_at", self.occurred_at)
        if self.pending_days < 0:
            raise ValueError("pending_days must not be negative")


class Revoke(msgspec.Struct, frozen=True, gc=False):
    """Points taken back after a refund: own lots, then FIFO, then debt."""

    entry_id: str
    points: int
    occurred_at: datetime
    order_id: str
    rule_id: str
    ruleset_version: str
    source_event_id: str
    store_id: str | None = None

    def __post_init__(self) -> None:
        _require_positive("points", self.points)
        _require_aware("occurred_at", self.occurred_at)


class Redeem(msgspec.Struct, frozen=True, gc=False):
    """All-or-nothing spend, FIFO by expiry, only from a balance of at least ``min_balance``."""

    entry_id: str
    points: int
    at: datetime
    redemption_id: str
    min_balance: int = DEFAULT_MIN_BALANCE
    store_id: str | None = None

    def __post_init__(self) -> None:
        _require_positive("points", self.points)
        _require_aware("at", self.at)
        if self.min_balance < 0:
            raise ValueError("min_balance must not be negative")


class Adjust(msgspec.Struct, frozen=True, gc=False):
    """A manual grant (points > 0) or deduction (points < 0) by ops.

    A deduction larger than the spendable balance is refused unless ``allow_debt``.
    """

    entry_id: str
    points: int
    at: datetime
    reason: str
    operator: str
    adjustment_id: str
    allow_debt: bool = False
    lifetime_months: int = DEFAULT_LIFETIME_MONTHS
    zone: tzinfo | None = None  # as `Earn.zone`

    def __post_init__(self) -> None:
        if self.points == 0:
            raise ValueError("an adjustment must move points")
        if not self.reason.strip() or not self.operator.strip():
            raise ValueError("an adjustment needs a reason and the operator's id")
        _require_positive("lifetime_months", self.lifetime_months)
        _require_aware("at", self.at)


class Expire(msgspec.Struct, frozen=True, gc=False):
    """Sweep: one expire entry per lot with ``expires_at <= at`` and points remaining."""

    at: datetime

    def __post_init__(self) -> None:
        _require_aware("at", self.at)


Command = Earn | Revoke | Redeem | Adjust | Expire


# --------------------------------------------------------------------------- journal


class Entry(msgspec.Struct, frozen=True, gc=False):
    """One journal entry. ``points`` is signed (+ earn / positive adjust, - otherwise).

    Creating entries (earn, positive adjust) carry ``expires_at`` and a ``debt_delta`` in
    ``[-points, 0]`` (debt paid off); the new lot gets ``points + debt_delta``. Consuming
    entries carry ``allocations`` and a ``debt_delta >= 0`` (shortfall turned into debt)
    with ``sum(allocations) + debt_delta == -points``. ``balance_after`` is `available`
    after the entry, at its ``occurred_at``; `evolve` ignores it.
    """

    entry_id: str
    member_id: str
    kind: EntryKind
    points: int
    occurred_at: datetime
    balance_after: int = 0
    expires_at: datetime | None = None
    allocations: tuple[Allocation, ...] = ()
    debt_delta: int = 0
    rule_id: str | None = None
    ruleset_version: str | None = None
    source_event_id: str | None = None
    order_id: str | None = None
    store_id: str | None = None
    redemption_id: str | None = None
    adjustment_id: str | None = None
    reason: str | None = None
    operator: str | None = None
    # A creating entry whose points are pending until then (None: not pending).
    available_from: datetime | None = None

    @property
    def creates_lot(self) -> bool:
        return self.kind == "earn" or (self.kind == "adjust" and self.points > 0)


def derived_entry_id(*parts: str) -> str:
    """Deterministic id for an entry the ledger generates itself."""
    return str(uuid.uuid5(_LEDGER_NAMESPACE, "|".join(parts)))


def expire_entry_id(lot_id: str) -> str:
    """A lot expires at most once, so (lot, "expire") names its expiry entry forever."""
    return derived_entry_id(lot_id, "expire")


# --------------------------------------------------------------------------- decide


def _take(lots: Iterable[Lot], need: int) -> tuple[tuple[Allocation, ...], int]:
    """Take up to ``need`` points from ``lots`` in the given order."""
    allocations: list[Allocation] = []
    taken = 0
    for lot in lots:
        if taken == need:
            break
        part = min(lot.remaining, need - taken)
        if part > 0:
            allocations.append(Allocation(lot.lot_id, part))
            taken += part
    return tuple(allocations), taken


def _stamped(book: Book, entry: Entry) -> tuple[Book, Entry]:
    """Apply ``entry`` and fill in its ``balance_after``."""
    after = evolve(book, entry)
    return after, _with_balance(entry, available(after, entry.occurred_at))


def _with_balance(e: Entry, balance_after: int) -> Entry:
    return replace(e, balance_after=balance_after)


def _decide_earn(book: Book, cmd: Earn) -> tuple[Book, list[Entry]]:
    paid = min(book.debt, cmd.points)
    entry = Entry(
        entry_id=cmd.entry_id,
        member_id=book.member_id,
        kind="earn",
        points=cmd.points,
        occurred_at=cmd.occurred_at,
        expires_at=months_later(cmd.occurred_at, cmd.lifetime_months, cmd.zone),
        available_from=(
            cmd.occurred_at + timedelta(days=cmd.pending_days) if cmd.pending_days else None
        ),
        debt_delta=-paid,
        rule_id=cmd.rule_id,
        ruleset_version=cmd.ruleset_version,
        source_event_id=cmd.source_event_id,
        order_id=cmd.order_id,
        store_id=cmd.store_id,
    )
    after, stamped = _stamped(book, entry)
    return after, [stamped]


def _decide_revoke(book: Book, cmd: Revoke) -> tuple[Book, list[Entry]]:
    live = unexpired_lots(book, cmd.occurred_at)
    own = [lot for lot in live if lot.order_id == cmd.order_id]
    others = [lot for lot in live if lot.order_id != cmd.order_id]
    allocations, taken = _take([*own, *others], cmd.points)
    entry = Entry(
        entry_id=cmd.entry_id,
        member_id=book.member_id,
        kind="revoke",
        points=-cmd.points,
        occurred_at=cmd.occurred_at,
        allocations=allocations,
        debt_delta=cmd.points - taken,
        rule_id=cmd.rule_id,
        ruleset_version=cmd.ruleset_version,
        source_event_id=cmd.source_event_id,
        order_id=cmd.order_id,
        store_id=cmd.store_id,
    )
    after, stamped = _stamped(book, entry)
    return after, [stamped]


def _decide_redeem(book: Book, cmd: Redeem) -> tuple[Book, list[Entry]]:
    balance = spendable(book, cmd.at)
    if balance < cmd.min_balance:
        raise BelowMinimum(balance, cmd.min_balance)
    if balance < cmd.points:
        raise InsufficientPoints(balance, cmd.points)
    allocations, taken = _take(spendable_lots(book, cmd.at), cmd.points)
    if taken != cmd.points:  # pragma: no cover - spendable <= available guarantees it
        raise InsufficientPoints(taken, cmd.points)
    entry = Entry(
        entry_id=cmd.entry_id,
        member_id=book.member_id,
        kind="redeem",
        points=-cmd.points,
        occurred_at=cmd.at,
        allocations=allocations,
        redemption_id=cmd.redemption_id,
        store_id=cmd.store_id,
    )
    after, stamped = _stamped(book, entry)
    return after, [stamped]


def _decide_adjust(book: Book, cmd: Adjust) -> tuple[Book, list[Entry]]:
    entry = Entry(
        entry_id=cmd.entry_id,
        member_id=book.member_id,
        kind="adjust",
        points=cmd.points,
        occurred_at=cmd.at,
        adjustment_id=cmd.adjustment_id,
        reason=cmd.reason,
        operator=cmd.operator,
    )
    if cmd.points > 0:
        entry = replace(
            entry,
            expires_at=months_later(cmd.at, cmd.lifetime_months, cmd.zone),
            debt_delta=-min(book.debt, cmd.points),
        )
        after, stamped = _stamped(book, entry)
        return after, [stamped]
    need = -cmd.points
    balance = spendable(book, cmd.at)
    if need > balance and not cmd.allow_debt:
        raise InsufficientPoints(balance, need)
    # Spendable lots first; a debt-allowing deduction then takes pending points before it
    # records debt, so debt never coexists with points the member still holds.
    ready = spendable_lots(book, cmd.at)
    held = [lot for lot in unexpired_lots(book, cmd.at) if lot.pending_at(cmd.at)]
    allocations, taken = _take([*ready, *held], need)
    entry = replace(entry, allocations=allocations, debt_delta=need - taken)
    after, stamped = _stamped(book, entry)
    return after, [stamped]


def _decide_expire(book: Book, cmd: Expire) -> tuple[Book, list[Entry]]:
    due = [lot for lot in book.lots[: _first_unexpired(book.lots, cmd.at)] if lot.remaining > 0]
    entries: list[Entry] = []
    for lot in due:
        entry = Entry(
            entry_id=expire_entry_id(lot.lot_id),
            member_id=book.member_id,
            kind="expire",
            points=-lot.remaining,
            # The moment the points lapsed, not when the sweeper ran: the entry is the same
            # whenever (and however often) the sweep happens.
            occurred_at=lot.expires_at,
            expires_at=lot.expires_at,
            allocations=(Allocation(lot.lot_id, lot.remaining),),
            rule_id=lot.rule_id,
            ruleset_version=lot.ruleset_version,
            source_event_id=lot.source_event_id,
            adjustment_id=lot.adjustment_id,
            order_id=lot.order_id,
        )
        book, stamped = _stamped(book, entry)
        entries.append(stamped)
    return book, entries


def decide(book: Book, command: Command) -> list[Entry]:
    """The entries ``command`` produces against ``book``; raises a `LedgerError` refusal."""
    return apply(book, command)[1]


def apply(book: Book, command: Command) -> tuple[Book, list[Entry]]:
    """`decide`, and the book after its entries (the fold of `evolve` over them)."""
    if isinstance(command, Earn):
        return _decide_earn(book, command)
    if isinstance(command, Revoke):
        return _decide_revoke(book, command)
    if isinstance(command, Redeem):
        return _decide_redeem(book, command)
    if isinstance(command, Adjust):
        return _decide_adjust(book, command)
    if isinstance(command, Expire):
        return _decide_expire(book, command)
    assert_never(command)


# --------------------------------------------------------------------------- evolve


def _check_shape(entry: Entry) -> None:
    if entry.kind not in ENTRY_KINDS:
        raise JournalError(f"{entry.entry_id}: unknown kind {entry.kind!r}")
    if entry.points == 0:
        raise JournalError(f"{entry.entry_id}: moves no points")
    if entry.creates_lot:
        if entry.allocations:
            raise JournalError(f"{entry.entry_id}: a creating entry takes from no lot")
        if entry.expires_at is None:
            raise JournalError(f"{entry.entry_id}: a creating entry needs expires_at")
        if entry.available_from is not None and entry.available_from < entry.occurred_at:
            raise JournalError(f"{entry.entry_id}: available before it was earned")
        if not -entry.points <= entry.debt_delta <= 0:
            raise JournalError(f"{entry.entry_id}: debt paid must be within [0, points]")
        return
    if entry.points > 0:
        raise JournalError(f"{entry.entry_id}: a {entry.kind} entry must be negative")
    if entry.available_from is not None:
        raise JournalError(f"{entry.entry_id}: only a creating entry can be pending")
    if entry.debt_delta < 0:
        raise JournalError(f"{entry.entry_id}: a consuming entry cannot pay debt")
    if entry.kind in ("redeem", "expire") and entry.debt_delta != 0:
        raise JournalError(f"{entry.entry_id}: a {entry.kind} entry never creates debt")
    if any(a.points <= 0 for a in entry.allocations):
        raise JournalError(f"{entry.entry_id}: allocations must be positive")
    if sum(a.points for a in entry.allocations) + entry.debt_delta != -entry.points:
        raise JournalError(f"{entry.entry_id}: allocations + debt do not add up to points")


def evolve(book: Book, entry: Entry) -> Book:
    """Apply one entry. Pure bookkeeping: no decisions, no clock.

    ``book.lots`` stays in FIFO order without a re-sort: taking points never changes a
    lot's `_fifo_key`, so emptied lots just drop out, and a new lot goes in at its place
    (at the end, when lots are earned in time order).
    """
    if entry.member_id != book.member_id:
        raise JournalError(f"{entry.entry_id}: belongs to {entry.member_id}, not {book.member_id}")
    _check_shape(entry)

    lots = _after_allocations(book.lots, entry) if entry.allocations else book.lots

    debt = book.debt + entry.debt_delta
    if debt < 0:
        raise JournalError(f"{entry.entry_id}: pays off more debt than is owed")

    if entry.creates_lot:
        if entry.entry_id in map(_lot_id, lots):
            raise JournalError(f"{entry.entry_id}: lot already exists")
        lots = _with_lot(lots, entry, entry.points + entry.debt_delta)
    return _totalled(book, entry, lots, debt)


def _with_lot(lots: tuple[Lot, ...], entry: Entry, remaining: int) -> tuple[Lot, ...]:
    """``lots`` with the lot ``entry`` creates holding ``remaining`` (none if 0), in order."""
    if remaining <= 0:
        return lots
    assert entry.expires_at is not None  # checked by _check_shape
    lot = Lot(
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
    if not lots or _fifo_key(lots[-1]) < _fifo_key(lot):
        return (*lots, lot)
    at = bisect_right(lots, _fifo_key(lot), key=_fifo_key)
    return (*lots[:at], lot, *lots[at:])


def _totalled(book: Book, entry: Entry, lots: tuple[Lot, ...], debt: int) -> Book:
    moved = -entry.points
    return Book(
        member_id=book.member_id,
        lots=lots,
        debt=debt,
        earned=book.earned + (entry.points if entry.kind == "earn" else 0),
        redeemed=book.redeemed + (moved if entry.kind == "redeem" else 0),
        revoked=book.revoked + (moved if entry.kind == "revoke" else 0),
        expired=book.expired + (moved if entry.kind == "expire" else 0),
        adjusted=book.adjusted + (entry.points if entry.kind == "adjust" else 0),
    )


def _after_allocations(lots: tuple[Lot, ...], entry: Entry) -> tuple[Lot, ...]:
    """``lots`` less what ``entry`` takes from them, emptied lots dropped, order kept."""
    kept = list(lots)
    where = {lot.lot_id: i for i, lot in enumerate(lots)}
    for lot_id, part in entry.allocations:
        i = where.get(lot_id)
        if i is None or part > kept[i].remaining:
            raise JournalError(f"{entry.entry_id}: takes {part} from lot {lot_id} it lacks")
        kept[i] = _with_remaining(kept[i], kept[i].remaining - part)
    return tuple(lot for lot in kept if lot.remaining > 0)


def _with_remaining(lot: Lot, remaining: int) -> Lot:
    return replace(lot, remaining=remaining)


def replay(member_id: str, entries: Iterable[Entry]) -> Book:
    """Rebuild a member's book from their journal (a left fold of `evolve`)."""
    book = Book(member_id=member_id)
    for entry in entries:
        book = evolve(book, entry)
    return book


# --------------------------------------------------------------------------- as of a moment


def evolve_as_of(book: Book, entry: Entry) -> Book:
    """Apply one entry to a book folded from *part* of a journal: display only.

    ``GET /v1/members/{id}?as_of=`` folds the entries with ``occurred_at <= as_of`` in
    journal (seq) order. That subset need not be a consistent journal: an entry journaled
    later but dated earlier (an offline purchase) may pay off debt a refund dated after
    ``as_of`` created, or a consuming entry may take from a lot created by an entry dated
    after ``as_of``. Where `evolve` would refuse, this one does what that moment allows:

    * debt paid off is capped at the debt owed then; the rest stays in the new lot;
    * an allocation takes at most what the lot holds then, and nothing from a lot not
      there then; the entry still counts in full in its total (redeemed, revoked, ...);
    * a lot created twice is kept once.

    On a consistent journal it is `evolve` exactly. Never use it for the real journal:
    `evolve` guards that (and verify checks it). Entries of the wrong shape still raise.
    """
    if entry.member_id != book.member_id:
        raise JournalError(f"{entry.entry_id}: belongs to {entry.member_id}, not {book.member_id}")
    _check_shape(entry)
    lots = book.lots
    if entry.allocations:
        kept = list(lots)
        where = {lot.lot_id: i for i, lot in enumerate(lots)}
        for lot_id, part in entry.allocations:
            i = where.get(lot_id)
            if i is not None:
                kept[i] = _with_remaining(kept[i], max(0, kept[i].remaining - part))
        lots = tuple(lot for lot in kept if lot.remaining > 0)
    paid = min(-entry.debt_delta, book.debt) if entry.debt_delta < 0 else 0
    debt = book.debt - paid if entry.debt_delta < 0 else book.debt + entry.debt_delta
    if entry.creates_lot and entry.entry_id not in map(_lot_id, lots):
        lots = _with_lot(lots, entry, entry.points - paid)
    return _totalled(book, entry, lots, debt)


def replay_as_of(member_id: str, entries: Iterable[Entry]) -> Book:
    """A member's book from the part of their journal dated up to a moment, in seq order
    (a left fold of `evolve_as_of`): what ``?as_of=`` shows. Display only."""
    book = Book(member_id=member_id)
    for entry in entries:
        book = evolve_as_of(book, entry)
    return book
