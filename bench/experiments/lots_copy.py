"""New lots: `INSERT … SELECT FROM unnest(…) ON CONFLICT (lot_id) DO UPDATE`, or COPY.

A lot's id is the id of the earn entry that created it, and the ledger COPYs its journal
entries first (primary key on `entry_id`), so a lot that is new to the batch is new to the
table: the ON CONFLICT arm never runs. Rows shaped as the ledger writes them (11 columns
plus `sweep_at`), batches of 5,000, each way in its own database, alternating. Reported:
the client's CPU (encoding the arrays or the COPY records) and the backend's, per lot.

    PYTHONPATH=. .venv/bin/python bench/experiments/lots_copy.py [lots]
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from datetime import UTC, datetime, timedelta

import asyncpg

from bench.experiments._pg import backend_cpu_seconds, fresh_databases
from services.common.runtime import init_connection

Rows = list[tuple[object, ...]]
WARN = timedelta(days=30)
# The lot columns the ledger wrote at the time (the upsert below names the same).
LOT_COLUMNS = (
    "lot_id", "member_id", "points", "remaining", "earned_at", "available_from", "expires_at",
    "source_event_id", "order_id", "rule_id", "ruleset_version",
)  # fmt: skip
# The ledger's statement before it COPYed its new lots.
UPSERT_LOTS = """
INSERT INTO ledger_lots (lot_id, member_id, points, remaining, earned_at, available_from,
                         expires_at, source_event_id, order_id, rule_id, ruleset_version,
                         sweep_at)
SELECT u.*, u.expires_at - interval '30 days'
FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::timestamptz[],
            $6::timestamptz[], $7::timestamptz[], $8::text[], $9::text[], $10::text[],
            $11::text[])
     AS u(lot_id, member_id, points, remaining, earned_at, available_from, expires_at,
          source_event_id, order_id, rule_id, ruleset_version)
ON CONFLICT (lot_id) DO UPDATE SET remaining = EXCLUDED.remaining
"""


def lot_batches(lots: int) -> list[Rows]:
    rng = random.Random(42)
    start = datetime(2026, 9, 1, tzinfo=UTC)
    rows: Rows = []
    for i in range(lots):
        earned = start + timedelta(seconds=i * 20)
        expires = earned.replace(year=earned.year + 1)
        rows.append(
            (
                f"grant-evt-{i:08d}-purchase_points",
                f"m-{rng.randrange(100_000):06d}",
                rng.choice((5, 10, 20, 50, 380, 1200)),
                0,
                earned,
                earned,
                expires,
                f"evt-{i:08d}",
                f"o-{i}" if i % 3 == 0 else None,
                "purchase_points",
                "2026.1",
            )
        )
    rows = [(*r[:3], r[2], *r[4:]) for r in rows]  # remaining = points
    return [rows[i : i + 5_000] for i in range(0, len(rows), 5_000)]


async def write(conn: asyncpg.Connection, how: str, rows: Rows) -> None:
    async with conn.transaction():
        if how == "unnest":
            await conn.execute(UPSERT_LOTS, *[list(c) for c in zip(*rows, strict=True)])
        else:
            await conn.copy_records_to_table(
                "ledger_lots",
                records=[(*r, r[6] - WARN) for r in rows],  # type: ignore[operator]
                columns=[*LOT_COLUMNS, "sweep_at"],
            )


async def run(conn: asyncpg.Connection, how: str, work: list[Rows]) -> tuple[float, float]:
    await conn.execute("TRUNCATE ledger_lots")
    pid = await conn.fetchval("SELECT pg_backend_pid()")
    before, client = backend_cpu_seconds(pid), time.process_time()
    for rows in work:
        await write(conn, how, rows)
    return time.process_time() - client, backend_cpu_seconds(pid) - before


async def main(lots: int) -> None:
    work = lot_batches(lots)
    async with fresh_databases(["lots_unnest", "lots_copy"]) as dbs:
        ways = {"unnest": dbs["lots_unnest"], "copy": dbs["lots_copy"]}
        for conn in ways.values():
            await init_connection(conn)
        spent: dict[str, list[tuple[float, float]]] = {how: [] for how in ways}
        for _ in range(3):
            for how, conn in ways.items():
                spent[how].append(await run(conn, how, work))
        for how, runs in spent.items():
            client = sorted(round(c / lots * 1e6, 2) for c, _ in runs)
            backend = sorted(round(b / lots * 1e6, 2) for _, b in runs)
            print(
                f"{how:6}: client {client[1]:.2f} µs, backend {backend[1]:.2f} µs per lot"
                f" (runs {client} / {backend})"
            )


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000))
