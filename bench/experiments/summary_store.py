"""The summary's period totals with a `store_id` filter: the journal joined to itself for
every entry's store (as PERIOD_TOTALS was) against the store looked up for expiries alone
(`reports._AT_STORE`, as the daily report does), with and without JIT.

A journal of N entries over two years (default 900,000), a tenth of them expiries whose
store is their lot's; a month's totals for one store and for all, median of 7 runs each
way, alternating.
Usage: PYTHONPATH=. .venv/bin/python bench/experiments/summary_store.py [entries]
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time

from bench.experiments._pg import fresh_databases
from services.ledger import reports

JOINED = """
SELECT e.kind, e.rule_id, sum(e.points)::bigint AS points, count(*) AS n
FROM ledger_entries AS e
LEFT JOIN ledger_entries AS src
       ON e.kind = 'expire' AND src.entry_id = e.allocations -> 0 ->> 0
WHERE e.occurred_at >= $1 AND e.occurred_at < $2
  AND ($3::text IS NULL OR COALESCE(e.store_id, src.store_id) = $3)
GROUP BY e.kind, e.rule_id
"""

GEN = """
INSERT INTO ledger_entries (entry_id, member_id, kind, points, balance_after, occurred_at,
                            expires_at, rule_id, ruleset_version, source_event_id, store_id,
                            allocations)
SELECT 'x' || g, 'm' || (g % 50000), CASE WHEN g % 10 = 0 THEN 'expire' ELSE 'earn' END,
       CASE WHEN g % 10 = 0 THEN -5 ELSE 10 END, 100,
       now() - interval '730 days' + make_interval(secs => g * 730 * 86400.0 / $1),
       CASE WHEN g % 10 = 0 THEN NULL ELSE now() + interval '1 year' END,
       CASE WHEN g % 10 = 0 THEN NULL ELSE 'base' END, 'bench', 'e' || g,
       CASE WHEN g % 10 = 0 THEN NULL ELSE 'store-' || (g % 40) END,
       CASE WHEN g % 10 = 0 THEN jsonb_build_array(jsonb_build_array('x' || (g - 3), 5))
            ELSE '[]'::jsonb END
FROM generate_series(1, $1) AS g
"""


async def main(entries: int) -> None:
    async with fresh_databases(["bench_summary_store"]) as conns:
        conn = conns["bench_summary_store"]
        await conn.execute(GEN, entries)
        await conn.execute("ANALYZE ledger_entries")
        start, end = await conn.fetchrow(
            "SELECT now() - interval '60 days', now() - interval '30 days'"
        )
        ways = {
            "joined": (JOINED, False),
            "joined, jit off": (JOINED, True),
            "expiries only": (reports.PERIOD_TOTALS, False),
            "expiries only, jit off": (reports.PERIOD_TOTALS, True),
        }
        for store in ("store-7", None):
            times: dict[str, list[float]] = {name: [] for name in ways}
            answers = {}
            for _ in range(7):
                for name, (sql, jit_off) in ways.items():
                    async with conn.transaction(readonly=True):
                        if jit_off:
                            await conn.execute("SET LOCAL jit = off")
                        t = time.perf_counter()
                        rows = await conn.fetch(sql, start, end, store)
                        times[name].append(time.perf_counter() - t)
                    answers[name] = sorted((r["kind"], r["rule_id"], r["points"]) for r in rows)
            assert len({repr(a) for a in answers.values()}) == 1, answers
            print(f"{entries:,} entries; a month, store {store}: {answers['joined']}")
            for name, ts in times.items():
                print(
                    f"  {name:24} median {statistics.median(ts) * 1000:7.1f} ms"
                    f"  (min {min(ts) * 1000:.1f}, max {max(ts) * 1000:.1f})"
                )


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 900_000))
