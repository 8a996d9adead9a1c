"""An upstream that writes with transactions (Kafka Connect, a Java till) leaves offsets
the consumer is never handed: each transaction's commit or abort marker, and the records
of an aborted one (read_committed). The lag was the log's end minus the offset after the
last record applied, so it stayed at 1 after every committed transaction, and an aborted
one larger than a batch at a partition's end kept the rules' tier sweep from ever running
(it waits to be within a batch of the end). The consumer now counts a partition read up
to its fetch position where no batch of it is in flight. Apache Kafka only: Tansu has no
transactions."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.structs import ConsumerRecord

from deploy import local
from services.common.config import KafkaAccess, Settings
from services.common.consumer import BatchConsumer, BatchWork
from services.common.log_end import log_ends_of
from services.common.runtime import create_broker
from services.rules.app import caught_up
from tests.integration.direct import migrated_pool
from tests.integration.harness import wait_until

pytestmark = pytest.mark.integration

MAX_BATCH = 50


async def _lag_becomes(consumer: BatchConsumer, expected: dict[tuple[str, int], int]) -> None:
    deadline = time.monotonic() + 15
    while (shown := consumer.lag()) != expected and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert shown == expected


async def test_the_lag_reaches_zero_past_transaction_markers_and_aborted_records(
    broker: str, broker_name: str, fresh_database: str
) -> None:
    if broker_name != "kafka":
        pytest.skip("transactions: Apache Kafka's")
    topic = f"t{uuid.uuid4().hex[:10]}.txn"
    await local.create_topics_async(broker, [topic], partitions=1)
    tp = TopicPartition(topic, 0)
    kafka = create_broker(Settings(database_url=fresh_database, bootstrap_servers=broker), "txn")
    consumer = BatchConsumer(name=f"txn-{uuid.uuid4().hex[:8]}", service="txn", topic=topic,
                             dlq_topic="loyalty.dlq.v1")  # fmt: skip
    consumer.attach(kafka, kafka=KafkaAccess(broker), max_batch=MAX_BATCH, batch_wait_ms=5,
                    fetch_wait_ms=5, session_timeout_ms=6000)  # fmt: skip
    consumer.log_ends.interval_s = 0.2
    applied: list[bytes] = []

    async def handler(
        conn: asyncpg.Connection, records: Sequence[ConsumerRecord], work: BatchWork
    ) -> None:
        applied.extend(r.value for r in records)

    producer = AIOKafkaProducer(bootstrap_servers=broker, transactional_id=f"till-{topic}")
    async with migrated_pool(fresh_database) as pool:
        consumer.bind(pool, handler)
        await kafka.start()
        await producer.start()
        try:
            await wait_until(lambda: asyncio.sleep(0, bool(consumer.assigned)), what="assigned")
            async with producer.transaction():  # the record at 0, its commit marker at 1
                await producer.send_and_wait(topic, b"paid", key=b"m-1", partition=0)
            await wait_until(lambda: asyncio.sleep(0, applied == [b"paid"]), what="applied")
            await _lag_becomes(consumer, {(topic, 0): 0})  # was 1: the marker

            await producer.begin_transaction()  # 2..2+3*MAX_BATCH-1, then the abort marker
            sent = [await producer.send(topic, b"aborted", key=b"m-1", partition=0)
                    for _ in range(3 * MAX_BATCH)]  # fmt: skip
            await asyncio.gather(*sent)  # in the log before the abort
            await producer.abort_transaction()
            assert (await log_ends_of(KafkaAccess(broker), [tp]))[tp] == 3 + 3 * MAX_BATCH
            await _lag_becomes(consumer, {(topic, 0): 0})  # was 3 * MAX_BATCH + 1
            assert caught_up(consumer, MAX_BATCH)  # the tier sweep runs
            assert applied == [b"paid"]
            # Postgres keeps the offset after the record applied: where a restart seeks.
            stored = await pool.fetchval("SELECT next_offset FROM consumer_offsets")
            assert stored == 1
        finally:
            await producer.stop()
            await consumer.stop()
            await kafka.stop()
