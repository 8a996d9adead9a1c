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
from aiokafka.errors import (
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    UnknownTopicOrPartitionError,
)
from prometheus_client import REGISTRY

from schemas.ledger import DeadLetter
from services.common.outbox import OutboxRelay, partition_for

PARTS = [0, 1]
ROOM = 2  # records per fake batch


def big(value: bytes) -> bool:
    return value.startswith(b"big")


class FakeBatch:
    def __init__(self) -> None:
        self.values: list[bytes] = []

    def append(self, *, key: bytes | None, value: bytes, timestamp: None) -> object | None:
        """As aiokafka's: an empty batch takes any record; a big one fills a batch."""
        if self.values and (len(self.values) == ROOM or big(value) or big(self.values[0])):
            return None
        self.values.append(value)
        return object()


class FakeProducer:
    """Hands out a delivery future per batch, settled by the test. The cluster lacks the
    topics in `missing`."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, list[bytes], asyncio.Future[None]]] = []
        self.missing: set[str] = set()
        self.looked_up: list[str] = []
        self.client = self  # its metadata, `client.cluster`
        self.cluster = self

    async def partitions_for(self, topic: str) -> set[int]:
        self.looked_up.append(topic)
        if topic in self.missing:
            raise UnknownTopicOrPartitionError()
        return set(PARTS)

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        return None if topic in self.missing else set(PARTS)

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
        self.dead_letters: list[tuple[Any, ...]] = []
        self.outbox: list[tuple[Any, ...]] = []  # rows written: (service, topic, key, payload)
        self.in_transaction = False

    async def fetch(self, sql: str, service: str, limit: int, held: Any = ()) -> list[Any]:
        return [r for r in self.rows if r["topic"] not in held]

    async def fetchval(self, sql: str, service: str) -> datetime | None:
        return min((r["created_at"] for r in self.rows), default=None)

    async def execute(self, sql: str, service: str, last: int, ids: list[int]) -> None:
        self.deleted.extend(ids)

    async def executemany(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        assert self.in_transaction
        self.dead_letters.extend(rows)

    async def copy_records_to_table(self, table: str, *, records: Any, columns: Any) -> None:
        assert self.in_transaction
        self.outbox.extend(records)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        self.in_transaction = True
        yield
        self.in_transaction = False


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
    relay = OutboxRelay(FakePool(conn), producer, "rules", dlq_topic="dlq")  # type: ignore[arg-type]
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
    relay = OutboxRelay(FakePool(conn), producer, "rules", dlq_topic="dlq")  # type: ignore[arg-type]
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
    relay = OutboxRelay(FakePool(conn), producer, "rules", dlq_topic="dlq")  # type: ignore[arg-type]
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
    relay = OutboxRelay(FakePool(conn), producer, "notifier", dlq_topic="dlq")  # type: ignore[arg-type]
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


def relay_letters() -> float:
    labels = {"consumer": "rules-relay", "reason": "relay_too_large"}
    return REGISTRY.get_sample_value("loyalty_dlq_messages_total", labels) or 0.0


async def test_a_record_too_large_for_the_broker_is_dead_lettered_and_the_chain_goes_on() -> None:
    """Before, the refusal failed the page every round: the row stayed in the outbox for
    good, and every later row of its partition (a member never paid) behind it."""
    producer = FakeProducer()
    rows = page([0, 0, 0, 1])
    rows[1]["payload"] = b"big" + b"x" * 100
    conn = FakeConn(rows)
    relay = OutboxRelay(FakePool(conn), producer, "rules", dlq_topic="dlq")  # type: ignore[arg-type]
    before = relay_letters()
    task = asyncio.create_task(relay.relay_once())
    await settled()
    assert producer.batches() == [(0, [b"1"]), (1, [b"4"])]
    producer.sent[0][2].set_result(None)
    producer.sent[1][2].set_result(None)
    await settled()
    assert producer.batches()[2] == (0, [rows[1]["payload"]])
    producer.sent[2][2].set_exception(MessageSizeTooLargeError())
    await settled()
    assert producer.batches()[3] == (0, [b"3"])  # the chain goes on past it
    producer.sent[3][2].set_result(None)
    assert await task == 4
    assert sorted(conn.deleted) == [1, 2, 3, 4]
    # Kept whole in `dead_letters`, at offset -1 (it never reached the topic)...
    [(dlq_id, consumer, topic, part, offset, reason, original)] = conn.dead_letters
    assert (consumer, topic, part, offset, original) == (
        "rules-relay",
        "t",
        0,
        -1,
        rows[1]["payload"],
    )
    assert reason.startswith("relay_too_large: the broker refused the record (103 bytes)")
    # ... and on its way to the DLQ topic, in the transaction that deleted it.
    [(service, dlq_topic, key, payload)] = conn.outbox
    assert (service, dlq_topic, key) == ("rules", "dlq", rows[1]["key"])
    letter = DeadLetter.model_validate_json(payload)
    assert (letter.dlq_id, letter.source_topic, letter.source_offset) == (dlq_id, "t", -1)
    assert letter.original == rows[1]["payload"].decode()
    assert relay_letters() == before + 1


async def test_a_batch_the_broker_refuses_as_too_large_is_tried_a_record_at_a_time() -> None:
    """A broker whose limit is below our batch size: only the record too big itself is set
    aside, the one beside it is sent."""
    producer = FakeProducer()
    conn = FakeConn(page([0, 0]))
    relay = OutboxRelay(FakePool(conn), producer, "rules", dlq_topic="dlq")  # type: ignore[arg-type]
    task = asyncio.create_task(relay.relay_once())
    await settled()
    producer.sent[0][2].set_exception(MessageSizeTooLargeError())
    await settled()
    assert producer.batches() == [(0, [b"1", b"2"]), (0, [b"1"])]
    producer.sent[1][2].set_result(None)
    await settled()
    assert producer.batches()[2] == (0, [b"2"])
    producer.sent[2][2].set_exception(MessageSizeTooLargeError())
    assert await task == 2
    assert sorted(conn.deleted) == [1, 2]
    assert [d[6] for d in conn.dead_letters] == [b"2"]


async def test_a_letter_the_broker_refuses_is_kept_in_the_table_and_not_sent_again() -> None:
    """A letter is cut below any broker's limit; one refused even so must not become a
    letter of itself, round after round."""
    producer = FakeProducer()
    rows = page([0])
    rows[0]["topic"] = "dlq"
    conn = FakeConn(rows)
    relay = OutboxRelay(FakePool(conn), producer, "rules", dlq_topic="dlq")  # type: ignore[arg-type]
    task = asyncio.create_task(relay.relay_once())
    await settled()
    producer.sent[0][2].set_exception(MessageSizeTooLargeError())
    assert await task == 1
    assert conn.deleted == [1]
    assert [d[2] for d in conn.dead_letters] == ["dlq"]
    assert conn.outbox == []


async def test_a_topic_the_cluster_lacks_holds_back_only_its_own_rows() -> None:
    """A topic deleted (auto-create off) keeps its rows while the other topics' go, and is
    left out of the pages until the producer's metadata has it: a page full of its rows
    would hold up every row behind them, and each lookup of it waits. Before, every topic
    of a page was looked up before any row was sent, and the page failed round after round."""
    producer = FakeProducer()
    producer.missing.add("dlq")
    rows = page([0, 0, 1], created=datetime.now(UTC) - timedelta(minutes=5))
    rows[0]["topic"] = "dlq"
    conn = FakeConn(rows)
    relay = OutboxRelay(FakePool(conn), producer, "rules", dlq_topic="dlq")  # type: ignore[arg-type]
    task = asyncio.create_task(relay.relay_once())
    await settled()
    assert producer.batches() == [(0, [b"2"]), (1, [b"3"])]
    for _, _, future in producer.sent:
        future.set_result(None)
    assert await task == 3
    assert sorted(conn.deleted) == [2, 3]

    conn.rows = rows[:1]
    assert await relay.relay_once() == 0  # held: not in the page, not looked up again
    assert producer.looked_up == ["dlq", "t"]
    labels = {"service": "rules"}
    age = REGISTRY.get_sample_value("loyalty_outbox_oldest_age_seconds", labels)
    assert 300 <= (age or 0) < 360  # its rows are still the backlog

    producer.missing.clear()  # created again, and the producer's metadata has it
    task = asyncio.create_task(relay.relay_once())
    await settled()
    assert producer.batches()[2:] == [(0, [b"1"])]
    producer.sent[2][2].set_result(None)
    assert await task == 1
    assert sorted(conn.deleted) == [1, 2, 3]
