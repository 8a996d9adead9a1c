"""One broker hop alone: paced produce -> consumer, as the latency measure's first hop.

The pipeline's latency has two broker hops (activity -> rules, grants -> ledger). This
measures one of them with nothing else running: the bench's paced producer (5 ms ticks,
`linger_ms=1`, acks=1, each record stamped with its send time) and a consumer polling the
way the services' consumers do (`fetch_max_wait_ms=5`, batches of up to 5,000). The
figure is the floor a hop adds before any service work.

    PYTHONPATH=. .venv/bin/python bench/experiments/broker_hop.py [events_per_s] [seconds]
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from deploy import local

TOPIC = "hop.probe"
PARTITIONS = 6


async def produce(bootstrap: str, eps: int, seconds: float) -> int:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=1, acks=1)
    await producer.start()
    total = int(eps * seconds)
    futures = []
    started = time.perf_counter()
    i = 0
    try:
        while i < total:
            due = min(int((time.perf_counter() - started) * eps) + 1, total)
            while i < due:
                ts = int(time.time() * 1000)
                key = f"m{i % 997:06d}".encode()
                futures.append(await producer.send(TOPIC, b"x" * 300, key=key, timestamp_ms=ts))
                i += 1
            await asyncio.sleep(0.005)
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return total


async def consume(bootstrap: str, expected: int, out: list[float], ready: asyncio.Event) -> None:
    consumer = AIOKafkaConsumer(
        TOPIC,
        bootstrap_servers=bootstrap,
        group_id="hop-probe",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        fetch_max_wait_ms=5,
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    await consumer.start()
    try:
        while not consumer.assignment():
            await consumer.getmany(timeout_ms=100)
        ready.set()
        while len(out) < expected:
            batches = await consumer.getmany(timeout_ms=5, max_records=5000)
            now = time.time() * 1000
            for records in batches.values():
                out.extend(now - r.timestamp for r in records)
    finally:
        await consumer.stop()


async def main(eps: int, seconds: float) -> None:
    port = local.free_port()
    with tempfile.TemporaryDirectory() as tmp:
        pid, bootstrap = local.start_tansu(port, Path(tmp) / "tansu.log")
        try:
            await local.create_topics_async(bootstrap, [TOPIC], partitions=PARTITIONS)
            lat: list[float] = []
            expected = int(eps * seconds)
            ready = asyncio.Event()
            reader = asyncio.create_task(consume(bootstrap, expected, lat, ready))
            await asyncio.wait_for(ready.wait(), 60)  # the group join
            await produce(bootstrap, eps, seconds)
            await asyncio.wait_for(reader, 60)
        finally:
            local.stop_pid(pid)
    lat = sorted(lat[int(len(lat) * 0.1) :])  # the first 10 % as warm-up
    q = statistics.quantiles(lat, n=100)
    print(
        f"broker hop (Tansu) at {eps}/s: {len(lat)} records, p50 {q[49]:.1f} ms,"
        f" p99 {q[98]:.1f} ms, max {lat[-1]:.1f} ms"
    )


if __name__ == "__main__":
    asyncio.run(
        main(
            int(sys.argv[1]) if len(sys.argv) > 1 else 1000,
            float(sys.argv[2]) if len(sys.argv) > 2 else 10,
        )
    )
