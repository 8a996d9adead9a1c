"""A member's lots through the full index `(member_id, expires_at)` (before migration 0026)
or through the same index `WHERE remaining > 0` (after it).

Lots are kept once spent or lapsed (remaining = 0), and every query that finds a member's
lots asks for `remaining > 0`: the full index walks every lot the member ever had, and
each lot is a heap row on its own page. The table: four years of lots in earning order
(default 2,000,000) spread over 100,000 members (~20 lots each, the last year's live but
a third spent), and one member who signed in daily (1,460 lots, the last year's ~365
live). Both layouts hold the same rows, each in its own database, vacuumed and analyzed.

Reported, warm cache, median of 7 alternating: `EXPLAIN (ANALYZE, BUFFERS)` buffers and
time of the ledger's member-keyed reads (SELECT_LOTS for one member and for a grants batch
of 500, MEMBER_WITH_LOTS, AVAILABLE_NOW, verify's MEMBER_LOTS), the owner's reports that
scan the lots (no member key: only a plan change would show), the index sizes, the
backend's CPU to spend 20,000 live lots to zero (rolled back, ×3 alternating), and how
long each way of building the partial index takes on this table.

    PYTHONPATH=. .venv/bin/python bench/experiments/lots_member_index.py [lots]
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from bench.experiments._pg import backend_cpu_seconds, fresh_databases
from services.ledger import reports
from services.ledger.journal import SELECT_LOTS, UPDATE_LOTS
from services.ledger.reads import MEMBER_WITH_LOTS
from services.ledger.rebuild import MEMBER_LOTS
from services.ledger.redemption import DEFAULT_POLICY
from services.ledger.sweeper import AVAILABLE_NOW

MEMBERS = 100_000
DAILY = "m-daily"
TYPICAL = "m0000042"
DAYS = 4 * 365
RUNS = 7
FULL = "CREATE INDEX ledger_lots_member ON ledger_lots (member_id, expires_at)"
PARTIAL = "ON ledger_lots (member_id, expires_at) WHERE remaining > 0"

# Earning order is insertion order, as the ledger writes them: a member's lots sit on
# pages far apart. Every `$3`-th lot is the daily member's.
GEN_LOTS = """
INSERT INTO ledger_lots (lot_id, member_id, points, remaining, earned_at, available_from,
                         expires_at, rule_id, sweep_at)
SELECT 'l' || g, member, 10,
       CASE WHEN expires > now() AND (member = 'm-daily' OR g % 3 <> 0) THEN 10 ELSE 0 END,
       earned, earned, expires, 'base', expires - interval '30 days'
FROM (
    SELECT g, e AS earned, e + interval '365 days' AS expires,
           CASE WHEN g % $3 = 0 THEN 'm-daily'
                ELSE 'm' || lpad(((g::bigint * 7919) % $2)::text, 7, '0') END AS member
    FROM generate_series(1, $1) AS g,
         LATERAL (SELECT now() - interval '1460 days'
                         + make_interval(secs => g * (1460 * 86400.0 / $1))) AS t(e)
) AS lots
"""
GEN_MEMBERS = """
INSERT INTO ledger_members (member_id, earned)
SELECT 'm' || lpad(g::text, 7, '0'), 100 FROM generate_series(0, $1 - 1) AS g
UNION ALL SELECT 'm-daily', 14600
"""


def explained(plan: Any) -> tuple[int, float, str]:
    """Buffers touched, execution ms and the indexes the plan reads."""
    top = json.loads(plan)[0]
    indexes: list[str] = []

    def walk(node: dict[str, Any]) -> None:
        if "Index Name" in node and node["Index Name"] not in indexes:
            indexes.append(node["Index Name"])
        for child in node.get("Plans", []):
            walk(child)

    walk(top["Plan"])
    buffers = top["Plan"]["Shared Hit Blocks"] + top["Plan"]["Shared Read Blocks"]
    return buffers, top["Execution Time"], ",".join(indexes) or "seq scan"


async def spend(conn: asyncpg.Connection, lots: list[str]) -> float:
    """Backend CPU µs per lot to spend `lots` to zero, rolled back."""
    pid = await conn.fetchval("SELECT pg_backend_pid()")
    before = backend_cpu_seconds(pid)
    tr = conn.transaction()
    await tr.start()
    await conn.execute(UPDATE_LOTS, lots, [0] * len(lots))
    await tr.rollback()
    spent = backend_cpu_seconds(pid) - before
    await conn.execute("VACUUM ledger_lots")
    return spent / len(lots) * 1e6


async def build_seconds(conn: asyncpg.Connection) -> dict[str, float]:
    out = {}
    for how, sql in (
        ("full, plain (0003)", FULL.replace("ledger_lots_member", "x_full")),
        ("partial, plain", f"CREATE INDEX x_part {PARTIAL}"),
        ("partial, CONCURRENTLY (0026)", f"CREATE INDEX CONCURRENTLY x_conc {PARTIAL}"),
    ):
        t = time.perf_counter()
        await conn.execute(sql)
        out[how] = time.perf_counter() - t
    await conn.execute("DROP INDEX x_full, x_part, x_conc")
    return out


async def main(lots: int) -> None:
    async with fresh_databases(["lots_full", "lots_partial"]) as dbs:
        t = time.perf_counter()
        for name, conn in dbs.items():
            if name == "lots_full":  # the layout before migration 0026
                await conn.execute("DROP INDEX ledger_lots_member_live")
                await conn.execute(FULL)
            await conn.execute(GEN_LOTS, lots, MEMBERS, lots // DAYS)
            await conn.execute(GEN_MEMBERS, MEMBERS)
            await conn.execute("VACUUM ANALYZE ledger_lots, ledger_members")
        conn = dbs["lots_partial"]
        print(f"{lots:,} lots generated in {time.perf_counter() - t:.0f} s")
        for m in (DAILY, TYPICAL):
            row = await conn.fetchrow(
                "SELECT count(*) AS n, count(*) FILTER (WHERE remaining > 0) AS live"
                " FROM ledger_lots WHERE member_id = $1",
                m,
            )
            print(f"  {m}: {row['n']} lots, {row['live']} live")
        live = await conn.fetchval(
            "SELECT count(*) FILTER (WHERE remaining > 0)::float / count(*) FROM ledger_lots"
        )
        print(f"  live lots: {live:.0%} of the table")
        now = datetime.now(UTC)
        batch = [DAILY, *(f"m{(i * 197) % MEMBERS:07d}" for i in range(1, 500))]
        queries: dict[str, tuple[str, tuple[Any, ...]]] = {
            f"SELECT_LOTS {DAILY}": (SELECT_LOTS, ([DAILY],)),
            f"SELECT_LOTS {TYPICAL}": (SELECT_LOTS, ([TYPICAL],)),
            f"SELECT_LOTS 500 ({DAILY} + 499)": (SELECT_LOTS, (batch,)),
            f"MEMBER_WITH_LOTS {DAILY}": (MEMBER_WITH_LOTS, (DAILY,)),
            f"MEMBER_WITH_LOTS {TYPICAL}": (MEMBER_WITH_LOTS, (TYPICAL,)),
            f"AVAILABLE_NOW {DAILY}": (AVAILABLE_NOW, ([DAILY], now)),
            f"MEMBER_LOTS (verify) {DAILY}": (MEMBER_LOTS, ([DAILY],)),
            "DEBT (summary)": (reports.DEBT, (now,)),
            "OUTSTANDING_BY_TIER (summary)": (
                reports.OUTSTANDING_BY_TIER,
                (
                    now, None, now, now + timedelta(days=30), list(reports.TIERS),
                    [DEFAULT_POLICY.rate(t) for t in reports.TIERS],
                ),
            ),
        }  # fmt: skip
        for label, (sql, args) in queries.items():
            seen: dict[str, list[tuple[int, float, str]]] = {name: [] for name in dbs}
            rows: dict[str, int] = {}
            for _ in range(RUNS):
                for name, c in dbs.items():
                    plan = await c.fetchval("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + sql, *args)
                    seen[name].append(explained(plan))
                    rows[name] = len(await c.fetch(sql, *args))
            assert rows["lots_full"] == rows["lots_partial"], (label, rows)
            print(f"{label} ({rows['lots_full']} rows)")
            for name, runs in seen.items():
                print(
                    f"  {name:13} {runs[-1][0]:7,} buffers"
                    f"  {statistics.median(r[1] for r in runs):8.2f} ms"
                    f" (min {min(r[1] for r in runs):.2f})  via {runs[-1][2]}"
                )
        for name, c in dbs.items():
            sizes = await c.fetch(
                "SELECT indexrelid::regclass::text AS name, pg_relation_size(indexrelid) AS size"
                " FROM pg_index WHERE indrelid = 'ledger_lots'::regclass ORDER BY 1"
            )
            print(
                f"{name}: " + ", ".join(f"{r['name']} {r['size'] / 2**20:.1f} MiB" for r in sizes)
            )
        some = [
            r["lot_id"]
            for r in await conn.fetch(
                "SELECT lot_id FROM ledger_lots WHERE remaining > 0"
                " ORDER BY md5(lot_id) LIMIT 20000"
            )
        ]
        costs: dict[str, list[float]] = {name: [] for name in dbs}
        for _ in range(3):
            for name, c in dbs.items():
                costs[name].append(await spend(c, some))
        for name, runs in costs.items():
            print(
                f"spend 20,000 live lots to zero, {name}: backend CPU"
                f" {[round(r, 1) for r in sorted(runs)]} µs a lot"
            )
        for how, seconds in (await build_seconds(conn)).items():
            print(f"build {how}: {seconds:.1f} s")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 2_000_000))
