"""The expiry sweeper: journals lapsed lots as `points_expired`, warns ahead of expiry.

Runs in the ledger process every ``EXPIRY_SWEEP_SECONDS`` (default 60). Reads never count
an expired lot whether or not the sweep has run (reads.py); the sweep makes the lapse a
journal entry and a public event. It is safe to run in several processes at once: members
are locked (sorted) like every other writer, expire entry ids are deterministic
(`accounting.expire_entry_id`), and a warning is recorded in `ledger_expiry_warnings`
before it is published, in the same transaction, so it goes out once per lot and threshold.

A sweep reads only the lots whose `sweep_at` has come (migration 0014): a new lot's is its
first warning; a warning moves it to the next one, then to the lot's expiry. How many lots
wait inside the warning windows does not matter to an idle sweep. The moment is a hint: a
lot due too early (a rebuild, the migration) is looked at, sends nothing twice and moves on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Final

import asyncpg
import structlog
from prometheus_client import Counter

from schemas.ledger import MovementData, PointsExpiring
from services.common.outbox import write_outbox
from services.ledger import accounting as acc
from services.ledger.journal import entry_outbox_rows, load_books, outbox_rows, write_journal

SERVICE: Final = "ledger"
LAPSED_PER_BATCH: Final = 2500  # lapsed lots per transaction (their members locked)
WARNINGS_PER_BATCH: Final = 5000  # lots looked at per warning transaction
PROGRESS_LOG_SECONDS: Final = 5.0

Cursor = tuple[datetime | None, str]  # (sweep_at, lot_id) of the last lot done; None: start

# Both scans read `ledger_lots_sweep` in order, a page at a time, from a cursor (the last
# lot's moment and id) rather than from the start again, where the rows just swept still
# sit in the index until vacuum: restarting each page made a large sweep quadratic
# (bench/README.md, "Expiry sweeps"). A lapsed lot is always due (a CHECK: sweep_at <=
# expires_at), so one index serves expiry and warnings.
_DUE: Final = """
SELECT sweep_at, lot_id, member_id FROM ledger_lots
WHERE remaining > 0 AND sweep_at <= $1 AND expires_at {} $1
  AND (sweep_at, lot_id) > (COALESCE($2::timestamptz, '-infinity'), $3)
ORDER BY sweep_at, lot_id LIMIT $4
"""
DUE_LAPSED: Final = _DUE.format("<=")  # to expire
DUE_WARNINGS: Final = _DUE.format(">")  # a warning may be due
LOCK_MEMBERS: Final = """
SELECT member_id FROM ledger_members
WHERE member_id = ANY($1::text[]) ORDER BY member_id FOR UPDATE
"""
# A warning's days are 24 hours each, as the ledger writes a new lot's first moment
# (`journal.FIRST_WARNING`): `interval 'N days'` would count calendar days of the session's
# time zone, an hour apart from those across a change of summer time.
# For the page's lots (checked again now that their members are locked): every threshold
# whose window the lot is inside, recorded (one warned before conflicts on the key and is
# not returned), with where the lot came from; the lot's next moment becomes the widest
# window it has not entered yet, else its expiry.
CLAIM_WARNINGS: Final = """
WITH page AS (
    SELECT lot_id, member_id, remaining, expires_at, source_event_id, adjustment_id, rule_id,
           ruleset_version, order_id
    FROM ledger_lots
    WHERE lot_id = ANY($3::text[]) AND remaining > 0 AND sweep_at <= $1 AND expires_at > $1
), moved AS (
    UPDATE ledger_lots AS l SET sweep_at = COALESCE(
        (SELECT l.expires_at - make_interval(hours => 24 * max(t.days))
         FROM unnest($2::int[]) AS t(days)
         WHERE l.expires_at > $1 + make_interval(hours => 24 * t.days)),
        l.expires_at)
    FROM page WHERE l.lot_id = page.lot_id
), claimed AS (
    INSERT INTO ledger_expiry_warnings (lot_id, threshold_days, member_id, points, expires_at)
    SELECT p.lot_id, t.days, p.member_id, p.remaining, p.expires_at
    FROM page AS p CROSS JOIN unnest($2::int[]) AS t(days)
    WHERE p.expires_at <= $1 + make_interval(hours => 24 * t.days)
    ON CONFLICT DO NOTHING
    RETURNING lot_id, threshold_days, member_id, points, expires_at
)
SELECT c.lot_id, c.threshold_days, c.member_id, c.points, c.expires_at,
       p.source_event_id, p.adjustment_id, p.rule_id, p.ruleset_version, p.order_id
FROM claimed AS c JOIN page AS p USING (lot_id)
"""
AVAILABLE_NOW: Final = """
SELECT member_id, sum(remaining)::bigint AS available FROM ledger_lots
WHERE member_id = ANY($1::text[]) AND remaining > 0 AND expires_at > $2 AND available_from <= $2
GROUP BY member_id
"""

# Also of the grants consumer, which journals a late grant's lapsed lot (`projector`).
EXPIRED = Counter("loyalty_points_expired_total", "Points journaled as expired")
WARNED = Counter("loyalty_expiry_warnings_total", "points_expiring warnings published")
log = structlog.get_logger()


class _Progress:
    """A month-end sweep of a large chain runs for minutes: the relay is woken after every
    page, so publishing starts with the first, and ops get a log line every few seconds."""

    def __init__(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        self._logged = time.monotonic()

    def page(self, expired: int, warned: int) -> None:
        self._wake()
        if time.monotonic() - self._logged >= PROGRESS_LOG_SECONDS:
            self._logged = time.monotonic()
            log.info("expiry_sweep_progress", expired_entries=expired, warnings=warned)


def _next_cursor(page: Sequence[asyncpg.Record], size: int) -> Cursor | None:
    """Where the next page starts: after this page's last lot; None if the page was short."""
    return (page[-1]["sweep_at"], page[-1]["lot_id"]) if len(page) == size else None


def warning_id(lot_id: str, days: int) -> str:
    return acc.derived_entry_id(lot_id, "expiring", str(days))


class ExpirySweeper:
    def __init__(
        self,
        pool: asyncpg.Pool,
        topic: str,
        interval_s: float,
        wake: Callable[[], None],
        *,
        grace_s: float = 0.0,
        lapsed_per_batch: int = LAPSED_PER_BATCH,
        warnings_per_batch: int = WARNINGS_PER_BATCH,
    ) -> None:
        self._pool = pool
        self._topic = topic
        self._interval = interval_s
        self._wake = wake
        self._grace = timedelta(seconds=grace_s)
        self._lapsed_per_batch = lapsed_per_batch
        self._warnings_per_batch = warnings_per_batch

    async def run(self) -> None:
        while True:
            try:
                await self.sweep_once(datetime.now(UTC))
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("expiry_sweep_retry", error=str(exc))
            await asyncio.sleep(self._interval)

    async def sweep_once(self, now: datetime) -> tuple[int, int]:
        """Expire every lot lapsed a grace ago, then send the warnings due; returns
        (entries, warnings).

        Each page is its own short transaction. A lot that lapses, or enters a warning
        window, behind the cursor while a sweep runs is left to the next sweep. The grace
        lets a late refund dated before a lot's expiry take back from it whenever it comes
        within the grace (the consumer waits the same); reads stop counting the lot at its
        expiry regardless.
        """
        expired = warned = 0
        progress = _Progress(self._wake)
        cursor: Cursor | None = (None, "")
        while cursor is not None:
            n, cursor = await self._expire_batch(now - self._grace, cursor)
            expired += n
            if cursor is not None:
                progress.page(expired, warned)
        cursor = (None, "")
        while cursor is not None:
            n, cursor = await self._warn_batch(now, cursor)
            warned += n
            if cursor is not None:
                progress.page(expired, warned)
        if expired or warned:
            self._wake()
            log.info("expiry_sweep", expired_entries=expired, warnings=warned)
        return expired, warned

    async def _expire_batch(self, now: datetime, cursor: Cursor) -> tuple[int, Cursor | None]:
        """Expires the lapsed lots of the members on the next page of lapsed lots; returns
        the entries written and the page's last key, or None after the last page."""
        async with self._pool.acquire() as conn, conn.transaction():
            page = await conn.fetch(DUE_LAPSED, now, *cursor, self._lapsed_per_batch)
            if not page:
                return 0, None
            # Their books, locked sorted; a member's other lapsed lots go in the same entry
            # set, and a later page no longer finds them (remaining 0).
            before = await load_books(conn, sorted({r["member_id"] for r in page}))
            after = dict(before)
            entries: list[acc.Entry] = []
            for member_id, book in before.items():
                after[member_id], expired = acc.apply(book, acc.Expire(now))
                entries.extend(expired)
            await write_journal(conn, entries, before, after)
            await write_outbox(conn, SERVICE, entry_outbox_rows(self._topic, entries))
        EXPIRED.inc(-sum(e.points for e in entries))
        return len(entries), _next_cursor(page, self._lapsed_per_batch)

    async def _warn_batch(self, now: datetime, cursor: Cursor) -> tuple[int, Cursor | None]:
        """Claims and publishes the warnings due on the next page of lots after `cursor`;
        returns the warnings sent and the page's last key, or None after the last page."""
        async with self._pool.acquire() as conn, conn.transaction():
            page = await conn.fetch(DUE_WARNINGS, now, *cursor, self._warnings_per_batch)
            if not page:
                return 0, None
            end = _next_cursor(page, self._warnings_per_batch)
            # Sorted, like every other writer: moving `sweep_at` updates the lots.
            await conn.execute(LOCK_MEMBERS, sorted({r["member_id"] for r in page}))
            claimed = await conn.fetch(
                CLAIM_WARNINGS, now, list(acc.WARNING_DAYS), [r["lot_id"] for r in page]
            )
            if not claimed:
                return 0, end
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
            events = [
                PointsExpiring(
                    event_id=warning_id(row["lot_id"], row["threshold_days"]),
                    occurred_at=now,
                    member_id=row["member_id"],
                    data=MovementData(
                        points=row["points"],
                        balance_after=balance.get(row["member_id"], 0),
                        rule_id=row["rule_id"],
                        ruleset_version=row["ruleset_version"],
                        source_event_id=row["source_event_id"],
                        adjustment_id=row["adjustment_id"],
                        order_id=row["order_id"],
                        expires_at=row["expires_at"],
                    ),
                )
                for row in sorted(nearest.values(), key=lambda r: (r["expires_at"], r["lot_id"]))
            ]
            await write_outbox(conn, SERVICE, outbox_rows(self._topic, events))
        WARNED.inc(len(events))
        return len(events), end
