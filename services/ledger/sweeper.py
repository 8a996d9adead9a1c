"""The expiry sweeper: journals lapsed lots as `points_expired`, warns ahead of expiry.

Runs in the ledger process every ``EXPIRY_SWEEP_SECONDS`` (default 60). Reads never count
an expired lot whether or not the sweep has run (reads.py); the sweep makes the lapse a
journal entry and a public event. It is safe to run in several processes at once: members
are locked (sorted) like every other writer, expire entry ids are deterministic
(`accounting.expire_entry_id`), and a warning is recorded in `ledger_expiry_warnings`
before it is published, in the same transaction, so it goes out once per lot and threshold.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Final

import asyncpg
import structlog
from prometheus_client import Counter

from schemas.ledger import MovementData, PointsExpiring
from services.common.outbox import write_outbox
from services.ledger import accounting as acc
from services.ledger.journal import entry_outbox_rows, load_books, outbox_rows, write_journal

SERVICE: Final = "ledger"
MEMBERS_PER_BATCH: Final = 500  # members locked per transaction: short transactions
WARNINGS_PER_BATCH: Final = 5000
WARNING_DAYS: Final = (30, 7)  # DOMAIN.md: members are warned 30 and 7 days ahead

DUE_MEMBERS: Final = """
SELECT DISTINCT member_id FROM ledger_lots
WHERE remaining > 0 AND expires_at <= $1
ORDER BY member_id LIMIT $2
"""
# Every (lot, threshold) pair now inside its window and not warned yet, claimed in one go.
CLAIM_WARNINGS: Final = """
WITH due AS (
    SELECT l.lot_id, t.days, l.member_id, l.remaining, l.expires_at
    FROM ledger_lots AS l CROSS JOIN unnest($2::int[]) AS t(days)
    WHERE l.remaining > 0 AND l.expires_at > $1
      AND l.expires_at <= $1 + make_interval(days => t.days)
      AND NOT EXISTS (SELECT 1 FROM ledger_expiry_warnings AS w
                      WHERE w.lot_id = l.lot_id AND w.threshold_days = t.days)
    ORDER BY l.expires_at
    LIMIT $3
)
INSERT INTO ledger_expiry_warnings (lot_id, threshold_days, member_id, points, expires_at)
SELECT * FROM due
ON CONFLICT DO NOTHING
RETURNING lot_id, threshold_days, member_id, points, expires_at
"""
AVAILABLE_NOW: Final = """
SELECT member_id, sum(remaining)::bigint AS available FROM ledger_lots
WHERE member_id = ANY($1::text[]) AND remaining > 0 AND expires_at > $2 AND available_from <= $2
GROUP BY member_id
"""
LOT_SOURCES: Final = """
SELECT lot_id, source_event_id, rule_id, order_id FROM ledger_lots WHERE lot_id = ANY($1::text[])
"""

EXPIRED = Counter("loyalty_points_expired_total", "Points journaled as expired by the sweeper")
WARNED = Counter("loyalty_expiry_warnings_total", "points_expiring warnings published")
log = structlog.get_logger()


def warning_id(lot_id: str, days: int) -> str:
    return acc.derived_entry_id(lot_id, "expiring", str(days))


class ExpirySweeper:
    def __init__(
        self,
        pool: asyncpg.Pool,
        topic: str,
        interval_s: float,
        wake: Callable[[], None],
    ) -> None:
        self._pool = pool
        self._topic = topic
        self._interval = interval_s
        self._wake = wake

    async def run(self) -> None:
        while True:
            try:
                await self.sweep_once(datetime.now(UTC))
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("expiry_sweep_retry", error=str(exc))
            await asyncio.sleep(self._interval)

    async def sweep_once(self, now: datetime) -> tuple[int, int]:
        """Expire every lapsed lot, then send the warnings due; returns (entries, warnings)."""
        expired = warned = 0
        while True:
            n, full = await self._expire_batch(now)
            expired += n
            if not full:
                break
        while True:
            n, full = await self._warn_batch(now)
            warned += n
            if not full:
                break
        if expired or warned:
            self._wake()
            log.info("expiry_sweep", expired_entries=expired, warnings=warned)
        return expired, warned

    async def _expire_batch(self, now: datetime) -> tuple[int, bool]:
        async with self._pool.acquire() as conn, conn.transaction():
            members: Sequence[str] = [
                r["member_id"] for r in await conn.fetch(DUE_MEMBERS, now, MEMBERS_PER_BATCH)
            ]
            if not members:
                return 0, False
            before = await load_books(conn, members)
            after = dict(before)
            entries: list[acc.Entry] = []
            for member_id, book in before.items():
                after[member_id], expired = acc.apply(book, acc.Expire(now))
                entries.extend(expired)
            await write_journal(conn, entries, before, after)
            await write_outbox(conn, SERVICE, entry_outbox_rows(self._topic, entries))
        EXPIRED.inc(-sum(e.points for e in entries))
        return len(entries), len(members) == MEMBERS_PER_BATCH

    async def _warn_batch(self, now: datetime) -> tuple[int, bool]:
        async with self._pool.acquire() as conn, conn.transaction():
            claimed = await conn.fetch(CLAIM_WARNINGS, now, list(WARNING_DAYS), WARNINGS_PER_BATCH)
            if not claimed:
                return 0, False
            # A lot inside both windows at once (a late grant, a sweeper that was down) gets
            # one warning, the nearest threshold; both are recorded as done.
            nearest: dict[str, asyncpg.Record] = {}
            for row in claimed:
                seen = nearest.get(row["lot_id"])
                if seen is None or row["threshold_days"] < seen["threshold_days"]:
                    nearest[row["lot_id"]] = row
            members = sorted({r["member_id"] for r in nearest.values()})
            balance = {
                r["member_id"]: r["available"]
                for r in await conn.fetch(AVAILABLE_NOW, members, now)
            }
            sources = {r["lot_id"]: r for r in await conn.fetch(LOT_SOURCES, list(nearest))}
            events = [
                PointsExpiring(
                    event_id=warning_id(row["lot_id"], row["threshold_days"]),
                    occurred_at=now,
                    member_id=row["member_id"],
                    data=MovementData(
                        points=row["points"],
                        balance_after=balance.get(row["member_id"], 0),
                        rule_id=sources[row["lot_id"]]["rule_id"],
                        source_event_id=sources[row["lot_id"]]["source_event_id"],
                        order_id=sources[row["lot_id"]]["order_id"],
                        expires_at=row["expires_at"],
                    ),
                )
                for row in sorted(nearest.values(), key=lambda r: (r["expires_at"], r["lot_id"]))
            ]
            await write_outbox(conn, SERVICE, outbox_rows(self._topic, events))
        WARNED.inc(len(events))
        return len(events), len(claimed) == WARNINGS_PER_BATCH
