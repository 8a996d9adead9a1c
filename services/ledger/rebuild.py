"""Read models from the journal: `ledgerctl ledger rebuild` and `ledgerctl ledger verify`.

**Rebuild** is set-based: member totals are sums over the journal and every lot is its
creating entry minus what later entries took from it (their ``allocations``), each as one
``INSERT … SELECT`` inside Postgres. **Verify** is the independent check: it streams the
journal ordered by ``(member_id, seq)`` through a server-side cursor and folds each member
with the pure `accounting.replay`, so the two implementations prove each other.

**Rebuild** builds aside and swaps, so the API and the consumer keep serving. One runs at a
time (an advisory lock for the whole run): a second is refused, since the build tables are
one pair and two runs would swap in each other's half-built tables.

1. A consistent starting point: a short transaction takes ``SHARE`` on ``ledger_entries``
   (so no writer is half-way through appending), exports its snapshot and notes the highest
   ``seq``; a reader imports that snapshot and the lock is released at once.
2. In that snapshot, two statements fill ``ledger_members_rebuild`` and
   ``ledger_lots_rebuild`` (no indexes while loading); then the indexes of the live tables
   are cloned onto them.
3. The swap, one transaction: ``ACCESS EXCLUSIVE`` on the live read models (every writer
   locks a member row before appending, so none is in flight once we hold it), refold the
   few members whose entries arrived after the snapshot, add members without entries
   (the live table's, and the tier history's), restore tiers and next tiers from
   ``ledger_tier_history``, then drop the old tables and rename. Readers
   wait for the swap only (milliseconds), never for the build. A swap that loses a
   deadlock (an expiry sweep page holds ``ledger_lots`` and wants a member row) or waits
   over its ``lock_timeout`` rolls back and is retried, a few times, keeping the build.
   It waits first for any running verify to finish (`READ_MODELS_LOCK_KEY`), without
   queueing on the tables, where the API's reads would queue behind it.

**Verify** reads the journal and the read models in one ``REPEATABLE READ`` snapshot (so a
running system gives no false differences) and reports every member whose totals, debt or
lots differ from the fold, every member whose tier or next tier differs from its latest
evaluation (or who has one and no row), and every lot whose ``sweep_at`` would hold back a
warning not yet sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

import asyncpg
import structlog

from services.common.ops_session import UNBOUNDED
from services.ledger import accounting as acc
from services.ledger.journal import LOT_COLUMNS, entry_from_row, lot_row

log = structlog.get_logger()

MEMBERS_CHUNK: Final = 2000
FETCH_ROWS: Final = 5000
TOTAL_COLUMNS: Final = ("debt", "earned", "redeemed", "revoked", "expired", "adjusted")
MEMBER_COLUMNS: Final = ("member_id", *TOTAL_COLUMNS)
TABLES: Final = ("ledger_members", "ledger_lots")
# The swap can lose a deadlock to a writer that holds ledger_lots and then wants a member
# row (an expiry sweep page) while the swap holds ledger_members and wants ledger_lots; or
# wait behind a long transaction while every reader queues behind its lock request. Each
# attempt waits at most SWAP_LOCK_TIMEOUT for a lock; a lost attempt rolls back entirely
# and is retried (the build is kept), up to SWAP_ATTEMPTS times.
SWAP_ATTEMPTS: Final = 5
SWAP_LOCK_TIMEOUT: Final = "2s"
SWAP_RETRY_PAUSE_S: Final = 0.2
SWAP_RETRYABLE: Final = (asyncpg.DeadlockDetectedError, asyncpg.LockNotAvailableError)
# Advisory lock keys, each a short ASCII word read as a number, like planner_stats' "planst"
# (the others: the outbox relay's crc32 of "outbox:<service>", hashtextextended() of
# 'rules_rulesets:publish' and of 'notifier:' || member, referral_chain's per-member hash).
# One rebuild at a time, held by its swapping connection from start to end: the build tables
# have fixed names, and a second run would drop and recreate them empty under the first,
# which then swapped them in. A killed run's session ends, and its lock with it; the next
# run drops what it left, still under the lock.
REBUILD_LOCK_KEY: Final = 0x6C64_6772_7262  # "ldgrrb"
# A swap against a verify: verify holds this one shared from before its snapshot to its end,
# the swap exclusively. A snapshot survives writes, not DROP + RENAME: a verify that first
# read the read models after a swap read the new tables, whose rows it cannot see, and
# reported every member missing. The swap waits on this lock rather than on the tables,
# since a lock request queued on a table holds up every reader that comes after it.
READ_MODELS_LOCK_KEY: Final = 0x6C64_6772_726D  # "ldgrrm"
LOCK_HOLDER: Final = """
SELECT a.pid, a.backend_start FROM pg_locks AS l JOIN pg_stat_activity AS a USING (pid)
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
  AND (l.classid::bigint << 32 | l.objid::bigint) = $1
"""

JOURNAL: Final = "SELECT * FROM ledger_entries ORDER BY member_id, seq"
JOURNAL_AFTER: Final = """
SELECT * FROM ledger_entries
WHERE member_id = ANY($1::text[]) ORDER BY member_id, seq
"""
COUNT: Final = "SELECT count(*) FROM ledger_entries"
# The same arithmetic as `accounting.evolve`, as sets (verify checks one against the other).
BUILD_TOTALS: Final = """
INSERT INTO ledger_members_rebuild (member_id, debt, earned, redeemed, revoked, expired, adjusted)
SELECT member_id,
       COALESCE(sum(debt_delta), 0),
       COALESCE(sum(points) FILTER (WHERE kind = 'earn'), 0),
       COALESCE(-sum(points) FILTER (WHERE kind = 'redeem'), 0),
       COALESCE(-sum(points) FILTER (WHERE kind = 'revoke'), 0),
       COALESCE(-sum(points) FILTER (WHERE kind = 'expire'), 0),
       COALESCE(sum(points) FILTER (WHERE kind = 'adjust'), 0)
FROM ledger_entries
WHERE seq <= $1
GROUP BY member_id
"""
BUILD_LOTS: Final = """
INSERT INTO ledger_lots_rebuild (lot_id, member_id, points, remaining, earned_at, available_from,
                                 expires_at, source_event_id, order_id, rule_id,
                                 ruleset_version, adjustment_id, sweep_at)
SELECT e.entry_id, e.member_id, e.points, e.points + e.debt_delta - COALESCE(t.taken, 0),
       e.occurred_at, COALESCE(e.available_from, e.occurred_at), e.expires_at,
       e.source_event_id, e.order_id, e.rule_id, e.ruleset_version, e.adjustment_id,
       -- The first warning's moment (days of 24 hours, as the ledger and the sweeper
       -- count them); the sweeper skips a warning already sent (its table is not
       -- rebuilt) and moves the lot on.
       e.expires_at - make_interval(hours => 24 * $2)
FROM ledger_entries AS e
LEFT JOIN (
    SELECT a ->> 0 AS lot_id, sum((a ->> 1)::bigint) AS taken
    FROM ledger_entries AS c, jsonb_array_elements(c.allocations) AS a
    WHERE c.seq <= $1 AND jsonb_array_length(c.allocations) > 0
    GROUP BY 1
) AS t ON t.lot_id = e.entry_id
WHERE e.seq <= $1
  AND (e.kind = 'earn' OR (e.kind = 'adjust' AND e.points > 0))
  AND e.points + e.debt_delta - COALESCE(t.taken, 0) > 0
"""
INDEXES: Final = """
SELECT i.indexname, i.indexdef, c.conname
FROM pg_indexes AS i
LEFT JOIN pg_constraint AS c
       ON c.conrelid = to_regclass(i.schemaname || '.' || i.tablename)
      AND c.contype = 'p' AND c.conindid = to_regclass(i.schemaname || '.' || i.indexname)
WHERE i.schemaname = current_schema() AND i.tablename = $1
"""
# An upsert: a member known only from the tier history (no entries) gets a row here even
# when the live table lost it (the swap adds members without entries from there).
LATEST_TIERS: Final = """
INSERT INTO ledger_members_rebuild AS r
       (member_id, tier, qualifying_spend, tier_valid_until, next_tier, next_tier_spend)
SELECT h.member_id, h.tier, h.qualifying_spend, h.tier_valid_until,
       -- History rows from before the next-tier columns existed: keep the live value.
       CASE WHEN h.next_tier IS NULL AND o.tier = h.tier THEN o.next_tier
            ELSE h.next_tier END,
       CASE WHEN h.next_tier_spend IS NULL AND o.tier = h.tier THEN o.next_tier_spend
            ELSE h.next_tier_spend END
FROM (
    SELECT DISTINCT ON (member_id) member_id, tier, qualifying_spend, tier_valid_until,
           next_tier, next_tier_spend
    FROM ledger_tier_history ORDER BY member_id, seq DESC  -- arrival order: projector.py
) AS h
LEFT JOIN ledger_members AS o USING (member_id)
ON CONFLICT (member_id) DO UPDATE SET
    tier = excluded.tier, qualifying_spend = excluded.qualifying_spend,
    tier_valid_until = excluded.tier_valid_until, next_tier = excluded.next_tier,
    next_tier_spend = excluded.next_tier_spend
"""
# Every member with a row or a tier report: a missing row of a member with reports and no
# entries (one with entries is told by the fold of the journal), and a tier other than the
# latest report's. The next tier is expected as `LATEST_TIERS` restores it: a report
# without one (the top tier, or a report from before those columns) leaves it unchecked.
TIER_DIFFERENCES: Final = """
SELECT ids.member_id, m.member_id IS NULL AS missing,
       m.tier, m.qualifying_spend, m.tier_valid_until, m.next_tier, m.next_tier_spend,
       COALESCE(h.tier, 'member') AS h_tier, COALESCE(h.qualifying_spend, 0) AS h_spend,
       h.tier_valid_until AS h_valid, h.next_tier AS h_next, h.next_tier_spend AS h_next_spend
FROM (SELECT member_id FROM ledger_members UNION SELECT member_id FROM ledger_tier_history)
     AS ids
LEFT JOIN ledger_members AS m USING (member_id)
LEFT JOIN LATERAL (
    SELECT tier, qualifying_spend, tier_valid_until, next_tier, next_tier_spend
    FROM ledger_tier_history AS t
    WHERE t.member_id = ids.member_id ORDER BY seq DESC LIMIT 1
) AS h ON true
WHERE CASE WHEN m.member_id IS NULL
           THEN NOT EXISTS (SELECT 1 FROM ledger_entries AS e WHERE e.member_id = ids.member_id)
           ELSE (m.tier, m.qualifying_spend, m.tier_valid_until, m.next_tier, m.next_tier_spend)
                IS DISTINCT FROM
                (COALESCE(h.tier, 'member'), COALESCE(h.qualifying_spend, 0), h.tier_valid_until,
                 CASE WHEN h.next_tier IS NULL AND m.tier = h.tier THEN m.next_tier
                      ELSE h.next_tier END,
                 CASE WHEN h.next_tier_spend IS NULL AND m.tier = h.tier THEN m.next_tier_spend
                      ELSE h.next_tier_spend END)
      END
ORDER BY ids.member_id
"""
# A lot the sweeper would next look at only after a warning not yet sent is due: that
# warning goes out late, or never. Earlier is harmless (the sweeper looks, sends nothing
# twice, moves it on), and is what a rebuild and migration 0014 leave.
SWEEP_LATE: Final = """
SELECT l.member_id, l.lot_id, l.sweep_at, w.due
FROM ledger_lots AS l
CROSS JOIN LATERAL (
    SELECT COALESCE(min(l.expires_at - make_interval(hours => 24 * t.days)), l.expires_at)
           AS due
    FROM unnest($1::int[]) AS t(days)
    WHERE NOT EXISTS (SELECT 1 FROM ledger_expiry_warnings AS x
                      WHERE x.lot_id = l.lot_id AND x.threshold_days = t.days)
) AS w
WHERE l.remaining > 0 AND l.sweep_at > w.due
ORDER BY l.member_id, l.lot_id
"""
ORPHAN_TOTALS: Final = """
SELECT * FROM ledger_members AS m
WHERE NOT EXISTS (SELECT 1 FROM ledger_entries AS e WHERE e.member_id = m.member_id)
  AND (debt, earned, redeemed, revoked, expired, adjusted) <> (0, 0, 0, 0, 0, 0)
ORDER BY member_id
"""
ORPHAN_LOTS: Final = """
SELECT lot_id, member_id, remaining FROM ledger_lots AS l
WHERE remaining > 0
  AND NOT EXISTS (SELECT 1 FROM ledger_entries AS e WHERE e.member_id = l.member_id)
ORDER BY member_id, lot_id
"""
MEMBER_ROWS: Final = "SELECT * FROM ledger_members WHERE member_id = ANY($1::text[])"
MEMBER_LOTS: Final = """
SELECT * FROM ledger_lots WHERE member_id = ANY($1::text[]) AND remaining > 0
"""

Progress = Callable[[int], None]


class RebuildRunning(Exception):
    """Another rebuild holds `REBUILD_LOCK_KEY`: this one did nothing."""

    def __init__(self, holder: asyncpg.Record | None) -> None:
        what = "was running and has just finished; this one did nothing, run it again"
        if holder:
            since = f"{holder['backend_start']:%Y-%m-%d %H:%M:%S %Z}"
            what = f"is running (Postgres backend pid {holder['pid']}, connected {since});"
            what += " this one did nothing"
        super().__init__(f"another `ledger rebuild` {what}")


@dataclass
class RebuildReport:
    members: int = 0
    entries: int = 0
    lots: int = 0
    caught_up: int = 0  # members refolded at the swap (their entries arrived meanwhile)
    swap_retries: int = 0  # swap attempts lost to a deadlock or a lock timeout, then retried


@dataclass
class VerifyReport:
    members: int = 0
    entries: int = 0
    differences: list[str] = field(default_factory=list)


async def count_entries(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval(COUNT))


async def _books(
    conn: asyncpg.Connection, query: str, *args: Any, progress: Progress | None = None
) -> AsyncIterator[acc.Book]:
    """The journal folded member by member; ``conn`` must be inside a transaction."""
    cursor = await conn.cursor(query, *args)
    member: str | None = None
    entries: list[acc.Entry] = []
    while rows := await cursor.fetch(FETCH_ROWS):
        for r in rows:
            if r["member_id"] != member:
                if member is not None:
                    yield acc.replay(member, entries)
                member, entries = r["member_id"], []
            entries.append(entry_from_row(r))
        if progress is not None:
            progress(len(rows))
    if member is not None:
        yield acc.replay(member, entries)


def _member_record(book: acc.Book) -> tuple[Any, ...]:
    return (book.member_id, *(getattr(book, c) for c in TOTAL_COLUMNS))


async def _copy_books(conn: asyncpg.Connection, suffix: str, books: list[acc.Book]) -> int:
    await conn.copy_records_to_table(
        f"ledger_members{suffix}",
        records=[_member_record(b) for b in books],
        columns=MEMBER_COLUMNS,
    )
    lots = [lot_row(lot, lot.remaining) for b in books for lot in b.lots]
    if lots:
        await conn.copy_records_to_table(f"ledger_lots{suffix}", records=lots, columns=LOT_COLUMNS)
    return len(lots)


Phase = Callable[[str], None]


async def rebuild(dsn: str, phase: Phase | None = None) -> RebuildReport:
    """Rebuild ledger_members totals and ledger_lots from the journal; see the docstring.

    Each step is one SQL statement over the whole journal, so progress is told by step
    (`phase` is called as each begins), not by entries.
    """
    report = RebuildReport()
    if phase is None:
        phase = _no_phase
    write = await asyncpg.connect(dsn, server_settings=UNBOUNDED)
    read = await asyncpg.connect(dsn, server_settings=UNBOUNDED)
    try:
        if not await write.fetchval("SELECT pg_try_advisory_lock($1)", REBUILD_LOCK_KEY):
            raise RebuildRunning(await write.fetchrow(LOCK_HOLDER, REBUILD_LOCK_KEY))
        for table in TABLES:  # a killed run's, if any: no other run is building
            await write.execute(f"DROP TABLE IF EXISTS {table}_rebuild")
            await write.execute(
                f"CREATE TABLE {table}_rebuild"
                f" (LIKE {table} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
            )
        high = await _snapshot_reader(dsn, read)
        report.entries = await count_entries(read)
        phase(f"member totals from {report.entries:,} entries")
        members = await read.execute(BUILD_TOTALS, high)
        phase("lots with points left")
        lots = await read.execute(BUILD_LOTS, high, max(acc.WARNING_DAYS))
        report.members = int(members.rsplit(" ", 1)[-1])
        report.lots = int(lots.rsplit(" ", 1)[-1])
        await read.execute("COMMIT")
        phase(f"indexes of {report.members:,} members and {report.lots:,} lots")
        renames = await _clone_indexes(write)
        await _exclude_verifies(write, phase)
        phase("swap (entries that arrived meanwhile folded in)")
        report.caught_up, report.swap_retries = await _swap_retrying(write, high, renames)
    finally:
        await read.close()
        await write.close()  # and with it the lock
    return report


def _no_phase(_: str) -> None:
    return None


async def _snapshot_reader(dsn: str, read: asyncpg.Connection) -> int:
    """Start ``read`` on a snapshot with no append in flight; returns its highest seq."""
    lock = await asyncpg.connect(dsn, server_settings=UNBOUNDED)
    try:
        await lock.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        await lock.execute("LOCK TABLE ledger_entries IN SHARE MODE")
        snapshot = await lock.fetchval("SELECT pg_export_snapshot()")
        high = int(await lock.fetchval("SELECT COALESCE(max(seq), 0) FROM ledger_entries"))
        # Read-write: the build's INSERT … SELECTs run in this snapshot.
        await read.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        await read.execute(f"SET TRANSACTION SNAPSHOT '{snapshot}'")
        await lock.execute("COMMIT")
    finally:
        await lock.close()
    return high


async def _clone_indexes(conn: asyncpg.Connection) -> list[str]:
    """Give the rebuilt tables the live tables' indexes; returns the swap's rename steps."""
    steps: list[str] = []
    schema = await conn.fetchval("SELECT current_schema()")
    for table in TABLES:
        for r in await conn.fetch(INDEXES, table):
            name, temp = r["indexname"], r["indexname"] + "_rb"
            live = f"INDEX {name} ON {schema}.{table} "
            definition = r["indexdef"].replace(live, f"INDEX {temp} ON {schema}.{table}_rebuild ")
            if live not in r["indexdef"]:
                raise RuntimeError(f"cannot clone index {name}: {r['indexdef']}")
            await conn.execute(definition)
            if r["conname"]:
                steps.append(
                    f"ALTER TABLE {table} ADD CONSTRAINT {r['conname']}"
                    f" PRIMARY KEY USING INDEX {temp}"
                )
            else:
                steps.append(f"ALTER INDEX {temp} RENAME TO {name}")
    return steps


async def _exclude_verifies(conn: asyncpg.Connection, phase: Phase) -> None:
    """Wait until no verify reads the read models; none starts until ``conn`` closes."""
    if await conn.fetchval("SELECT pg_try_advisory_lock($1)", READ_MODELS_LOCK_KEY):
        return
    phase("waiting for a running `ledger verify` to finish (the swap replaces what it reads)")
    await conn.execute("SELECT pg_advisory_lock($1)", READ_MODELS_LOCK_KEY)


async def _swap_retrying(
    conn: asyncpg.Connection, high: int, renames: list[str]
) -> tuple[int, int]:
    """`_swap`, retried on a deadlock or lock timeout; returns (caught up, retries)."""
    for attempt in range(1, SWAP_ATTEMPTS + 1):
        try:
            return await _swap(conn, high, renames), attempt - 1
        except SWAP_RETRYABLE as exc:
            if attempt == SWAP_ATTEMPTS:
                raise
            log.warning(
                "ledger_rebuild_swap_retried",
                attempt=attempt,
                of=SWAP_ATTEMPTS,
                error=type(exc).__name__,
                detail=str(exc).splitlines()[0],
            )
            await asyncio.sleep(SWAP_RETRY_PAUSE_S * attempt)
    raise AssertionError("unreachable")


async def _swap(conn: asyncpg.Connection, high: int, renames: list[str]) -> int:
    async with conn.transaction():
        await conn.execute(f"SET LOCAL lock_timeout = '{SWAP_LOCK_TIMEOUT}'")
        await conn.execute("LOCK TABLE ledger_members, ledger_lots IN ACCESS EXCLUSIVE MODE")
        await conn.execute("LOCK TABLE ledger_entries IN SHARE MODE")
        late = [
            r["member_id"]
            for r in await conn.fetch(
                "SELECT DISTINCT member_id FROM ledger_entries WHERE seq > $1", high
            )
        ]
        if late:
            await conn.execute(
                "DELETE FROM ledger_members_rebuild WHERE member_id = ANY($1::text[])", late
            )
            await conn.execute(
                "DELETE FROM ledger_lots_rebuild WHERE member_id = ANY($1::text[])", late
            )
            books = [b async for b in _books(conn, JOURNAL_AFTER, late)]
            await _copy_books(conn, "_rebuild", books)
        await conn.execute(
            "INSERT INTO ledger_members_rebuild (member_id)"
            " SELECT member_id FROM ledger_members ON CONFLICT DO NOTHING"
        )
        await conn.execute(LATEST_TIERS)
        for table in TABLES:
            await conn.execute(f"DROP TABLE {table}")
            await conn.execute(f"ALTER TABLE {table}_rebuild RENAME TO {table}")
        for step in renames:
            await conn.execute(step)
    return len(late)


# --------------------------------------------------------------------------- verify


# What verify compares of a lot: its points and dates, and what it is attributed to (the
# expiry events and the per-store report read those from the lot).
LOT_FIELDS: Final = (
    "points", "remaining", "earned_at", "available_from", "expires_at", "source_event_id",
    "order_id", "rule_id", "ruleset_version", "adjustment_id",
)  # fmt: skip


def _lot_key(row: Any) -> tuple[Any, ...]:
    return tuple(row[2:12])  # `lot_row`'s columns after the ids, in LOT_FIELDS' order


def _compare(book: acc.Book, member: asyncpg.Record | None, lots: list[Any]) -> list[str]:
    m = book.member_id
    out: list[str] = []
    if member is None:
        return [f"{m}: in the journal but not in ledger_members"]
    for col in TOTAL_COLUMNS:
        want, have = getattr(book, col), member[col]
        if want != have:
            out.append(f"{m}: {col} journal={want} read-model={have}")
    want_lots = {lot.lot_id: _lot_key(lot_row(lot, lot.remaining)) for lot in book.lots}
    have_lots = {r["lot_id"]: tuple(r[f] for f in LOT_FIELDS) for r in lots}
    for lot_id in sorted(want_lots.keys() | have_lots.keys()):
        want_lot, have_lot = want_lots.get(lot_id), have_lots.get(lot_id)
        if want_lot != have_lot:
            out.append(
                f"{m}: lot {lot_id} journal={_fmt_lot(want_lot)} read-model={_fmt_lot(have_lot)}"
            )
    return out


def _fmt_lot(lot: tuple[Any, ...] | None) -> str:
    if lot is None:
        return "none"
    points, remaining, _earned, available_from, expires, source, order, rule, version, adj = lot
    return (
        f"(remaining {remaining}/{points}, available_from {_iso(available_from)},"
        f" expires {_iso(expires)}, rule {rule} {version or '-'}, source {source or '-'},"
        f" adjustment {adj or '-'}, order {order or '-'})"
    )


def _tier_difference(r: asyncpg.Record) -> str:
    m = r["member_id"]
    if r["missing"]:
        return f"{m}: in the tier history but not in ledger_members"
    return (
        f"{m}: tier history says {r['h_tier']} (spend {r['h_spend']}, valid until"
        f" {_iso(r['h_valid'])}, next {_next(r['h_next'], r['h_next_spend'])}), read-model says"
        f" {r['tier']} (spend {r['qualifying_spend']}, valid until"
        f" {_iso(r['tier_valid_until'])}, next {_next(r['next_tier'], r['next_tier_spend'])})"
    )


def _next(tier: str | None, spend: Any) -> str:
    return f"{tier} at {spend}" if tier else "-"


def _iso(dt: datetime | None) -> str:
    return dt.isoformat() if dt else "-"


async def verify(dsn: str, progress: Progress | None = None) -> VerifyReport:
    """Every difference between the fold of the journal and the read models."""
    report = VerifyReport()
    conn = await asyncpg.connect(dsn, server_settings=UNBOUNDED)
    side = conn  # one snapshot: the cursor's FETCHes and the lookups interleave on it
    try:
        # Before the snapshot, so a swap under way ends first; held until the connection
        # closes, so none starts (`READ_MODELS_LOCK_KEY`).
        await conn.execute("SELECT pg_advisory_lock_shared($1)", READ_MODELS_LOCK_KEY)
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            # The read models of the snapshot even against a swap that did not ask (a
            # rebuild from before that lock): it waits for us. Taken before the snapshot.
            await conn.execute("LOCK TABLE ledger_members, ledger_lots IN ACCESS SHARE MODE")
            chunk: list[acc.Book] = []

            async def check(books: list[acc.Book]) -> None:
                ids = [b.member_id for b in books]
                members = {r["member_id"]: r for r in await side.fetch(MEMBER_ROWS, ids)}
                lots: dict[str, list[Any]] = {}
                for r in await side.fetch(MEMBER_LOTS, ids):
                    lots.setdefault(r["member_id"], []).append(r)
                for b in books:
                    report.differences.extend(
                        _compare(b, members.get(b.member_id), lots.get(b.member_id, []))
                    )

            async for book in _books(conn, JOURNAL, progress=progress):
                report.members += 1
                chunk.append(book)
                if len(chunk) >= MEMBERS_CHUNK:
                    await check(chunk)
                    chunk = []
            if chunk:
                await check(chunk)
            report.entries = await count_entries(conn)
            for r in await conn.fetch(ORPHAN_TOTALS):
                report.differences.append(
                    f"{r['member_id']}: no journal entries but totals "
                    + ", ".join(f"{c}={r[c]}" for c in TOTAL_COLUMNS if r[c])
                )
            for r in await conn.fetch(ORPHAN_LOTS):
                report.differences.append(
                    f"{r['member_id']}: lot {r['lot_id']} holds {r['remaining']}"
                    " but the member has no journal entries"
                )
            for r in await conn.fetch(TIER_DIFFERENCES):
                report.differences.append(_tier_difference(r))
            for r in await conn.fetch(SWEEP_LATE, list(acc.WARNING_DAYS)):
                report.differences.append(
                    f"{r['member_id']}: lot {r['lot_id']} sweep_at {_iso(r['sweep_at'])} is after"
                    f" its next warning not sent ({_iso(r['due'])})"
                )
    finally:
        await conn.close()
    return report
