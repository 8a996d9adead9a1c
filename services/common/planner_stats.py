"""Keep the planner's row counts within a factor of two of tables that are still growing.

Why this exists: on a new database every table starts empty and never analyzed. The
services prepare their statements once per connection (asyncpg's statement cache), and
after five executions Postgres may switch a prepared statement to a generic plan; built
while the journal and lots tables look empty, that plan suits an empty table and stays in
use as they grow to hundreds of thousands of rows. Autovacuum fixes it when it gets to the
database, but it visits each database once per `autovacuum_naptime` (a minute by default,
shared among all databases) and can be busy elsewhere: in the benchmark the ledger then
ran at a quarter of its speed for its first minute (bench/README.md, "Latency at 5,000
events/s: two modes").

So each service checks, every few seconds, for tables of the current schema that hold at
least `min_rows` live rows and more than twice what the planner last recorded
(`pg_class.reltuples`, -1 when never analyzed), and analyzes them. `ANALYZE` invalidates
the cached plans on those tables, so the next execution plans with real numbers. A table
growing from empty is analyzed about log2(rows / min_rows) times (at 500, 1,000, 2,000, …
rows); in a steady production database nothing qualifies and a round is two small
queries (the lock, the catalog). One process at a time does the work (an advisory lock),
the others skip the round.

Its ANALYZEs sample 3,000 rows (`STATISTICS_TARGET` 10) instead of Postgres's 30,000:
what goes wrong on a new database is the row count, which a small sample gets within a
fraction of a per cent, and autovacuum analyzes again with the full sample once a tenth of
the table has changed. With the full sample these ANALYZEs were 15 % of Postgres's
statement time in the end-to-end benchmark (0.14-0.17 s each on a 200,000-row table,
against 0.012 s with this one).
"""

from __future__ import annotations

import asyncio
from typing import Final

import asyncpg
import structlog

log = structlog.get_logger()

MIN_ROWS: Final = 500
# default_statistics_target for the keeper's own ANALYZEs (Postgres's default is 100;
# the sample is 300 rows per point).
STATISTICS_TARGET: Final = 10
# pg_advisory lock key for "someone is analyzing": any constant unique to this purpose.
_LOCK_KEY: Final = 0x706C_616E_7374  # "planst"

GROWN_TABLES_SQL: Final = """
SELECT c.relname, s.n_live_tup, c.reltuples
FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid
WHERE s.schemaname = current_schema()
  AND s.n_live_tup >= $1
  AND s.n_live_tup > 2 * greatest(c.reltuples, 0)
ORDER BY c.relname
"""


async def analyze_grown_tables(pool: asyncpg.Pool, min_rows: int = MIN_ROWS) -> list[str]:
    """Analyze the tables that outgrew their statistics; returns their names."""
    async with pool.acquire() as conn, conn.transaction():
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", _LOCK_KEY):
            return []
        rows = await conn.fetch(GROWN_TABLES_SQL, min_rows)
        if not rows:
            return []
        # ANALYZE waits for a running autovacuum of the same table; never for long.
        await conn.execute("SET LOCAL lock_timeout = '2s'")
        await conn.execute(f"SET LOCAL default_statistics_target = {STATISTICS_TARGET}")
        done: list[str] = []
        for row in rows:
            name = row["relname"]
            await conn.execute(f"ANALYZE {_quote_ident(name)}")
            done.append(name)
            log.info(
                "planner_stats_refreshed",
                table=name,
                live_rows=row["n_live_tup"],
                planner_rows=max(int(row["reltuples"]), 0),
            )
        return done


async def keep_planner_stats(
    pool: asyncpg.Pool, interval_s: float, min_rows: int = MIN_ROWS
) -> None:
    """Background loop for a service: a failed round is logged and retried next time.

    `interval_s` 0 (`PLANNER_STATS_SECONDS=0`) turns it off, for a database whose
    statistics its DBA manages.
    """
    if interval_s <= 0:
        return
    while True:
        await asyncio.sleep(interval_s)
        try:
            await analyze_grown_tables(pool, min_rows)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("planner_stats_failed", error=repr(exc))


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
