"""The services' planner-statistics keeper against a real Postgres: the rule with no
autovacuum racing it, then its wiring in the running services."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime, timedelta

import asyncpg
import pytest

from services.common.planner_stats import _LOCK_KEY, STATISTICS_TARGET, analyze_grown_tables
from tests.integration.events import CST
from tests.integration.harness import Stack, wait_until
from tests.integration.streams import assert_paid_exactly_once, mixed_stream

pytestmark = pytest.mark.integration
TABLE = "planner_probe"
NOW = datetime.now(CST).replace(microsecond=0)
WATCHED = ("ledger_entries", "ledger_lots", "rules_activity")


@pytest.fixture
async def pool(fresh_database: str) -> AsyncIterator[asyncpg.Pool]:
    conn = await asyncpg.connect(fresh_database)
    # Autovacuum off for this table, so only the code under test analyzes it.
    await conn.execute(
        f"CREATE TABLE {TABLE} (id bigint PRIMARY KEY, member_id text NOT NULL)"
        " WITH (autovacuum_enabled = false)"
    )
    await conn.close()
    p = await asyncpg.create_pool(fresh_database, min_size=1, max_size=2)
    assert p is not None
    try:
        yield p
    finally:
        await p.close()


async def grow_to(pool: asyncpg.Pool, rows: int) -> None:
    """Insert up to `rows` rows, then wait until the statistics system counts them."""
    async with pool.acquire() as conn:
        await conn.execute(
            f"INSERT INTO {TABLE} SELECT g, 'm' || (g % 97) FROM generate_series("
            f" (SELECT coalesce(max(id), 0) + 1 FROM {TABLE}), $1) g",
            rows,
        )
        await conn.execute("SELECT pg_stat_force_next_flush()")
    for _ in range(200):
        async with pool.acquire() as conn:
            live = await conn.fetchval(
                "SELECT n_live_tup FROM pg_stat_user_tables WHERE relname = $1", TABLE
            )
        if live == rows:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"statistics never counted {rows} live rows (last: {live})")


async def planner_rows(pool: asyncpg.Pool) -> float:
    async with pool.acquire() as conn:
        return float(
            await conn.fetchval("SELECT reltuples FROM pg_class WHERE relname = $1", TABLE)
        )


async def test_a_table_is_analyzed_when_it_doubles_past_the_floor(pool: asyncpg.Pool) -> None:
    assert await analyze_grown_tables(pool, min_rows=500) == []
    assert await planner_rows(pool) == -1  # never analyzed

    await grow_to(pool, 400)  # under the floor: left to autovacuum
    assert await analyze_grown_tables(pool, min_rows=500) == []

    await grow_to(pool, 1_000)
    assert await analyze_grown_tables(pool, min_rows=500) == [TABLE]
    assert await planner_rows(pool) == 1_000
    assert await analyze_grown_tables(pool, min_rows=500) == []  # nothing new

    await grow_to(pool, 1_900)  # under twice what the planner knows
    assert await analyze_grown_tables(pool, min_rows=500) == []

    await grow_to(pool, 2_100)
    assert await analyze_grown_tables(pool, min_rows=500) == [TABLE]
    assert await planner_rows(pool) == 2_100


async def test_the_keeper_samples_few_rows_and_still_counts_them(pool: asyncpg.Pool) -> None:
    """Its ANALYZE keeps a coarse histogram (a small sample: cheap on big tables), while the
    row count, what the keeper is for, stays close."""
    await grow_to(pool, 20_000)
    assert await analyze_grown_tables(pool, min_rows=500) == [TABLE]
    assert abs(await planner_rows(pool) - 20_000) <= 1_000
    async with pool.acquire() as conn:
        bounds = await conn.fetchval(
            "SELECT array_length(histogram_bounds::text::bigint[], 1) FROM pg_stats"
            " WHERE tablename = $1 AND attname = 'id'",
            TABLE,
        )
        await conn.execute(f"ANALYZE {TABLE}")  # Postgres's own default target
        full = await conn.fetchval(
            "SELECT array_length(histogram_bounds::text::bigint[], 1) FROM pg_stats"
            " WHERE tablename = $1 AND attname = 'id'",
            TABLE,
        )
    assert bounds == STATISTICS_TARGET + 1
    assert full > bounds


async def test_another_process_analyzing_means_this_one_skips_the_round(
    pool: asyncpg.Pool, fresh_database: str
) -> None:
    await grow_to(pool, 1_000)
    other = await asyncpg.connect(fresh_database)
    try:
        async with other.transaction():
            assert await other.fetchval("SELECT pg_try_advisory_xact_lock($1)", _LOCK_KEY)
            assert await analyze_grown_tables(pool, min_rows=500) == []
        assert await analyze_grown_tables(pool, min_rows=500) == [TABLE]
    finally:
        await other.close()


async def test_the_running_services_analyze_the_tables_they_fill(stack: Stack) -> None:
    """Wiring: the keeper runs in the services. Autovacuum is turned off for the three
    tables watched here, else it may analyze them first and leave the keeper nothing to do
    (as it did in one CI run); `last_analyze` is then the services' doing."""
    for table in WATCHED:
        await stack.fetch(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
    events = mixed_stream(1500, members=100, start=NOW - timedelta(days=20), seed=5)
    await stack.produce(events)
    await assert_paid_exactly_once(stack, events)

    async def analyzed() -> bool:
        rows = await stack.fetch(
            "SELECT relname FROM pg_stat_user_tables"
            " WHERE last_analyze IS NOT NULL AND relname = ANY($1::text[])",
            list(WATCHED),
        )
        return len(rows) == len(WATCHED)

    await wait_until(analyzed, timeout=30, what="the services to analyze the tables they filled")
