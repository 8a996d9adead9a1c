"""`log_ends`: the offset after each partition's last record, on both brokers, and the
consumers' resume on assignment that relies on it; `records_at` and the fingerprint of the
last record consumed, by which a consumer tells a recreated log from the one it read.

Tansu 0.6 answers ListOffsets (latest) with the offset after the first record of the
partition's last record batch; Kafka with the offset after its last record. The consumers'
check for a recreated topic and every "has it all been consumed" question need the
latter.
"""

from __future__ import annotations

import dataclasses
import uuid
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import ConsumerRecord
from structlog.testing import capture_logs

from deploy import local
from services.common.config import KafkaAccess
from services.common.log_end import fingerprint, log_ends, log_ends_of, records_at_of
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

    assert await log_ends_of(KafkaAccess(broker), tps) == {tps[0]: 10, tps[1]: 17, tps[2]: 0}

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
                consumer._watch.kafka = KafkaAccess(bootstrap)
                kafka.assign([tp])
                await consumer._seek_to_stored({tp})
                assert consumer.next_offsets[(topic, 0)] == resumed
                assert await kafka.position(tp) == resumed
                assert await pool.fetchval("SELECT next_offset FROM consumer_offsets") == resumed
    finally:
        await kafka.stop()


async def _read_all(bootstrap: str, tp: TopicPartition, n: int) -> list[ConsumerRecord]:
    """The first `n` records of a partition, as a consumer reads them."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign([tp])
        consumer.seek(tp, 0)
        out: list[ConsumerRecord] = []
        while len(out) < n:
            out += (await consumer.getmany(tp, timeout_ms=1000)).get(tp, [])
        return out[:n]
    finally:
        await consumer.stop()


async def test_records_at_are_the_records_a_consumer_read_or_none(broker: str) -> None:
    # Offsets inside a record batch and at its end, past the log's end and in an empty
    # partition; the fingerprints match those of the same records read from the start
    # (the consumer compares the two).
    topic = f"t{uuid.uuid4().hex[:10]}.records-at"
    await local.create_topics_async(broker, [topic], partitions=3)
    await _batches(broker, topic, {0: (10,), 1: (10, 7)})
    tps = [TopicPartition(topic, p) for p in range(3)]
    read = {tp: await _read_all(broker, tp, n) for tp, n in zip(tps, (10, 17), strict=False)}

    for wanted, expect in [
        ({tps[0]: 4, tps[1]: 16, tps[2]: 0}, {tps[0]: 4, tps[1]: 16, tps[2]: None}),
        ({tps[0]: 9, tps[1]: 17}, {tps[0]: 9, tps[1]: None}),
        ({tps[0]: 0, tps[1]: 30}, {tps[0]: 0, tps[1]: None}),
        ({tps[1]: 10}, {tps[1]: 10}),  # the first record of a later batch
    ]:
        found = await records_at_of(KafkaAccess(broker), wanted)
        assert {tp: r and r.offset for tp, r in found.items()} == expect
        for tp, record in found.items():
            if record is not None:
                assert fingerprint(record) == fingerprint(read[tp][record.offset])

    # Another record at the same offset (another value, key or time) is told apart.
    record = read[tps[0]][4]
    for other in (
        dataclasses.replace(record, value=b"x"),
        dataclasses.replace(record, key=b"m-2"),
        dataclasses.replace(record, key=None),
        dataclasses.replace(record, timestamp=record.timestamp + 1),
        dataclasses.replace(record, offset=5),
    ):
        assert fingerprint(other) != fingerprint(record)


async def test_a_consumer_resumes_only_where_the_log_holds_the_record_it_consumed_last(
    broker: str, fresh_database: str
) -> None:
    # A recreated log that grew past the stored offset looks normal by offsets: the stored
    # fingerprint of the last record consumed decides. A stored offset lowered by hand
    # (its fingerprint is of a later record) and rows from before the fingerprint are
    # resumed as before.
    topic = f"t{uuid.uuid4().hex[:10]}.marks"
    await local.create_topics_async(broker, [topic], partitions=1)
    await _batches(broker, topic, {0: (5, 3)})
    tp = TopicPartition(topic, 0)
    read = await _read_all(broker, tp, 8)
    other = dataclasses.replace(read[4], value=b"from the old log")

    async def noop(*_: Any) -> None:
        return None

    kafka = AIOKafkaConsumer(bootstrap_servers=broker, enable_auto_commit=False)
    await kafka.start()
    try:
        async with migrated_pool(fresh_database) as pool:
            for stored, mark, bootstrap, resumed, event in [
                (5, fingerprint(read[4]), broker, 5, None),
                (8, fingerprint(read[7]), broker, 8, None),
                (3, fingerprint(read[2]), broker, 3, None),  # inside a batch
                (5, fingerprint(other), broker, 0, "log_recreated_record_differs"),
                (
                    12,
                    fingerprint(dataclasses.replace(read[7], offset=11)),
                    broker,
                    0,
                    "log_recreated_record_missing",
                ),
                (5, fingerprint(read[4]), "127.0.0.1:1", 0, "log_recreated_unknown"),
                (3, fingerprint(read[7]), broker, 3, None),  # lowered by hand
                (5, None, broker, 5, None),  # stored before migration 0021
            ]:
                await pool.execute("DELETE FROM consumer_offsets")
                await pool.execute(
                    "INSERT INTO consumer_offsets"
                    " (consumer, topic, partition, next_offset, last_record)"
                    " VALUES ('c', $1, 0, $2, $3)",
                    topic,
                    stored,
                    mark,
                )
                consumer = consumer_of(pool, "c", topic, noop)
                consumer.subscriber = SimpleNamespace(consumer=kafka)
                consumer._watch.kafka = KafkaAccess(bootstrap)
                kafka.assign([tp])
                with capture_logs() as logs:
                    await consumer.seek_assigned({tp})
                assert consumer.next_offsets[(topic, 0)] == resumed, (stored, bootstrap)
                assert await kafka.position(tp) == resumed
                row = await pool.fetchrow("SELECT next_offset, last_record FROM consumer_offsets")
                assert row["next_offset"] == resumed
                assert row["last_record"] == (mark if resumed else None)
                warned = [e["event"] for e in logs if e["event"].startswith("log_recreated")]
                assert warned == ([event] if event else [])
                assert consumer.assigned == {tp}
    finally:
        await kafka.stop()
