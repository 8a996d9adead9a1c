"""4: rebuild: `ledgerctl ledger rebuild` on a generated journal, when that command exists."""

from __future__ import annotations

import statistics
import time
from typing import Any

import asyncpg

from bench.settings import REBUILD_ENTRIES, REBUILD_MAX_S, RUNS, say
from bench.stack import Infra, ctl_available, ctl_failed, ledgerctl

GEN_ENTRIES = """
INSERT INTO ledger_entries (entry_id, member_id, kind, points, balance_after, occurred_at,
                            expires_at, rule_id, ruleset_version, source_event_id, store_id,
                            allocations)
SELECT 'x' || g, 'm' || lpad((g % $2)::text, 7, '0'), 'earn', 10 + g % 300,
       (g / $2 + 1) * 150, now() - interval '200 days' + g * interval '5 milliseconds',
       now() + interval '165 days' + g * interval '5 milliseconds', 'base', 'bench',
       'e' || g, 'sh-jingan', '[]'::jsonb
FROM generate_series(1, $1) AS g
"""


async def rebuild_runs(infra: Infra) -> dict[str, Any]:
    if not ctl_available("ledger", "rebuild"):
        say("rebuild: `python -m services.ctl ledger rebuild` not available yet; skipped")
        return {"available": False}
    db = "bench_rebuild"
    dsn = await infra.fresh_db(db)
    members = max(1, REBUILD_ENTRIES // 20)
    conn = await asyncpg.connect(dsn)
    try:
        t = time.perf_counter()
        await conn.execute(GEN_ENTRIES, REBUILD_ENTRIES, members)
        await conn.execute("ANALYZE ledger_entries")
        say(
            f"rebuild: {REBUILD_ENTRIES:,} journal entries generated"
            f" in {time.perf_counter() - t:.1f}s"
        )
    finally:
        await conn.close()
    seconds = []
    try:
        for i in range(RUNS):
            r, took = await ledgerctl(["ledger", "rebuild", "--database-url", dsn], dsn)
            if r.returncode != 0:
                return ctl_failed("rebuild", r)
            seconds.append(took)
            say(f"rebuild run {i + 1}: {REBUILD_ENTRIES:,} entries in {took:.1f}s")
            if took > REBUILD_MAX_S:
                break
    finally:
        await infra.drop_db(db)
    med = statistics.median(seconds)
    return {
        "available": True,
        "entries": REBUILD_ENTRIES,
        "members": members,
        "seconds": seconds,
        "eps": REBUILD_ENTRIES / med,
    }
