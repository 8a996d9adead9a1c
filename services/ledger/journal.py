"""Journal and lot rows <-> accounting objects, and the set-based writes of a batch.

Kept apart from the consumer so the API (redemptions, adjustments), the expiry sweeper,
`ledger rebuild` and `ledger verify` all write and read the journal the same way.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Final

import asyncpg
import orjson

from schemas.ledger import (
    LedgerEvent,
    MovementData,
    PointsAdjusted,
    PointsEarned,
    PointsExpired,
    PointsRedeemed,
    PointsRevoked,
)
from services.common.outbox import OutboxRow
from services.ledger.accounting import WARNING_DAYS, Allocation, Book, Entry, Lot

ENTRY_COLUMNS: Final = (
    "entry_id",
    "member_id",
    "kind",
    "points",
    "balance_after",
    "debt_delta",
    "occurred_at",
    "expires_at",
    "rule_id",
    "ruleset_version",
    "source_event_id",
    "order_id",
    "store_id",
    "redemption_id",
    "adjustment_id",
    "reason",
    "operator",
    "allocations",
    "available_from",
)

LOT_COLUMNS: Final = (
    "lot_id",
    "member_id",
    "points",
    "remaining",
    "earned_at",
    "available_from",
    "expires_at",
    "source_event_id",
    "order_id",
    "rule_id",
    "ruleset_version",
    "adjustment_id",
)

SELECT_BOOKS: Final = """
SELECT member_id, debt, earned, redeemed, revoked, expired, adjusted
FROM ledger_members WHERE member_id = ANY($1::text[]) ORDER BY member_id FOR UPDATE
"""
SELECT_LOTS: Final = """
SELECT lot_id, member_id, points, remaining, earned_at, available_from, expires_at,
       source_event_id, order_id, rule_id, ruleset_version, adjustment_id
FROM ledger_lots WHERE member_id = ANY($1::text[]) AND remaining > 0
"""
ENSURE_MEMBERS: Final = """
INSERT INTO ledger_members (member_id) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING
"""
# A new lot's `sweep_at` is its first expiry warning (migration 0014); an existing lot keeps
# whatever the sweeper set. New lots are COPYed: a lot's id is the id of the entry that
# created it, COPYed just before under the journal's primary key, so a lot new to the batch
# is new to the table (bench/experiments/lots_copy.py: 9.9 -> 6.0 us of Postgres and
# 5.8 -> 4.1 us of the client's CPU per lot against INSERT … unnest … ON CONFLICT).
NEW_LOT_COLUMNS: Final = [*LOT_COLUMNS, "sweep_at"]
FIRST_WARNING: Final = timedelta(days=max(WARNING_DAYS))
# Lots the batch loaded and spent from (or expired): only `remaining` changes, so a plain
# UPDATE; INSERT … ON CONFLICT would try the insert and probe the key first.
UPDATE_LOTS: Final = """
UPDATE ledger_lots AS l SET remaining = u.remaining
FROM unnest($1::text[], $2::bigint[]) AS u(lot_id, remaining)
WHERE l.lot_id = u.lot_id
"""
UPDATE_TOTALS: Final = """
UPDATE ledger_members AS m SET
    debt = u.debt, earned = u.earned, redeemed = u.redeemed, revoked = u.revoked,
    expired = u.expired, adjusted = u.adjusted, updated_at = now()
FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[], $6::bigint[],
            $7::bigint[]) AS u(member_id, debt, earned, redeemed, revoked, expired, adjusted)
WHERE m.member_id = u.member_id
"""
SELECT_MEMBER_ENTRIES: Final = """
SELECT * FROM ledger_entries WHERE member_id = $1 AND occurred_at <= $2 ORDER BY seq
"""

_EVENT_TYPES: Final[dict[str, type[Any]]] = {
    "earn": PointsEarned,
    "redeem": PointsRedeemed,
    "revoke": PointsRevoked,
    "expire": PointsExpired,
    "adjust": PointsAdjusted,
}
_EVENT_TYPE_NAMES: Final[dict[str, str]] = {
    kind: model.model_fields["type"].default for kind, model in _EVENT_TYPES.items()
}
_TEXT_OR_NONE: Final = (str, type(None))


async def load_books(conn: asyncpg.Connection, members: Sequence[str]) -> dict[str, Book]:
    """Locks the members' rows (sorted: no deadlocks) and loads their spendable lots."""
    await conn.execute(ENSURE_MEMBERS, list(members))
    rows = await conn.fetch(SELECT_BOOKS, list(members))
    lots: dict[str, list[Lot]] = {}
    for r in await conn.fetch(SELECT_LOTS, list(members)):
        lots.setdefault(r["member_id"], []).append(
            Lot(
                lot_id=r["lot_id"],
                member_id=r["member_id"],
                points=r["points"],
                remaining=r["remaining"],
                earned_at=r["earned_at"],
                expires_at=r["expires_at"],
                source_event_id=r["source_event_id"],
                order_id=r["order_id"],
                rule_id=r["rule_id"],
                available_from=(
                    r["available_from"] if r["available_from"] != r["earned_at"] else None
                ),
                ruleset_version=r["ruleset_version"],
                adjustment_id=r["adjustment_id"],
            )
        )
    return {
        r["member_id"]: Book(
            member_id=r["member_id"],
            lots=tuple(
                sorted(
                    lots.get(r["member_id"], ()),
                    key=lambda x: (x.expires_at, x.earned_at, x.lot_id),
                )
            ),
            debt=r["debt"],
            earned=r["earned"],
            redeemed=r["redeemed"],
            revoked=r["revoked"],
            expired=r["expired"],
            adjusted=r["adjusted"],
        )
        for r in rows
    }


def entry_record(e: Entry) -> tuple[Any, ...]:
    allocations = [[a.lot_id, a.points] for a in e.allocations]
    return (
        e.entry_id,
        e.member_id,
        e.kind,
        e.points,
        e.balance_after,
        e.debt_delta,
        e.occurred_at,
        e.expires_at,
        e.rule_id,
        e.ruleset_version,
        e.source_event_id,
        e.order_id,
        e.store_id,
        e.redemption_id,
        e.adjustment_id,
        e.reason,
        e.operator,
        allocations,
        e.available_from,
    )


def entry_from_row(r: asyncpg.Record | dict[str, Any]) -> Entry:
    raw = r["allocations"]
    pairs = orjson.loads(raw) if isinstance(raw, (str, bytes)) else (raw or [])
    return Entry(
        entry_id=r["entry_id"],
        member_id=r["member_id"],
        kind=r["kind"],
        points=r["points"],
        occurred_at=r["occurred_at"],
        balance_after=r["balance_after"],
        expires_at=r["expires_at"],
        allocations=tuple(Allocation(lot_id, pts) for lot_id, pts in pairs),
        debt_delta=r["debt_delta"],
        rule_id=r["rule_id"],
        ruleset_version=r["ruleset_version"],
        source_event_id=r["source_event_id"],
        order_id=r["order_id"],
        store_id=r["store_id"],
        redemption_id=r["redemption_id"],
        adjustment_id=r["adjustment_id"],
        reason=r["reason"],
        operator=r["operator"],
        available_from=r["available_from"],
    )


async def write_journal(
    conn: asyncpg.Connection,
    entries: Sequence[Entry],
    before: dict[str, Book],
    after: dict[str, Book],
) -> None:
    """Append entries (COPY), then write the lots and totals that changed: set-based."""
    if entries:
        # The journal's trigger records each new (store, member) pair too (migration 0027).
        await conn.copy_records_to_table(
            "ledger_entries", records=[entry_record(e) for e in entries], columns=ENTRY_COLUMNS
        )
    lot_rows: list[tuple[Any, ...]] = []
    changed_ids: list[str] = []
    changed_remaining: list[int] = []
    for member_id, book in after.items():
        old = {lot.lot_id: lot for lot in before[member_id].lots}
        new = {lot.lot_id: lot for lot in book.lots}
        for lot in book.lots:
            prior = old.get(lot.lot_id)
            if prior is None:
                lot_rows.append((*lot_row(lot, lot.remaining), lot.expires_at - FIRST_WARNING))
            elif prior.remaining != lot.remaining:
                changed_ids.append(lot.lot_id)
                changed_remaining.append(lot.remaining)
        for lot_id in old:
            if lot_id not in new:
                changed_ids.append(lot_id)
                changed_remaining.append(0)
    if lot_rows:
        await conn.copy_records_to_table("ledger_lots", records=lot_rows, columns=NEW_LOT_COLUMNS)
    if changed_ids:
        await conn.execute(UPDATE_LOTS, changed_ids, changed_remaining)
    members = sorted(after)
    if members:
        books = [after[m] for m in members]
        await conn.execute(
            UPDATE_TOTALS,
            members,
            [b.debt for b in books],
            [b.earned for b in books],
            [b.redeemed for b in books],
            [b.revoked for b in books],
            [b.expired for b in books],
            [b.adjusted for b in books],
        )


def lot_row(lot: Lot, remaining: int) -> tuple[Any, ...]:
    """A ledger_lots row; ``available_from`` is stored as ``earned_at`` when not pending."""
    return (
        lot.lot_id,
        lot.member_id,
        lot.points,
        remaining,
        lot.earned_at,
        lot.available_from or lot.earned_at,
        lot.expires_at,
        lot.source_event_id,
        lot.order_id,
        lot.rule_id,
        lot.ruleset_version,
        lot.adjustment_id,
    )


def ledger_event(entry: Entry, source_type: str | None = None) -> LedgerEvent:
    """`source_type`: the grant's, for an earn (the journal does not keep it)."""
    event: LedgerEvent = _EVENT_TYPES[entry.kind](
        event_id=entry.entry_id,
        occurred_at=entry.occurred_at,
        member_id=entry.member_id,
        data=MovementData(
            points=entry.points,
            balance_after=entry.balance_after,
            rule_id=entry.rule_id,
            ruleset_version=entry.ruleset_version,
            source_event_id=entry.source_event_id,
            redemption_id=entry.redemption_id,
            adjustment_id=entry.adjustment_id,
            order_id=entry.order_id,
            store_id=entry.store_id,
            expires_at=entry.expires_at,
            reason=entry.reason,
            operator=entry.operator,
            source_type=source_type,
        ),
    )
    return event


def outbox_rows(topic: str, events: Iterable[LedgerEvent]) -> list[OutboxRow]:
    return [OutboxRow(topic, e.member_id, e.model_dump_json().encode()) for e in events]


def entry_outbox_rows(
    topic: str, entries: Iterable[Entry], source_types: Mapping[str, str] | None = None
) -> list[OutboxRow]:
    """`outbox_rows(topic, map(ledger_event, entries))`, byte for byte, without the models;
    `source_types` by entry id (an earn's is its grant's id)."""
    types = source_types or {}
    return [
        OutboxRow(topic, e.member_id, ledger_event_json(e, types.get(e.entry_id))) for e in entries
    ]


def ledger_event_json(entry: Entry, source_type: str | None = None) -> bytes:
    """`ledger_event(entry).model_dump_json()`, from one `orjson.dumps` of a dict.

    Building and dumping the pydantic event costs ~6 us an entry, this ~2.3 us, checks
    included (bench/experiments/ledger_hot.py). The keys are in the models' field order; orjson
    writes ints, strings and times as pydantic does (UTC as Z) for the values `_plain`
    lets through; anything else (an unknown kind, a naive time, an offset with seconds,
    which pydantic truncates and orjson rounds, a surrogate in a string) goes through the
    models, which then write it or raise as they always did.
    """
    if _plain(entry) and type(source_type) in _TEXT_OR_NONE:
        try:
            written = orjson.dumps(
                {
                    "event_id": entry.entry_id,
                    "schema_version": 1,
                    "occurred_at": entry.occurred_at,
                    "member_id": entry.member_id,
                    "type": _EVENT_TYPE_NAMES[entry.kind],
                    "data": {
                        "points": entry.points,
                        "balance_after": entry.balance_after,
                        "rule_id": entry.rule_id,
                        "ruleset_version": entry.ruleset_version,
                        "source_event_id": entry.source_event_id,
                        "redemption_id": entry.redemption_id,
                        "adjustment_id": entry.adjustment_id,
                        "order_id": entry.order_id,
                        "store_id": entry.store_id,
                        "expires_at": entry.expires_at,
                        "reason": entry.reason,
                        "operator": entry.operator,
                        "source_type": source_type,
                    },
                },
                option=orjson.OPT_UTC_Z,
            )
        except orjson.JSONEncodeError:
            pass
        else:
            # Kept as a copy: orjson allocates each output in a 4 KiB buffer and shrinks it
            # in place, so a batch's events, kept until the outbox COPY, lie a page apart
            # (20 MB for 5,000). When nothing pins the heap's top, that goes back to the
            # OS after each batch and returns as one page fault an entry (4.6 -> 2.9 us
            # an entry with the copy, measured); the copies sit packed in Python's pools.
            return bytes(memoryview(written))
    return ledger_event(entry, source_type).model_dump_json().encode()


def _plain(e: Entry) -> bool:
    """Values whose JSON orjson writes exactly as the models would (types checked, not hoped)."""
    text = _TEXT_OR_NONE
    return (
        e.kind in _EVENT_TYPE_NAMES
        and type(e.entry_id) is str
        and type(e.member_id) is str
        and type(e.points) is int
        and type(e.balance_after) is int
        and type(e.rule_id) in text
        and type(e.ruleset_version) in text
        and type(e.source_event_id) in text
        and type(e.redemption_id) in text
        and type(e.adjustment_id) in text
        and type(e.order_id) in text
        and type(e.store_id) in text
        and type(e.reason) in text
        and type(e.operator) in text
        and _plain_time(e.occurred_at)
        and (e.expires_at is None or _plain_time(e.expires_at))
    )


def _plain_time(t: object) -> bool:
    """Aware, offset in whole minutes (how pydantic and orjson write other offsets differs)."""
    if type(t) is not datetime:
        return False
    offset = t.utcoffset()
    return offset is not None and not offset.microseconds and not offset.seconds % 60
