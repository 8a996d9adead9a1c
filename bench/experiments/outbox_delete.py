"""The relay's DELETE: by id through the (service, id) index, or by ctid (a TID scan).

The relay deletes the rows it has just published; the statement was 16 % of Postgres's
statement time end to end. The relay read those rows itself a moment earlier, so it can
name them by physical address (ctid) instead of looking each id up in an index again.
Only the relay deletes outbox rows and rows are never updated, so a ctid read by the relay
still names the same row when it deletes.

    PYTHONPATH=. .venv/bin/python bench/experiments/outbox_delete.py [rows]
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import asyncpg

from deploy import local
from services.common.migrations import apply_migrations

RUN = Path(".run/bench")
PAGE = 5000


async def fill(conn: asyncpg.Connection, rows: int) -> None:
    await conn.execute(
        "INSERT INTO outbox (service, topic, key, payload)"
        " SELECT 'rules', 'loyalty.grants.v1', 'm' || (g % 50000),"
        " convert_to(repeat('x', 300), 'UTF8')"
        " FROM generate_series(1, $1) g",
        rows,
    )


async def delete_page(conn: asyncpg.Connection, rows: list[asyncpg.Record], by_ctid: bool) -> None:
    """The relay's statement (by id), or the same rows named by their physical address."""
    if by_ctid:
        await conn.execute(
            "DELETE FROM outbox WHERE ctid = ANY($1::tid[])", [r["ctid"] for r in rows]
        )
    else:
        await conn.execute(
            "DELETE FROM outbox WHERE service = $1 AND id <= $2 AND id = ANY($3::bigint[])",
            "rules",
            rows[-1]["id"],
            [r["id"] for r in rows],
        )


async def drain(conn: asyncpg.Connection, by_ctid: bool) -> float:
    """Seconds spent in the DELETE statements while draining the outbox page by page."""
    spent = 0.0
    while True:
        rows = await conn.fetch(
            "SELECT id, ctid, topic, key, payload FROM outbox WHERE service = $1"
            " ORDER BY id LIMIT $2",
            "rules",
            PAGE,
        )
        if not rows:
            return spent
        started = time.perf_counter()
        await delete_page(conn, rows, by_ctid)
        spent += time.perf_counter() - started


async def churn(conn: asyncpg.Connection, rows: int, by_ctid: bool) -> tuple[float, float]:
    """As in the live service: a page written, then the oldest page relayed, over and over,
    with dead rows left for autovacuum. Returns seconds in SELECT and in DELETE."""
    selecting = deleting = 0.0
    await fill(conn, PAGE)
    for _ in range(rows // PAGE):
        await fill(conn, PAGE)
        started = time.perf_counter()
        page = await conn.fetch(
            "SELECT id, ctid, topic, key, payload FROM outbox WHERE service = $1"
            " ORDER BY id LIMIT $2",
            "rules",
            PAGE,
        )
        selecting += time.perf_counter() - started
        started = time.perf_counter()
        await delete_page(conn, page, by_ctid)
        deleting += time.perf_counter() - started
    await conn.execute("DELETE FROM outbox")
    return selecting, deleting


async def main(rows: int) -> None:
    dsn = await asyncio.to_thread(
        local.start_postgres, RUN / "pg", local.free_port(), RUN / "postgres.log"
    )
    admin = await asyncpg.connect(dsn)
    await admin.execute("DROP DATABASE IF EXISTS outbox_delete WITH (FORCE)")
    await admin.execute("CREATE DATABASE outbox_delete")
    db = dsn.rsplit("/", 1)[0] + "/outbox_delete"
    await asyncio.to_thread(apply_migrations, db)
    conn = await asyncpg.connect(db)
    try:
        results: dict[str, list[float]] = {"id": [], "ctid": []}
        for _ in range(3):
            for name in ("id", "ctid"):
                await fill(conn, rows)
                await conn.execute("VACUUM ANALYZE outbox")
                results[name].append(await drain(conn, name == "ctid"))
        churned: dict[str, list[tuple[float, float]]] = {"id": [], "ctid": []}
        for _ in range(3):
            for name in ("id", "ctid"):
                await conn.execute("VACUUM ANALYZE outbox")
                churned[name].append(await churn(conn, rows, name == "ctid"))
        for name, runs in churned.items():
            sel, dele = min(r[0] for r in runs), min(r[1] for r in runs)
            print(
                f"churn, DELETE by {name}: {rows:,} rows: SELECT {sel / rows * 1e6:.2f} µs/row,"
                f" DELETE {dele / rows * 1e6:.2f} µs/row (best of 3)"
            )
        for name, spent in results.items():
            best = min(spent)
            print(
                f"DELETE by {name}: {rows:,} rows in pages of {PAGE}: best {best:.3f} s"
                f" ({best / rows * 1e6:.2f} µs/row), runs {[round(s, 3) for s in spent]}"
            )
    finally:
        await conn.close()
        await admin.execute("DROP DATABASE IF EXISTS outbox_delete WITH (FORCE)")
        await admin.close()
        await asyncio.to_thread(local.stop_postgres, RUN / "pg")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 200_000))
