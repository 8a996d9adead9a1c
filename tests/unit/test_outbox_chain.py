"""The relay sends a partition's record batches one after another, each once the one
before is acknowledged: with a producer that is not idempotent, a later batch in flight
beside a failed one could land ahead of the failed one's re-sent copies. Partitions go
side by side; a page is re-sent only once every batch of it has settled, and only from
each partition's first row the broker did not acknowledge."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiokafka.errors import KafkaTimeoutError
from prometheus_client import REGISTRY

from services.common.outbox import OutboxRelay, partition_for

PARTS = [0, 1]
ROOM = 2  # records per fake batch


class FakeBatch:
    def __init__(self) -> None:
        self.values: list[bytes] = []

    def append(self, *, key: bytes | None, value: bytes, timestamp: None) -> object | None:
        if len(self.values) == ROOM:
            return None
        self.values.append(value)
        return object()


class FakeProducer:
    """Hands out a delivery future per batch, settled by the test."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, list[bytes], asyncio.Future[None]]] = []

    async def partitions_for(self, topic: str) -> set[int]:
        return set(PARTS)

    def create_batch(self) -> FakeBatch:
        return FakeBatch()

    async def send_batch(self, batch: FakeBatch, topic: str, *, partition: int) -> Any:
        future = asyncio.get_running_loop().create_future()
        self.sent.append((partition, batch.values, future))
        return future

    def batches(self) -> list[tuple[int, list[bytes]]]:
        return [(part, values) for part, values, _ in self.sent]


class FakeConn:
    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows
        self.deleted: list[int] = []

    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        return self.rows

    async def execute(self, sql: str, service: str, last: int, ids: list[int]) -> None:
        self.deleted.extend(ids)


class FakePool:
    def __init__(self, conn: FakeConn) -> None:
        self.conn = conn

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[FakeConn]:
        yield self.conn


def key_on(part: int) -> str:
    return next(
        k for k in (f"m-{i}" for i in range(100)) if partition_for(k.encode(), PARTS) == part
    )


def page(parts: list[int], created: datetime | None = None) -> list[dict[str, Any]]:
    """One row per entry of `parts`, on that partition, its payload its id."""
    created = created or datetime.now(UTC)
    return [
        {"id": i, "topic": "t", "key": key_on(p), "payload": b"%d" % i, "created_at": created}
        for i, p in enumerate(parts, start=1)
    ]


async def settled() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def test_a_partitions_next_batch_waits_for_the_previous_to_be_acknowledged() -> None:
    producer = FakeProducer()
    conn = FakeConn(page([0, 0, 1, 0, 0]))
    relay = OutboxRelay(FakePool(conn), producer, "rules")  # type: ignore[arg-type]
    task = asyncio.create_task(relay.relay_once())
    await settled()
    # Both partitions' first batches at once; partition 0's second not yet.
    assert producer.batches() == [(0, [b"1", b"2"]), (1, [b"3"])]
    producer.sent[1][2].set_result(None)
    await settled()
    assert len(producer.sent) == 2
    producer.sent[0][2].set_result(None)
    await settled()
    assert producer.batches()[2] == (0, [b"4", b"5"])
    assert not task.done()
    producer.sent[2][2].set_result(None)
    assert await task == 5
    assert sorted(conn.deleted) == [1, 2, 3, 4, 5]


async def test_a_failed_batch_ends_its_chain_and_the_page_waits_for_every_batch() -> None:
    producer = FakeProducer()
    conn = FakeConn(page([0, 0, 1, 0]))
    relay = OutboxRelay(FakePool(conn), producer, "rules")  # type: ignore[arg-type]
    task = asyncio.create_task(relay.relay_once())
    await settled()
    producer.sent[0][2].set_exception(KafkaTimeoutError())  # expired in a broker stall
    await settled()
    # Partition 0's next batch is never sent, and the page is not given up (to be sent
    # again) while partition 1's batch is still in flight.
    assert producer.batches() == [(0, [b"1", b"2"]), (1, [b"3"])]
    assert not task.done()
    producer.sent[1][2].set_result(None)
    with pytest.raises(KafkaTimeoutError):
        await task
    assert producer.batches() == [(0, [b"1", b"2"]), (1, [b"3"])]
    assert conn.deleted == [3]


async def test_what_the_broker_acknowledged_leaves_the_outbox_though_a_partition_failed() -> None:
    """Partition 1's row and partition 0's first batch are on the topic: deleted, so only
    partition 0's rows from its failed batch on are sent again. Before, nothing of the
    page was deleted, and a partition that kept failing had the whole page re-sent each
    round (~50 copies a minute of every other partition's rows)."""
    producer = FakeProducer()
    conn = FakeConn(page([0, 0, 1, 0, 0]))
    relay = OutboxRelay(FakePool(conn), producer, "rules")  # type: ignore[arg-type]
    task = asyncio.create_task(relay.relay_once())
    await settled()
    producer.sent[0][2].set_result(None)
    producer.sent[1][2].set_result(None)
    await settled()
    assert producer.batches()[2] == (0, [b"4", b"5"])
    producer.sent[2][2].set_exception(KafkaTimeoutError())
    with pytest.raises(KafkaTimeoutError):
        await task
    assert sorted(conn.deleted) == [1, 2, 3]


async def test_the_backlog_gauge_is_the_age_of_the_oldest_row_not_yet_relayed() -> None:
    producer = FakeProducer()
    conn = FakeConn(page([0], created=datetime.now(UTC) - timedelta(minutes=5)))
    relay = OutboxRelay(FakePool(conn), producer, "notifier")  # type: ignore[arg-type]
    task = asyncio.create_task(relay.relay_once())
    await settled()

    def age() -> float | None:
        labels = {"service": "notifier"}
        return REGISTRY.get_sample_value("loyalty_outbox_oldest_age_seconds", labels)

    assert 300 <= (age() or 0) < 360
    producer.sent[0][2].set_result(None)
    await task
    conn.rows = []
    assert await relay.relay_once() == 0
    assert age() == 0
