"""`loyalty_consumer_lag` keeps counting while a batch is held up (the database down, a
lock). It was the high watermark of the consumer's own fetches minus its next offset, and
aiokafka fetches no more of a partition while records it fetched wait to be handed over:
the end stood still exactly when the lag grew (the gauge showed 100 with 400 waiting).
The consumer now asks where its logs end every few seconds, apart from its fetches
(`log_end.LogEnds`), on Tansu too, whose ListOffsets answers short of a last batch of
many records. A real broker, Postgres and the consumer as a service runs it."""

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
from tests.integration.direct import migrated_pool
from tests.integration.harness import wait_until

pytestmark = pytest.mark.integration


async def send_batch(bootstrap: str, topic: str, count: int) -> None:
    """`count` records in one record batch (Tansu's ListOffsets answers after its first)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        batch = producer.create_batch()
        for i in range(count):
            assert batch.append(key=b"m-1", value=b"%d" % i, timestamp=None)
        await (await producer.send_batch(batch, topic, partition=0))
    finally:
        await producer.stop()


async def test_the_lag_grows_while_a_batch_is_held_up(broker: str, fresh_database: str) -> None:
    topic = f"t{uuid.uuid4().hex[:10]}.lag"
    await local.create_topics_async(broker, [topic], partitions=1)
    tp = TopicPartition(topic, 0)
    kafka = create_broker(Settings(database_url=fresh_database, bootstrap_servers=broker), "lag")
    consumer = BatchConsumer(name=f"lag-{uuid.uuid4().hex[:8]}", service="lag", topic=topic,
                             dlq_topic="loyalty.dlq.v1")  # fmt: skip
    consumer.attach(kafka, kafka=KafkaAccess(broker), max_batch=50, batch_wait_ms=5,
                    fetch_wait_ms=5, session_timeout_ms=6000)  # fmt: skip
    consumer.log_ends.interval_s = 0.2
    held, release = asyncio.Event(), asyncio.Event()

    async def hold(
        conn: asyncpg.Connection, records: Sequence[ConsumerRecord], work: BatchWork
    ) -> None:
        held.set()
        await release.wait()

    async with migrated_pool(fresh_database) as pool:
        consumer.bind(pool, hold)
        await kafka.start()
        try:
            await send_batch(broker, topic, 10)
            await wait_until(lambda: asyncio.sleep(0, held.is_set()), what="a batch held up")
            for _ in range(4):  # the consumer fetches the first of these, then no more
                await send_batch(broker, topic, 100)
            assert (await log_ends_of(KafkaAccess(broker), [tp]))[tp] == 410

            expected = {(topic, 0): 410}
            deadline = time.monotonic() + 15
            while (shown := consumer.lag()) != expected and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            assert shown == expected
        finally:
            release.set()
            await consumer.stop()
            await kafka.stop()
