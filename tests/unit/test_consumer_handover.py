"""A fetched batch reaches `BatchConsumer.process` through FastStream, whatever its records
hold. FastStream's own parser decoded every record header as UTF-8: a binary one (Spring's
kafka_correlationId) or a null one (Java clients) raised, and FastStream logged and dropped
the whole batch, its fetch position past it. These drive FastStream's real subscriber
(`consume`, as its fetch loop calls it) without a broker.

Should FastStream drop a batch on its way anyway, the next one finds it still in flight:
its partitions are read again from the offsets applied. And the lag counts a partition up
to its fetch position (past transaction markers, aborted records) only while none of its
records is in flight."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord
from structlog.testing import capture_logs

from services.common import consumer as consumer_module
from services.common.config import KafkaAccess, Settings
from services.common.consumer import BatchConsumer
from services.common.runtime import create_broker

TOPIC = "loyalty.activity.v1"
A, B = TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)


def _record(tp: TopicPartition, offset: int, headers: Sequence[Any] = ()) -> ConsumerRecord:
    return ConsumerRecord(tp.topic, tp.partition, offset, 0, 0, b"m-1", b"{}", None, 2, 2,
                          list(headers))  # fmt: skip


class FakeKafka:
    def __init__(self) -> None:
        self.seeks: list[tuple[TopicPartition, int]] = []
        self.positions: dict[TopicPartition, int] = {}

    def assignment(self) -> set[TopicPartition]:
        return {A, B}

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp, offset))

    def highwater(self, tp: TopicPartition) -> int:
        return 100


def _subscribed() -> tuple[BatchConsumer, Any, list[list[ConsumerRecord]]]:
    """A consumer attached to a broker never started; `applied` gets each batch applied."""
    broker = create_broker(Settings(database_url="", bootstrap_servers="127.0.0.1:1"), "t")
    consumer = BatchConsumer(name="t", service="t", topic=TOPIC, dlq_topic="dlq")
    consumer.attach(broker, kafka=KafkaAccess("127.0.0.1:1"), max_batch=10, batch_wait_ms=5,
                    fetch_wait_ms=5)  # fmt: skip
    applied: list[list[ConsumerRecord]] = []

    async def apply(records: Sequence[ConsumerRecord]) -> None:
        applied.append(list(records))

    consumer._apply_or_isolate = apply  # type: ignore[method-assign]
    broker._setup_logger()  # what its connect does
    subscriber = consumer.subscriber
    subscriber._build_fastdepends_model()  # what its start does, but the Kafka consumer
    subscriber.running = True
    subscriber.consumer = FakeKafka()
    return consumer, subscriber, applied


async def test_records_with_binary_or_null_headers_reach_the_handler_with_their_batch() -> None:
    consumer, subscriber, applied = _subscribed()
    batch = (
        _record(A, 0, [("source", b"till-7")]),
        _record(A, 1, [("kafka_correlationId", bytes.fromhex("9f3a00ffee"))]),
        _record(A, 2, [("x-trace", None), ("reply_to", b"loyalty.grants.v1")]),
    )
    await subscriber.consume(batch)  # FastStream's fetch loop swallows what this raises
    assert applied == [list(batch)]
    assert consumer._in_flight == []


async def test_a_batch_lost_before_the_handler_is_read_again_not_skipped() -> None:
    consumer, subscriber, applied = _subscribed()
    consumer.next_offsets = {(TOPIC, 0): 3, (TOPIC, 1): 7}
    [call] = subscriber.calls
    default_filter = call.filter

    async def fails_once(message: Any) -> bool:
        call.filter = default_filter
        raise RuntimeError("a FastStream failure after the parser")

    call.filter = fails_once
    await subscriber.consume((_record(A, 3), _record(A, 4)))  # lost
    assert applied == []
    with capture_logs() as logs:
        await subscriber.consume((_record(A, 5), _record(B, 7)))
    # A is read again from 3; its record 5 comes again after 3 and 4, not before them.
    assert subscriber.consumer.seeks == [(A, 3)]
    assert applied == [[_record(B, 7)]]
    said = [e for e in logs if e["event"] == "batch_lost_before_handler"]
    assert [(e["log_level"], e["partitions"]) for e in said] == [("error", [0])]
    assert consumer._in_flight == []


async def test_the_lag_counts_the_fetch_position_only_of_partitions_not_in_flight(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    consumer, subscriber, _ = _subscribed()
    kafka = subscriber.consumer
    monkeypatch.setattr(consumer_module, "fetch_position", lambda k, tp: k.positions.get(tp))
    consumer.assigned = {A, B}
    consumer.next_offsets = {(TOPIC, 0): 40, (TOPIC, 1): 40}
    # Both read past what was applied: A past markers and aborted records, B past a batch
    # handed over and still being applied.
    kafka.positions = {A: 100, B: 60}
    consumer._in_flight = [(_record(B, 40), _record(B, 59))]
    assert consumer.lag() == {(TOPIC, 0): 0, (TOPIC, 1): 60}
    consumer._in_flight = []  # B applied: its offsets stored
    consumer.next_offsets[(TOPIC, 1)] = 60
    assert consumer.lag() == {(TOPIC, 0): 0, (TOPIC, 1): 40}
    kafka.positions = {A: 100}  # B's position not known (being reset): the offset applied
    assert consumer.lag() == {(TOPIC, 0): 0, (TOPIC, 1): 40}
