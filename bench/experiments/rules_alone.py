"""The first hop of the latency measure with the rules service alone (no ledger, notifier).

Produces a fixed rate of the bench workload in 5 ms ticks, as the latency measure does,
and reports produce -> rules batch start and the rules batch itself, so the hop can be
compared with the same hop inside the full pipeline (where the other processes share the
cores). `--socket` connects the service to Postgres over its Unix socket instead of TCP.

    PYTHONPATH=. .venv/bin/python bench/experiments/rules_alone.py [events_per_s] [--socket]
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import uuid

import asyncpg

from bench.measures.latency import paced_produce
from bench.settings import RUN
from bench.stack import Services, create_topics, start_infra, stop_infra, wait_until
from bench.workload import generate
from deploy import local
from deploy.postgres import _pg_socket_dir
from services.common.config import Topics

WARMUP_MS = 2000


def p50_p99(xs: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(xs, n=100)
    return round(q[49], 1), round(q[98], 1)


async def main(eps: int, socket: bool) -> None:
    infra = await start_infra()
    try:
        events = generate(eps * 12, seed=42)
        dsn = await infra.fresh_db("rules_alone")
        if socket:
            port = dsn.rsplit(":", 1)[1].split("/")[0]
            sock = _pg_socket_dir((RUN / "pg").resolve())
            dsn = f"postgresql://loyalty:loyalty@/rules_alone?host={sock}&port={port}"
        topics = Topics(prefix=f"b{uuid.uuid4().hex[:8]}.")
        await create_topics(infra.bootstrap, topics)
        svc = Services(dsn, infra.bootstrap, topics, "alone", ledger_port=local.free_port())
        try:
            svc.start("services.rules")

            async def assigned() -> bool:
                conn = await asyncpg.connect(dsn)
                try:
                    return bool(await conn.fetchval("SELECT count(*) FROM consumer_offsets"))
                finally:
                    await conn.close()

            await wait_until(assigned, 120, "the rules consumer assigned")
            sent, offered, _ = await paced_produce(infra.bootstrap, topics.activity, events, eps)

            async def stored() -> bool:
                conn = await asyncpg.connect(dsn)
                try:
                    return bool(
                        await conn.fetchval("SELECT count(*) FROM rules_activity") >= len(sent)
                    )
                finally:
                    await conn.close()

            await wait_until(stored, 120, "every activity stored")
            conn = await asyncpg.connect(dsn)
            try:
                rows = await conn.fetch(
                    "SELECT event_id, received_at, pg_xact_commit_timestamp(xmin) AS commit"
                    " FROM rules_activity"
                )
            finally:
                await conn.close()
        finally:
            svc.stop()
        await infra.drop_db("rules_alone")
    finally:
        stop_infra(infra)
    first = min(sent.values())
    kept = [r for r in rows if sent[r["event_id"]] - first >= WARMUP_MS]
    to_rules = [r["received_at"].timestamp() * 1000 - sent[r["event_id"]] for r in kept]
    in_rules = [(r["commit"] - r["received_at"]).total_seconds() * 1000 for r in kept]
    print(
        f"rules alone at {offered:,.0f} events/s ({'Unix socket' if socket else 'TCP'}):"
        f" produce -> rules batch p50/p99 {p50_p99(to_rules)} ms,"
        f" rules batch {p50_p99(in_rules)} ms"
    )


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    asyncio.run(main(int(args[0]) if args else 1000, "--socket" in sys.argv))
