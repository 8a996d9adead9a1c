"""The notifier's write: `INSERT … SELECT FROM unnest(…) ON CONFLICT DO NOTHING`, or the
journal's way (select the ids already there, COPY the rest).

Same rows (ledger events from the bench workload, as `json_columns.py` makes them), in
batches as the notifier writes them, each way in its own database, alternating; Postgres
backend CPU from /proc per notification.

    PYTHONPATH=. .venv/bin/python bench/experiments/notification_insert.py [events]
"""

from __future__ import annotations

import asyncio
import sys

import asyncpg

from bench.experiments._pg import backend_cpu_seconds, fresh_databases
from bench.experiments.json_columns import batches

INSERT = """
INSERT INTO notifications (notification_id, member_id, kind, message, payload, status)
SELECT *, 'skipped' FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::json[])
ON CONFLICT (notification_id) DO NOTHING
"""
EXISTING = "SELECT notification_id FROM notifications WHERE notification_id = ANY($1::text[])"
COLUMNS = ["notification_id", "member_id", "kind", "message", "payload", "status"]


async def write(conn: asyncpg.Connection, how: str, rows: list[tuple[str, ...]]) -> None:
    async with conn.transaction():
        if how == "unnest":
            await conn.execute(INSERT, *([r[i] for r in rows] for i in range(5)))
        else:
            there = {r[0] for r in await conn.fetch(EXISTING, [r[0] for r in rows])}
            await conn.copy_records_to_table(
                "notifications",
                records=[(*r, "skipped") for r in rows if r[0] not in there],
                columns=COLUMNS,
            )


async def run(conn: asyncpg.Connection, how: str, work: list[list[tuple[str, ...]]]) -> float:
    await conn.execute("TRUNCATE notifications")
    pid = await conn.fetchval("SELECT pg_backend_pid()")
    before = backend_cpu_seconds(pid)
    for rows in work:
        await write(conn, how, rows)
    return backend_cpu_seconds(pid) - before


async def main(events: int) -> None:
    work = [b[2] for b in batches(events)]
    count = sum(len(w) for w in work)
    async with fresh_databases(["notes_unnest", "notes_copy"]) as dbs:
        ways = {"unnest": dbs["notes_unnest"], "copy": dbs["notes_copy"]}
        for conn in ways.values():
            # The notifier's own codec is binary too (COPY is binary-only in asyncpg); the
            # payloads here are JSON text already.
            await conn.set_type_codec(
                "json",
                encoder=str.encode,
                decoder=bytes.decode,
                schema="pg_catalog",
                format="binary",
            )
        spent: dict[str, list[float]] = {how: [] for how in ways}
        for _ in range(3):
            for how, conn in ways.items():
                spent[how].append(await run(conn, how, work))
    for how, runs in spent.items():
        each = sorted(r / count * 1e6 for r in runs)
        print(f"{how:6}: {each[1]:.2f} µs of backend CPU per notification (runs {each})")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 60_000))
