"""Writes that must skip rows already there: `INSERT … SELECT FROM unnest(…) ON CONFLICT DO
NOTHING`, or the journal's way (select the ids already there, COPY the rest).

Three of the services' writes, with rows from the bench workload in batches of 5,000
events: the notifier's notifications (ledger events as `json_columns.py` makes them), the
rules service's `rules_activity` (every activity with its payload) and the ledger's
`ledger_tier_history` (the rules' tier reports); each INSERT returns the ids it wrote, as
the services need to know which rows are new. Each way in
its own database, alternating; Postgres backend CPU from /proc per row.

    PYTHONPATH=. .venv/bin/python bench/experiments/dedupe_writes.py [events]
"""

from __future__ import annotations

import asyncio
import sys
from datetime import UTC, datetime

import asyncpg
import orjson

from bench.experiments._pg import backend_cpu_seconds, fresh_databases
from bench.experiments.json_columns import batches
from bench.workload import generate
from schemas.activity import parse_activity
from schemas.grants import TierEvaluated
from services.common.runtime import init_connection
from services.rules.engine import evaluate
from services.rules.rulebook_store import DEFAULT_RULESET
from services.rules.ruleset import load_ruleset
from services.rules.state import MemberState

INSERT_NOTIFICATIONS = """
INSERT INTO notifications (notification_id, member_id, kind, message, payload, status)
SELECT *, 'skipped' FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::json[])
ON CONFLICT (notification_id) DO NOTHING
"""
INSERT_ACTIVITY = """
INSERT INTO rules_activity (event_id, member_id, type, occurred_at, topic, partition, "offset",
                            payload)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::text[],
                     $6::int[], $7::bigint[], $8::bytea[])
ON CONFLICT (event_id) DO NOTHING
RETURNING event_id
"""
INSERT_TIERS = """
INSERT INTO ledger_tier_history (event_id, member_id, occurred_at, tier, previous_tier,
                                 qualifying_spend, tier_valid_until, next_tier, next_tier_spend)
SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::text[], $5::text[],
                     $6::numeric[], $7::timestamptz[], $8::text[], $9::numeric[])
ON CONFLICT (event_id) DO NOTHING
RETURNING event_id
"""
TIER_COLUMNS = [
    "event_id", "member_id", "occurred_at", "tier", "previous_tier", "qualifying_spend",
    "tier_valid_until", "next_tier", "next_tier_spend",
]  # fmt: skip
TABLES = {
    # table: (key column, INSERT, columns)
    "notifications": (
        "notification_id",
        INSERT_NOTIFICATIONS,
        ["notification_id", "member_id", "kind", "message", "payload", "status"],
    ),
    "rules_activity": (
        "event_id",
        INSERT_ACTIVITY,
        ["event_id", "member_id", "type", "occurred_at", "topic", "partition", "offset", "payload"],
    ),
    "ledger_tier_history": ("event_id", INSERT_TIERS, TIER_COLUMNS),
}
Rows = list[tuple[object, ...]]


def activity_batches(events: int) -> list[Rows]:
    out: list[Rows] = []
    rows: Rows = []
    for i, e in enumerate(generate(events, seed=42, end=datetime(2026, 11, 23, tzinfo=UTC))):
        a = parse_activity(e.value)
        rows.append((a.event_id, a.member_id, a.type, a.occurred_at, "activity", 0, i, e.value))
        if len(rows) == 5_000:
            out.append(rows)
            rows = []
    return [*out, rows] if rows else out


def tier_batches(events: int) -> list[Rows]:
    """The tier reports the evaluator makes for the workload, by batch of 5,000 events."""
    ruleset = load_ruleset(DEFAULT_RULESET)
    states: dict[str, MemberState] = {}
    out: list[Rows] = []
    rows: Rows = []
    for i, e in enumerate(generate(events, seed=42, end=datetime(2026, 11, 23, tzinfo=UTC))):
        a = parse_activity(e.value)
        result = evaluate(states.get(a.member_id) or MemberState(member_id=a.member_id), a,
                          ruleset, {})  # fmt: skip
        states[a.member_id] = result.state
        for g in result.grants:
            if isinstance(g, TierEvaluated):
                d = g.data
                rows.append((g.event_id, g.member_id, g.occurred_at, d.tier, d.previous_tier,
                             d.qualifying_spend, d.tier_valid_until, d.next_tier,
                             d.next_tier_spend))  # fmt: skip
        if (i + 1) % 5_000 == 0:
            out.append(rows)
            rows = []
    return [*out, rows] if rows else out


async def write(conn: asyncpg.Connection, table: str, how: str, rows: Rows) -> None:
    key, insert, columns = TABLES[table]
    async with conn.transaction():
        if how == "unnest":
            width = insert.count("$")
            await conn.fetch(insert, *([r[i] for r in rows] for i in range(width)))
        else:
            there = {
                r[0]
                for r in await conn.fetch(
                    f"SELECT {key} FROM {table} WHERE {key} = ANY($1::text[])",
                    [r[0] for r in rows],
                )
            }
            fresh = [
                (*r, "skipped") if table == "notifications" else r
                for r in rows
                if r[0] not in there
            ]
            await conn.copy_records_to_table(table, records=fresh, columns=columns)


async def run(conn: asyncpg.Connection, table: str, how: str, work: list[Rows]) -> float:
    await conn.execute(f"TRUNCATE {table}")
    pid = await conn.fetchval("SELECT pg_backend_pid()")
    before = backend_cpu_seconds(pid)
    for rows in work:
        await write(conn, table, how, rows)
    return backend_cpu_seconds(pid) - before


async def main(events: int) -> None:
    work: dict[str, list[Rows]] = {
        # Payloads as the notifier hands them to the codec: the JSON text as a Fragment.
        "notifications": [[(*n[:4], orjson.Fragment(n[4])) for n in b[2]] for b in batches(events)],
        "rules_activity": activity_batches(events),
        "ledger_tier_history": tier_batches(events),
    }
    async with fresh_databases(["dedupe_unnest", "dedupe_copy"]) as dbs:
        ways = {"unnest": dbs["dedupe_unnest"], "copy": dbs["dedupe_copy"]}
        for conn in ways.values():
            await init_connection(conn)  # the services' codecs (binary: COPY needs them)
        for table, batches_of_table in work.items():
            count = sum(len(w) for w in batches_of_table)
            spent: dict[str, list[float]] = {how: [] for how in ways}
            for _ in range(3):
                for how, conn in ways.items():
                    spent[how].append(await run(conn, table, how, batches_of_table))
            for how, runs in spent.items():
                each = sorted(round(r / count * 1e6, 2) for r in runs)
                print(f"{table} {how:6}: {each[1]:.2f} µs of backend CPU per row (runs {each})")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 60_000))
