"""The outbox with two indexes (`id` primary key + `(service, id)`) or one (`(service, id)`).

Migration 0012 made it one; this compares the two on a fresh schema each.

Every outbox row is COPYed in by a consumer, selected back and deleted by its relay, and
its dead tuple is vacuumed: each index is written and cleaned once per row. Every
statement on the table names the service, so `(service, id)` alone serves them all.
This measures the Postgres backend's CPU (from /proc, so other processes do not count)
for the whole cycle, VACUUM included, in pages of 5,000 as the services write and relay
them; the two layouts alternate.

    PYTHONPATH=. .venv/bin/python bench/experiments/outbox_index.py [rows]
"""

from __future__ import annotations

import asyncio
import sys

import asyncpg

from bench.experiments._pg import backend_cpu_seconds, fresh_databases

PAGE = 5000
# The layout before migration 0012.
TWO_INDEXES = """
ALTER TABLE outbox DROP CONSTRAINT outbox_pkey;
ALTER TABLE outbox ADD PRIMARY KEY (id);
CREATE INDEX outbox_service_id ON outbox (service, id);
"""


async def cycle(conn: asyncpg.Connection, rows: int) -> float:
    """Backend CPU seconds to write, relay and vacuum `rows` outbox rows."""
    pid = await conn.fetchval("SELECT pg_backend_pid()")
    payload = b"x" * 300
    before = backend_cpu_seconds(pid)
    for start in range(0, rows, PAGE):
        records = [
            ("rules", "loyalty.grants.v1", f"m-{(start + i) % 50_000:07d}", payload)
            for i in range(PAGE)
        ]
        async with conn.transaction():
            await conn.copy_records_to_table(
                "outbox", records=records, columns=["service", "topic", "key", "payload"]
            )
        page = await conn.fetch(
            "SELECT id, topic, key, payload FROM outbox WHERE service = $1 ORDER BY id LIMIT $2",
            "rules",
            PAGE,
        )
        await conn.execute(
            "DELETE FROM outbox WHERE service = $1 AND id <= $2 AND id = ANY($3::bigint[])",
            "rules",
            page[-1]["id"],
            [r["id"] for r in page],
        )
    await conn.execute("VACUUM outbox")
    return backend_cpu_seconds(pid) - before


async def main(rows: int) -> None:
    async with fresh_databases(["outbox_two", "outbox_one"]) as dbs:
        layouts = {"two": dbs["outbox_two"], "one": dbs["outbox_one"]}
        for name, conn in layouts.items():
            await conn.execute("ALTER TABLE outbox SET (autovacuum_enabled = off)")
            if name == "two":
                await conn.execute(TWO_INDEXES)
        spent: dict[str, list[float]] = {"two": [], "one": []}
        for _ in range(4):
            for name, conn in layouts.items():
                spent[name].append(await cycle(conn, rows))
    for name, runs in spent.items():
        runs.sort()
        median = runs[len(runs) // 2]
        print(
            f"{name} index(es): {rows:,} rows written, relayed, vacuumed: backend CPU"
            f" {median / rows * 1e6:.2f} µs/row (median of {len(runs)};"
            f" runs {[round(r / rows * 1e6, 2) for r in runs]})"
        )


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000))
