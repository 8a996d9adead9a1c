"""Experiment: the outbox relay's broker hand-off, per-row `send` vs one batch per partition.

Starts a throwaway Tansu, then hands 5,000-row pages (grant-sized payloads, 20,000 member
keys) to the producer both ways and reports the relay process's CPU per 1,000 rows.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from deploy import local
from services.common.config import KafkaAccess
from services.common.outbox import OutboxRelay, Settled, make_producer

PAGES, ROWS = 20, 5_000
PAYLOAD = b'{"event_id":"%08d","type":"points_granted","data":{"points":120}}' + b" " * 300


async def main() -> None:
    tmp = Path(tempfile.mkdtemp())
    pid, bootstrap = await asyncio.to_thread(local.start_tansu, local.free_port(), tmp / "t.log")
    try:
        await local.create_topics_async(bootstrap, ["exp.grants"], partitions=6)
        producer = make_producer(KafkaAccess(bootstrap))
        await producer.start()
        relay: Any = OutboxRelay(None, producer, "exp", dlq_topic="exp.dlq")  # type: ignore[arg-type]
        rows = [
            {"id": i, "topic": "exp.grants", "key": f"m{i % 20_000:06d}", "payload": PAYLOAD}
            for i in range(ROWS)
        ]

        async def per_row() -> None:
            futures = [
                await producer.send(r["topic"], r["payload"], key=r["key"].encode()) for r in rows
            ]
            await asyncio.gather(*futures)

        async def batched() -> None:
            # As `relay_once` sends a page: one chain of batches per partition.
            await relay._send_topic("exp.grants", rows, Settled())

        for name, fn in (("per-row send", per_row), ("batch per partition", batched)) * 2:
            cpu, wall = time.process_time(), time.perf_counter()
            for _ in range(PAGES):
                await fn()
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            n = PAGES * ROWS
            print(
                f"{name:>20}: {1000 * cpu / n * 1000:6.1f} ms CPU per 1k rows,"
                f" {n / wall:,.0f} rows/s wall"
            )
        await producer.stop()
    finally:
        local.stop_pid(pid, 5)


if __name__ == "__main__":
    os.environ.setdefault("TANSU_LOG", "error")
    asyncio.run(main())
