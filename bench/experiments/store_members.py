"""The summary's `tiers` with `store_id` (members who ever had an entry at the store):
what answering it costs the report, and what each way of answering it costs the journal's
write path, the ledger's hottest statement.

Layouts, one database each, each journal prefilled the same way (N entries over two years,
default 3,000,000; 40 stores, a third of the entries without one; default 500,000
members):

* `none`: the journal as before migration 0027; the report seq-scans it for the store.
* `index`: an index on `ledger_entries (store_id, member_id)`.
* `partial`: the same, `WHERE store_id IS NOT NULL` (entries without a store skip it).
* `table`: no index; a table of (store, member) pairs, upserted per batch after the COPY.
* `trigger`: the same table kept by a statement trigger on the journal (the COPY's rows
  as a transition table), no statement from the client: migration 0027 as it stands.

Write: the journal entries the ledger makes of the bench workload (200,000 events,
~206,000 entries, by batches of 5,000 events), each batch COPYed in its own transaction
(plus the pairs' upsert for `table`), every layout once per round, rounds alternating;
the backend's CPU (/proc) and the client's per entry, and the WAL per entry.
Read: the store's tier counts each way, median of 7, same counts asserted.

    PYTHONPATH=. .venv/bin/python bench/experiments/store_members.py [entries] [members] [rounds]
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from datetime import UTC, datetime
from typing import Any

import asyncpg

from bench.experiments._pg import backend_cpu_seconds, fresh_databases
from bench.workload import generate
from schemas.activity import parse_activity
from schemas.grants import PointsGranted, PointsRevoked
from services.common.runtime import init_connection, tune_gc
from services.ledger import accounting as acc
from services.ledger.journal import ENTRY_COLUMNS, entry_record
from services.ledger.projector import command_for
from services.ledger.reports import TIERS_AT_STORE, TIERS_COUNT
from services.rules.engine import evaluate
from services.rules.rulebook_store import DEFAULT_RULESET
from services.rules.ruleset import load_ruleset
from services.rules.state import MemberState

END = datetime(2026, 11, 23, tzinfo=UTC)
BATCH = 5_000
STORE = 12  # the position of `entry_record`'s store_id
PREFILL = """
INSERT INTO ledger_entries (entry_id, member_id, kind, points, balance_after, occurred_at,
                            expires_at, rule_id, ruleset_version, source_event_id, order_id,
                            store_id, allocations)
SELECT 'p' || g, 'pm' || (g * 7919 % $2), 'earn', 10, 100,
       now() - interval '730 days' + make_interval(secs => g * 730 * 86400.0 / $1),
       now() + interval '1 year', 'base', 'bench', 'e' || g, 'o' || g,
       CASE WHEN g % 3 = 0 THEN NULL ELSE 'store-' || (g * 31 % 40) END, '[]'::jsonb
FROM generate_series(1, $1::bigint) AS g
"""
MEMBERS = """
INSERT INTO ledger_members (member_id, tier)
SELECT member_id, (ARRAY['member', 'silver', 'gold', 'diamond'])[1 + abs(hashtext(member_id)) % 4]
FROM (SELECT DISTINCT member_id FROM ledger_entries) AS m
ON CONFLICT DO NOTHING
"""
# Migration 0027's pairs and trigger, taken out of the layouts that answer another way.
WITHOUT_PAIRS = """
DROP TRIGGER ledger_entries_member_stores ON ledger_entries;
DROP FUNCTION ledger_member_stores_add();
DROP TABLE ledger_member_stores;
"""
PAIRS = """
CREATE TABLE ledger_member_stores (store_id text NOT NULL, member_id text NOT NULL,
                                   PRIMARY KEY (store_id, member_id))
"""
INDEX = "CREATE INDEX ledger_entries_store ON ledger_entries (store_id, member_id)"
LAYOUTS: dict[str, list[str]] = {
    "none": [WITHOUT_PAIRS],
    "index": [WITHOUT_PAIRS, INDEX],
    "partial": [WITHOUT_PAIRS, f"{INDEX} WHERE store_id IS NOT NULL"],
    "table": [WITHOUT_PAIRS, PAIRS],
    "trigger": [],  # as migrated
}
FILL_PAIRS = """
INSERT INTO ledger_member_stores
SELECT DISTINCT store_id, member_id FROM ledger_entries WHERE store_id IS NOT NULL
ON CONFLICT DO NOTHING
"""
UPSERT_PAIRS = """
INSERT INTO ledger_member_stores (store_id, member_id)
SELECT * FROM unnest($1::text[], $2::text[]) ON CONFLICT DO NOTHING
"""
# The summary's statement before migration 0027: the journal asked for the store's members.
TIERS_FROM_JOURNAL = """
SELECT tier, count(*) AS members FROM ledger_members AS m
WHERE $1::text IS NULL
   OR EXISTS (SELECT 1 FROM ledger_entries AS e WHERE e.member_id = m.member_id
              AND e.store_id = $1)
GROUP BY tier
"""
# Read with the index, driven from the store's entries rather than from every member.
TIERS_IN = """
SELECT m.tier, count(*) AS members FROM ledger_members AS m
WHERE m.member_id IN (SELECT e.member_id FROM ledger_entries AS e WHERE e.store_id = $1)
GROUP BY m.tier
"""
Rows = list[tuple[Any, ...]]


def entry_batches(events: int) -> list[Rows]:
    """The journal rows the ledger writes for the workload, per batch of 5,000 events."""
    ruleset = load_ruleset(DEFAULT_RULESET)
    states: dict[str, MemberState] = {}
    books: dict[str, acc.Book] = {}
    out: list[Rows] = []
    stream = [parse_activity(e.value) for e in generate(events, seed=42, end=END)]
    for start in range(0, len(stream), BATCH):
        rows: Rows = []
        for ev in stream[start : start + BATCH]:
            state = states.get(ev.member_id) or MemberState(member_id=ev.member_id)
            result = evaluate(state, ev, ruleset, {})
            states[ev.member_id] = result.state
            for g in result.grants:
                if isinstance(g, PointsGranted | PointsRevoked):
                    book = books.get(g.member_id) or acc.Book(member_id=g.member_id)
                    book, entries = acc.apply(book, command_for(g))
                    books[g.member_id] = book
                    rows.extend(entry_record(e) for e in entries)
        out.append(rows)
    return out


async def write(conn: asyncpg.Connection, layout: str, work: list[Rows], tag: str) -> list[float]:
    """[backend CPU s, client CPU s, WAL bytes] for COPYing every batch once."""
    pid = await conn.fetchval("SELECT pg_backend_pid()")
    wal = await conn.fetchval("SELECT pg_current_wal_insert_lsn()")
    backend, client = backend_cpu_seconds(pid), time.process_time()
    for rows in work:
        records = [(r[0] + tag, *r[1:]) for r in rows]
        async with conn.transaction():
            await conn.copy_records_to_table(
                "ledger_entries", records=records, columns=ENTRY_COLUMNS
            )
            if layout == "table":
                pairs = {(r[STORE], r[1]) for r in rows if r[STORE] is not None}
                await conn.execute(UPSERT_PAIRS, [p[0] for p in pairs], [p[1] for p in pairs])
    spent = [backend_cpu_seconds(pid) - backend, time.process_time() - client]
    wal_bytes = await conn.fetchval("SELECT pg_current_wal_insert_lsn() - $1::pg_lsn", wal)
    return [*spent, float(wal_bytes)]


async def read(conn: asyncpg.Connection, sql: str, store: str) -> tuple[float, dict[str, int]]:
    async with conn.transaction(readonly=True):
        await conn.execute("SET LOCAL jit = off")  # as the summary runs it
        t = time.perf_counter()
        rows = await conn.fetch(sql, store)
        spent = time.perf_counter() - t
    return spent, {r["tier"]: r["members"] for r in rows}


async def main(entries: int, members: int, rounds: int) -> None:
    tune_gc()
    work = entry_batches(200_000)
    count = sum(len(b) for b in work)
    with_store = sum(r[STORE] is not None for b in work for r in b)
    print(f"{count:,} workload entries ({with_store:,} with a store) in {len(work)} batches")
    names = {layout: f"store_members_{layout}" for layout in LAYOUTS}
    async with fresh_databases(list(names.values())) as dbs:
        conns = {layout: dbs[name] for layout, name in names.items()}
        for layout, conn in conns.items():
            await init_connection(conn)
            for ddl in LAYOUTS[layout]:  # before the prefill: an index grown, not built
                await conn.execute(ddl)
            t = time.perf_counter()
            await conn.execute(PREFILL, entries, members)
            if layout == "table":  # the trigger's layout filled them as it went
                await conn.execute(FILL_PAIRS)
            await conn.execute("VACUUM ANALYZE ledger_entries")
            print(f"{layout}: {entries:,} entries prefilled in {time.perf_counter() - t:.0f} s")
        spent: dict[str, list[list[float]]] = {layout: [] for layout in LAYOUTS}
        for i in range(rounds):
            for layout, conn in conns.items():
                spent[layout].append(await write(conn, layout, work, f"-r{i}"))
        print(f"write: {count:,} entries per run, {rounds} rounds alternating; per entry:")
        base = [r[0] for r in spent["none"]]
        for layout, runs in spent.items():
            backend = [r[0] / count * 1e6 for r in runs]
            client = statistics.median(r[1] / count * 1e6 for r in runs)
            # Paired with `none` in the same round: the machine's hour cancels out.
            extra = statistics.median(
                (r[0] - b) / count * 1e6 for r, b in zip(runs, base, strict=True)
            )
            wal = statistics.median(r[2] / count for r in runs)
            print(
                f"  {layout:8} backend {statistics.median(backend):5.2f} µs"
                f" (+{extra:.2f} paired; rounds {', '.join(f'{b:.2f}' for b in backend)}),"
                f" client {client:5.2f} µs, WAL {wal:.0f} bytes"
            )
        for conn in conns.values():
            await conn.execute(MEMBERS)
            await conn.execute("VACUUM ANALYZE")  # as autovacuum would: visibility map set
        ways = {
            "none": ("none", TIERS_FROM_JOURNAL),
            "index": ("index", TIERS_FROM_JOURNAL),
            "index, IN": ("index", TIERS_IN),
            "partial": ("partial", TIERS_FROM_JOURNAL),
            "table": ("table", TIERS_AT_STORE),
            "trigger": ("trigger", TIERS_AT_STORE),
        }
        total = await conns["none"].fetchval("SELECT count(*) FROM ledger_entries")
        for store in ("store-7", "sh-jingan"):
            times: dict[str, list[float]] = {way: [] for way in ways}
            answers: dict[str, dict[str, int]] = {}
            for _ in range(7):
                for way, (layout, sql) in ways.items():
                    t, answers[way] = await read(conns[layout], sql, store)
                    times[way].append(t)
            assert len({repr(sorted(a.items())) for a in answers.values()}) == 1, answers
            print(f"read, {total:,} entries, {store}: {answers['none']}")
            for way, ts in times.items():
                print(
                    f"  {way:10} median {statistics.median(ts) * 1000:7.1f} ms"
                    f"  (min {min(ts) * 1000:.1f}, max {max(ts) * 1000:.1f})"
                )
        chain = []
        for _ in range(7):  # for scale: the chain's count, every member once
            async with conns["trigger"].transaction(readonly=True):
                t = time.perf_counter()
                await conns["trigger"].fetch(TIERS_COUNT)
                chain.append(time.perf_counter() - t)
        print(f"read, every store (TIERS_COUNT): median {statistics.median(chain) * 1000:.1f} ms")
        plan = await conns["trigger"].fetch(
            f"EXPLAIN (ANALYZE, COSTS OFF) {TIERS_AT_STORE}", "store-7"
        )
        print("plan (trigger):\n  " + "\n  ".join(r[0] for r in plan))


if __name__ == "__main__":
    asyncio.run(
        main(
            int(sys.argv[1]) if len(sys.argv) > 1 else 3_000_000,
            int(sys.argv[2]) if len(sys.argv) > 2 else 500_000,
            int(sys.argv[3]) if len(sys.argv) > 3 else 7,
        )
    )
