"""`log_ends`: the offset after each partition's last record, on both brokers, and the
consumers' resume on assignment that relies on it.

Tansu 0.6 answers ListOffsets (latest) with the offset after the first record of the
partition's last record batch; Kafka with the offset after its last record. The consumers'
check for a recreated topic and every "has it all been consumed" question need the
latter.
"""

from __future__ import annotations

import uuid
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from deploy import local
from services.common.log_end import log_ends, log_ends_of
from tests.integration.direct import consumer_of, migrated_pool

pytestmark = pytest.mark.integration


async def _batches(bootstrap: str, topic: str, sizes: dict[int, tuple[int, ...]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for partition, counts in sizes.items():
            for count in counts:
                batch = producer.create_batch()
                for i in range(count):
                    assert batch.append(key=b"m-1", value=b"%d" % i, timestamp=None)
                await (await producer.send_batch(batch, topic, partition=partition))
    finally:
        await producer.stop()


async def test_log_ends_are_the_offsets_after_the_last_records(broker: str) -> None:
    topic = f"t{uuid.uuid4().hex[:10]}.log-end"
    await local.create_topics_async(broker, [topic], partitions=3)
    await _batches(broker, topic, {0: (10,), 1: (10, 7)})  # partition 2 stays empty
    tps = [TopicPartition(topic, p) for p in range(3)]

    assert await log_ends_of(broker, tps) == {tps[0]: 10, tps[1]: 17, tps[2]: 0}

    consumer = AIOKafkaConsumer(bootstrap_servers=broker, enable_auto_commit=False)
    await consumer.start()
    try:
        reported = await consumer.end_offsets(tps)
        # Never past the last record; on Tansu short of it (1 and 11).
        assert all(reported[tp] <= end for tp, end in zip(tps, (10, 17, 0), strict=True))
        assert await log_ends(consumer, tps) == {tps[0]: 10, tps[1]: 17, tps[2]: 0}
    finally:
        await consumer.stop()


async def test_a_consumer_resumes_where_the_log_holds_its_offset_and_rereads_when_in_doubt(
    broker: str, fresh_database: str
) -> None:
    # `_seek_to_stored` on a real broker and Postgres: a stored offset at the end of a last
    # multi-record batch is resumed (Tansu's ListOffsets answered short of it); one past
    # the log's end means a recreated topic, read from its start; and when the high
    # watermark cannot be had, the consumer reads from the start rather than skip.
    topic = f"t{uuid.uuid4().hex[:10]}.resume"
    await local.create_topics_async(broker, [topic], partitions=1)
    await _batches(broker, topic, {0: (5,)})
    tp = TopicPartition(topic, 0)

    async def noop(*_: Any) -> None:
        return None

    kafka = AIOKafkaConsumer(bootstrap_servers=broker, enable_auto_commit=False)
    await kafka.start()
    try:
        async with migrated_pool(fresh_database) as pool:
            for stored, bootstrap, resumed in [
                (5, broker, 5),
                (7, broker, 0),
                (7, "127.0.0.1:1", 0),  # nothing listens there: no high watermark
            ]:
                await pool.execute("DELETE FROM consumer_offsets")
                await pool.execute(
                    "INSERT INTO consumer_offsets (consumer, topic, partition, next_offset)"
                    " VALUES ('c', $1, 0, $2)",
                    topic,
                    stored,
                )
                consumer = consumer_of(pool, "c", topic, noop)
                consumer.subscriber = SimpleNamespace(consumer=kafka)
                consumer._bootstrap = bootstrap
                kafka.assign([tp])
                await consumer._seek_to_stored({tp})
                assert consumer.next_offsets[(topic, 0)] == resumed
                assert await kafka.position(tp) == resumed
                assert await pool.fetchval("SELECT next_offset FROM consumer_offsets") == resumed
    finally:
        await kafka.stop()
