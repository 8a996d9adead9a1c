"""Experiment: `ledger rebuild` (services.ledger.rebuild.rebuild) with and without tune_gc.

Uses the bench's Postgres cluster (.run/bench/pg), a scratch database and a journal generated
as `bench.measures.rebuild` does; prints entries/s for each mode (fresh rebuild each time).
"""

from __future__ import annotations

import asyncio
import gc
import sys
import time

import asyncpg

from bench.measures.rebuild import GEN_ENTRIES
from bench.settings import RUN
from deploy import local
from services.common.migrations import apply_migrations
from services.common.runtime import tune_gc
from services.ledger.rebuild import rebuild

ENTRIES = int(sys.argv[1]) if len(sys.argv) > 1 else 500_000


async def main() -> None:
    dsn = local.start_postgres(RUN / "pg", local.free_port(), RUN / "postgres.log")
    admin = await asyncpg.connect(dsn)
    await admin.execute('DROP DATABASE IF EXISTS "exp_rebuild" WITH (FORCE)')
    await admin.execute('CREATE DATABASE "exp_rebuild"')
    await admin.close()
    db = dsn.rsplit("/", 1)[0] + "/exp_rebuild"
    apply_migrations(db)
    conn = await asyncpg.connect(db)
    await conn.execute(GEN_ENTRIES, ENTRIES, max(1, ENTRIES // 20))
    await conn.execute("ANALYZE ledger_entries")
    await conn.close()
    try:
        for mode in ("default gc", "tune_gc()"):
            if mode == "tune_gc()":
                tune_gc()
            t = time.perf_counter()
            await rebuild(db)
            took = time.perf_counter() - t
            print(
                f"{mode:>10}: {ENTRIES:,} entries in {took:.1f}s = {ENTRIES / took:,.0f}/s"
                f" (gc threshold {gc.get_threshold()})"
            )
    finally:
        local.stop_postgres(RUN / "pg")


if __name__ == "__main__":
    asyncio.run(main())
