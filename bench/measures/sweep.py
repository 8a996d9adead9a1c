"""7: expiry sweep: the ledger's `ExpirySweeper` in this process (run after rebuild, before
reads)."""

from __future__ import annotations

import statistics
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from bench.settings import RUNS, SWEEP_LOTS, say
from bench.stack import Infra

SWEEP_LOTS_PER_MEMBER = 5
# $3 names the lots apart; $4 is the first lot's expiry, the others an hour or a day later;
# `sweep_at` as the ledger writes a lot: its first warning's moment.
GEN_SWEEP_LOTS = """
INSERT INTO ledger_lots (lot_id, member_id, points, remaining, earned_at, available_from,
                         expires_at, source_event_id, rule_id, sweep_at)
SELECT lot_id, member_id, 100, 100, earned, earned, expires, source, 'base',
       expires - interval '30 days'
FROM (
    SELECT $3::text || g || '-' || k AS lot_id, 'm' || lpad(g::text, 7, '0') AS member_id,
           $4::timestamptz - interval '365 days' AS earned,
           $4::timestamptz + k * interval '1 day' + (g % 17) * interval '1 hour' AS expires,
           'e' || g || '-' || k AS source
    FROM generate_series(0, $1 - 1) AS g, generate_series(0, $2 - 1) AS k
) AS lots
"""
GEN_SWEEP_MEMBERS = """
INSERT INTO ledger_members (member_id, earned)
SELECT 'm' || lpad(g::text, 7, '0'), 200 * $2 FROM generate_series(0, $1 - 1) AS g
"""


async def sweep_run(infra: Infra, lots: int, tag: str) -> dict[str, Any]:
    """One sweep of `lots` lapsed lots, one of `lots` lots to warn about, one idle sweep."""
    from services.common.runtime import init_connection, tune_gc
    from services.ledger.sweeper import ExpirySweeper

    tune_gc()  # as the ledger process runs
    db = f"bench_sweep_{tag}"
    dsn = await infra.fresh_db(db)
    members = max(1, lots // SWEEP_LOTS_PER_MEMBER)
    now = datetime.now(UTC)
    out: dict[str, Any] = {"lots": members * SWEEP_LOTS_PER_MEMBER, "members": members}
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2, init=init_connection)
    try:
        sweeper = ExpirySweeper(pool, "bench.ledger", 60, lambda: None)

        async def analyze(sql: str = "", *args: Any) -> None:
            async with pool.acquire() as conn:
                if sql:
                    await conn.execute(sql, *args)
                await conn.execute("ANALYZE ledger_members, ledger_lots")  # as autovacuum would

        async def timed_sweep() -> tuple[float, tuple[int, int]]:
            t = time.perf_counter()
            done = await sweeper.sweep_once(now)
            return time.perf_counter() - t, done

        await analyze(GEN_SWEEP_MEMBERS, members, SWEEP_LOTS_PER_MEMBER)
        # Lapsed 1-35 days ago.
        await analyze(GEN_SWEEP_LOTS, members, SWEEP_LOTS_PER_MEMBER, "x", now - timedelta(35))
        out["expire_seconds"], (expired, _) = await timed_sweep()
        # 10-15 days ahead: inside the 30-day window, not the 7-day one.
        await analyze(GEN_SWEEP_LOTS, members, SWEEP_LOTS_PER_MEMBER, "w", now + timedelta(10))
        out["warn_seconds"], (_, warned) = await timed_sweep()
        await analyze()
        out["idle_seconds"], idle = await timed_sweep()
        assert idle == (0, 0), idle
        out["expired_entries"], out["warnings"] = expired, warned
    finally:
        await pool.close()
        await infra.drop_db(db)
    out["expire_eps"] = expired / out["expire_seconds"]
    out["warn_eps"] = warned / out["warn_seconds"]
    say(
        f"sweep {tag}: {expired:,} lapsed lots expired in {out['expire_seconds']:.1f}s"
        f" ({out['expire_eps']:,.0f}/s), {warned:,} warnings in {out['warn_seconds']:.1f}s"
        f" ({out['warn_eps']:,.0f}/s), idle sweep over them {out['idle_seconds']:.2f}s"
    )
    return out


async def sweep_runs(infra: Infra) -> dict[str, Any]:
    runs = [await sweep_run(infra, SWEEP_LOTS, str(i)) for i in range(RUNS)]
    return {
        "lots": runs[0]["lots"],
        "method": "ExpirySweeper.sweep_once in the bench process (the ledger's own code), pages"
        " of 500 members / 5,000 lots, relay not running (outbox rows written, not published)",
        "runs": runs,
        "expire_eps": statistics.median(r["expire_eps"] for r in runs),
        "warn_eps": statistics.median(r["warn_eps"] for r in runs),
        "idle_seconds": statistics.median(r["idle_seconds"] for r in runs),
    }
