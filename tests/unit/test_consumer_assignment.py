"""The rebalance listener never fails: aiokafka logs and swallows its exceptions, which
left a partition at the broker's position and never counted assigned (/readyz 503, no lag
gauge, no tier sweep) until a restart. Seeking to the stored offsets is retried instead,
with the partitions paused meanwhile so that nothing fetched from elsewhere is applied."""

from __future__ import annotations

import asyncpg
import pytest
from aiokafka import TopicPartition
from structlog.testing import capture_logs

from services.common import consumer as consumer_module
from services.common.consumer import BatchConsumer

TP = TopicPartition("loyalty.grants.v1", 0)


class FakeKafka:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def pause(self, *tps: TopicPartition) -> None:
        self.calls.append("pause")

    def resume(self, *tps: TopicPartition) -> None:
        self.calls.append("resume")


async def test_an_assignment_is_retried_until_the_offsets_can_be_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(consumer_module, "RETRY_BACKOFF_S", (0.0,))
    consumer = BatchConsumer(name="ledger", service="ledger", topic=TP.topic, dlq_topic="dlq")
    kafka = FakeKafka()
    consumer.subscriber = type("Subscriber", (), {"consumer": kafka})()
    failures: list[Exception] = [
        asyncpg.CannotConnectNowError("the database system is starting up"),
        ConnectionRefusedError(111, "Connection refused"),
        RuntimeError("not expected"),
    ]

    async def seek(assigned: set[TopicPartition]) -> None:
        kafka.calls.append("seek")
        if failures:
            raise failures.pop(0)
        consumer.assigned |= assigned

    monkeypatch.setattr(consumer, "_seek_to_stored", seek)
    with capture_logs() as logs:
        await consumer.seek_assigned({TP})

    assert consumer.assigned == {TP}
    assert kafka.calls == ["pause", "seek", "seek", "seek", "seek", "resume"]
    retries = [(e["event"], e["log_level"]) for e in logs]
    assert retries == [("assignment_retry", "warning")] * 2 + [("assignment_retry", "error")]
