"""1 + 2: throughput. e2e: the services on N pre-published events; naive: the same with
`bench.naive` (one handler and one transaction per message)."""

from __future__ import annotations

import asyncio
import os
import statistics
import uuid
from pathlib import Path
from typing import Any

import asyncpg

from bench.settings import DUMP_JOURNALS, E2E_EVENTS, NAIVE_EVENTS, PG_STATEMENTS, RUN, RUNS, say
from bench.stack import Infra, Services, cpu_snapshot, create_topics, produce, profile, wait_drained
from bench.workload import Event
from deploy import local
from services.common.config import Topics

TOP_STATEMENTS = """
SELECT round(total_exec_time)::bigint AS ms, calls, rows,
       round((total_exec_time / greatest(calls, 1))::numeric, 3) AS ms_per_call,
       regexp_replace(left(query, 160), '\\s+', ' ', 'g') AS query
FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT 30
"""


async def reset_statements(dsn: str) -> None:
    """BENCH_PG_STATEMENTS=1: count statements from here (the run's database, once migrated)."""
    if not PG_STATEMENTS:
        return
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        await conn.execute("SELECT pg_stat_statements_reset()")
    finally:
        await conn.close()


async def dump_statements(dsn: str, path: Path) -> None:
    """BENCH_PG_STATEMENTS=1: the run's 30 statements by total time, as a table."""
    if not PG_STATEMENTS:
        return
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(TOP_STATEMENTS)
        total = await conn.fetchval("SELECT sum(total_exec_time) FROM pg_stat_statements")
    finally:
        await conn.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"total statement time {total / 1000:.1f} s", "ms\tcalls\trows\tms/call\tquery"]
    lines += ["\t".join(str(v) for v in r.values()) for r in rows]
    await asyncio.to_thread(path.write_text, "\n".join(lines) + "\n")
    say(f"statement times: {path}")


async def dump_journal(dsn: str, path: Path) -> None:
    """BENCH_DUMP_JOURNALS=1: the journal in id order, to diff runs of one invocation."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.copy_from_query(
            "SELECT entry_id, member_id, kind, points, balance_after, occurred_at, rule_id,"
            " source_event_id, order_id, allocations FROM ledger_entries ORDER BY entry_id",
            output=str(path),
        )
    finally:
        await conn.close()
    say(f"journal dumped: {path}")


async def throughput_run(
    infra: Infra, events: list[Event], naive: bool, tag: str
) -> dict[str, Any]:
    db = f"bench_{tag}"
    dsn = await infra.fresh_db(db)
    topics = Topics(prefix=f"b{uuid.uuid4().hex[:8]}.")
    await create_topics(infra.bootstrap, topics)
    produce_eps = await produce(infra.bootstrap, topics.activity, events)
    await reset_statements(dsn)
    svc = Services(dsn, infra.bootstrap, topics, tag, ledger_port=local.free_port())
    try:
        if naive:
            svc.start("bench.naive", "naive")
        else:
            svc.start("services.rules")
            svc.start("services.ledger")
        svc.start("services.notifier")
        profile(svc, tag)
        timeout = 60 + len(events) / (50 if naive else 500)
        cpu0 = cpu_snapshot(infra, svc)
        result = await wait_drained(svc, len(events), timeout, svc.assert_running)
        cpu1 = cpu_snapshot(infra, svc)
    finally:
        svc.stop()
    if DUMP_JOURNALS:
        await dump_journal(dsn, RUN / "journals" / f"{tag}.tsv")
    await dump_statements(dsn, RUN / "statements" / f"{tag}.tsv")
    await infra.drop_db(db)
    result["eps"] = len(events) / result["seconds"]
    # CPU time per 1,000 events by component: independent of what else the machine ran.
    result["cpu_ms_per_1k_events"] = {
        k: round(1000 * (cpu1[k] - cpu0.get(k, 0.0)) * 1000 / len(events), 1) for k in cpu1
    }
    result["load_average"] = os.getloadavg()[0]
    result["produce_eps"] = round(produce_eps)
    say(
        f"{'naive' if naive else 'e2e'} {tag}: {len(events)} events, {result['grants']} grants,"
        f" {result['entries']} entries in {result['seconds']:.2f}s = {result['eps']:,.0f} events/s;"
        f" CPU ms per 1k events {result['cpu_ms_per_1k_events']}"
    )
    return result


async def e2e_runs(infra: Infra, events: list[Event]) -> dict[str, Any]:
    runs = [await throughput_run(infra, events[:E2E_EVENTS], False, f"e2e{i}") for i in range(RUNS)]
    return {
        "events": E2E_EVENTS,
        "runs": runs,
        "eps": statistics.median(r["eps"] for r in runs),
    }


async def naive_runs(infra: Infra, events: list[Event]) -> dict[str, Any]:
    runs = [
        await throughput_run(infra, events[:NAIVE_EVENTS], True, f"naive{i}") for i in range(RUNS)
    ]
    return {
        "events": NAIVE_EVENTS,
        "runs": runs,
        "eps": statistics.median(r["eps"] for r in runs),
    }
