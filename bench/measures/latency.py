"""3: latency at a fixed offered load (how it is measured: bench/run.py's docstring)."""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from typing import Any

import asyncpg
import httpx
from aiokafka import AIOKafkaProducer

from bench.settings import (
    LATENCY_EPS,
    LATENCY_LOW_EPS,
    LATENCY_SECONDS,
    LATENCY_WARMUP_S,
    READER_KEY,
    RUNS,
    say,
)
from bench.stack import Infra, Services, create_topics, send_batches, wait_drained, wait_until
from bench.workload import Event, generate
from deploy import local
from services.common.config import Topics


async def paced_produce(
    bootstrap: str, topic: str, events: list[Event], eps: int
) -> tuple[dict[str, int], float, float]:
    """Sends `eps` events a second in 5 ms ticks, stamping each with its tick's send time;
    returns the stamps, the rate reached and this process's CPU seconds while sending."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks=1)
    await producer.start()
    sent: dict[str, int] = {}
    futures = []
    tick = 0.005 if eps * 0.005 >= 1 else 1 / eps
    cpu = time.process_time()
    started = time.perf_counter()
    i = 0
    try:
        parts = sorted(await producer.partitions_for(topic))
        while i < len(events):
            due = min(int((time.perf_counter() - started) * eps) + 1, len(events))
            if i < due:
                ts = int(time.time() * 1000)
                for e in events[i:due]:
                    sent[e.event_id] = ts
                futures += await send_batches(producer, topic, parts, events[i:due], ts)
                i = due
            await asyncio.sleep(tick)
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return sent, len(events) / (time.perf_counter() - started), time.process_time() - cpu


async def latency_run(
    infra: Infra, events: list[Event], tag: str, eps: int = LATENCY_EPS
) -> dict[str, Any]:
    db = f"bench_{tag}"
    dsn = await infra.fresh_db(db)
    topics = Topics(prefix=f"b{uuid.uuid4().hex[:8]}.")
    await create_topics(infra.bootstrap, topics)
    svc = Services(dsn, infra.bootstrap, topics, tag, ledger_port=local.free_port())
    try:
        for name in ("rules", "ledger", "notifier"):
            svc.start(f"services.{name}")
        await wait_ready(svc)
        sent, offered, producer_cpu = await paced_produce(
            infra.bootstrap, topics.activity, events, eps
        )
        await wait_drained(svc, len(events), 600, svc.assert_running)
        api_probe = await probe_api(svc, events[-1])
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch(
                "SELECT source_event_id, min(pg_xact_commit_timestamp(xmin)) AS visible"
                " FROM ledger_entries WHERE source_event_id IS NOT NULL GROUP BY 1"
            )
            # Where the time goes: produce -> rules batch start -> rules commit -> visible.
            hops = await conn.fetch(
                "SELECT event_id, received_at, pg_xact_commit_timestamp(xmin) AS rules_commit"
                " FROM rules_activity"
            )
        finally:
            await conn.close()
    finally:
        svc.stop()
    await infra.drop_db(db)
    first = min(sent.values())
    lat = sorted(
        r["visible"].timestamp() * 1000 - sent[r["source_event_id"]]
        for r in rows
        if r["source_event_id"] in sent
        and sent[r["source_event_id"]] - first >= LATENCY_WARMUP_S * 1000
    )
    visible = {r["source_event_id"]: r["visible"].timestamp() * 1000 for r in rows}
    to_rules, in_rules, to_ledger = [], [], []
    for h in hops:
        sent_ms = sent.get(h["event_id"])
        if sent_ms is None or h["event_id"] not in visible:
            continue
        if sent_ms - first < LATENCY_WARMUP_S * 1000:
            continue
        start, commit = h["received_at"].timestamp() * 1000, h["rules_commit"].timestamp() * 1000
        to_rules.append(start - sent_ms)
        in_rules.append(commit - start)
        to_ledger.append(visible[h["event_id"]] - commit)
    out = {
        "breakdown_p50_p99_ms": {
            "produce_to_rules_batch": [_pct(sorted(to_rules), 50), _pct(sorted(to_rules), 99)],
            "rules_batch": [_pct(sorted(in_rules), 50), _pct(sorted(in_rules), 99)],
            "rules_commit_to_visible": [_pct(sorted(to_ledger), 50), _pct(sorted(to_ledger), 99)],
        },
        "offered_eps": round(offered),
        # The bench's own producer shares the two cores with what it measures.
        "producer_cpu_ms_per_1k": round(producer_cpu / len(events) * 1e6, 1),
        "samples": len(lat),
        "p50_ms": _pct(lat, 50),
        "p99_ms": _pct(lat, 99),
        "max_ms": round(lat[-1], 1) if lat else None,
        "api_probe": api_probe,
        "latencies_ms": lat,
    }
    say(
        f"latency {tag}: offered {offered:,.0f} events/s (producer"
        f" {out['producer_cpu_ms_per_1k']} ms CPU per 1k), {len(lat)} events with entries:"
        f" p50 {out['p50_ms']} ms, p99 {out['p99_ms']} ms, max {out['max_ms']} ms;"
        f" hops p50/p99 {out['breakdown_p50_p99_ms']}"
    )
    return out


def _pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    k = min(len(xs) - 1, max(0, round(p / 100 * len(xs)) - 1))
    return round(xs[k], 1)


async def wait_ready(svc: Services) -> None:
    async def ready() -> bool:
        svc.assert_running()
        try:
            async with httpx.AsyncClient(timeout=2) as client:
                r = await client.get(f"http://127.0.0.1:{svc.ledger_port}/readyz")
                if r.status_code != 200:
                    return False
        except httpx.HTTPError:
            return False
        conn = await asyncpg.connect(svc.dsn)
        try:
            n = await conn.fetchval("SELECT count(DISTINCT consumer) FROM consumer_offsets")
        finally:
            await conn.close()
        return bool(n >= 3)

    await wait_until(ready, 120, "services ready", every=0.25)


async def probe_api(svc: Services, event: Event) -> dict[str, Any]:
    """Cross-check: the API serves the member of the last event once its batch committed."""
    async with httpx.AsyncClient(timeout=5) as client:
        r = await client.get(
            f"http://127.0.0.1:{svc.ledger_port}/v1/members/{event.key.decode()}",
            headers={"Authorization": f"Bearer {READER_KEY}"},
        )
    return {"status": r.status_code, "member": event.key.decode()}


async def latency_runs(infra: Infra) -> dict[str, Any]:
    """RUNS runs at LATENCY_EPS (the median run's latencies kept for the chart), then one at
    LATENCY_LOW_EPS."""
    lat_events = generate(LATENCY_EPS * LATENCY_SECONDS, seed=7)
    runs = [await latency_run(infra, lat_events, f"lat{i}") for i in range(RUNS)]
    med = sorted(runs, key=lambda r: r["p99_ms"] or 0)[len(runs) // 2]
    out: dict[str, Any] = {
        "offered_eps": LATENCY_EPS,
        "seconds": LATENCY_SECONDS,
        "warmup_excluded_s": LATENCY_WARMUP_S,
        "method": "broker CreateTime (the send tick's time) -> commit timestamp of the ledger"
        " transaction that journaled the event's first entry and updated the read models",
        "runs": [{k: v for k, v in r.items() if k != "latencies_ms"} for r in runs],
        "p50_ms": statistics.median(r["p50_ms"] or 0 for r in runs),
        "p99_ms": statistics.median(r["p99_ms"] or 0 for r in runs),
        "max_ms": statistics.median(r["max_ms"] or 0 for r in runs),
        "best_latencies_ms": med["latencies_ms"][:: max(1, len(med["latencies_ms"]) // 2000)],
    }
    low = await latency_run(
        infra, lat_events[: LATENCY_LOW_EPS * LATENCY_SECONDS], "latlow", LATENCY_LOW_EPS
    )
    out["at_sustainable_load"] = {
        "offered_eps": LATENCY_LOW_EPS,
        **{k: v for k, v in low.items() if k != "latencies_ms"},
    }
    return out
