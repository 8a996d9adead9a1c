"""The rebalance listener never fails: aiokafka logs and swallows its exceptions, which
left a partition at the broker's position and never counted assigned (/readyz 503, no lag
gauge, no tier sweep) until a restart. Nor does it wait: aiokafka sends no heartbeat while
the listener runs, so a listener waiting for Postgres got the member evicted and its
partitions consumed by two. It tries once; a background task retries the seek to the
stored offsets, the partitions paused meanwhile so that nothing fetched from elsewhere is
applied, and a revocation cancels it."""

from __future__ import annotations

import asyncio

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


def _consumer(monkeypatch: pytest.MonkeyPatch) -> tuple[BatchConsumer, FakeKafka]:
    monkeypatch.setattr(consumer_module, "RETRY_BACKOFF_S", (0.0,))
    consumer = BatchConsumer(name="ledger", service="ledger", topic=TP.topic, dlq_topic="dlq")
    kafka = FakeKafka()
    consumer.subscriber = type("Subscriber", (), {"consumer": kafka})()
    return consumer, kafka


async def test_an_assignment_is_retried_in_the_background_until_the_offsets_can_be_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    consumer, kafka = _consumer(monkeypatch)
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
        # The listener returned after one attempt: paused, not assigned (/readyz false).
        assert kafka.calls == ["pause", "seek"]
        assert consumer.assigned == set()
        assert len(consumer._seeking) == 1
        await asyncio.wait(list(consumer._seeking))

    assert consumer.assigned == {TP}
    assert consumer._seeking == {}
    assert kafka.calls == ["pause", "seek", "seek", "seek", "seek", "resume"]
    retries = [(e["event"], e["log_level"]) for e in logs]
    assert retries == [("assignment_retry", "warning")] * 2 + [("assignment_retry", "error")]


async def test_the_listener_gives_up_its_attempt_before_the_session_runs_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    consumer, kafka = _consumer(monkeypatch)
    monkeypatch.setattr(consumer_module, "RETRY_BACKOFF_S", (0.1,))
    consumer._attempt_s = 0.05
    hung = [True]

    async def seek(assigned: set[TopicPartition]) -> None:
        kafka.calls.append("seek")
        if hung.pop() if hung else False:
            await asyncio.sleep(3600)  # a database that does not answer
        consumer.assigned |= assigned

    monkeypatch.setattr(consumer, "_seek_to_stored", seek)
    with capture_logs() as logs:
        await asyncio.wait_for(consumer.seek_assigned({TP}), 1)
        assert consumer.assigned == set()
        await asyncio.wait(list(consumer._seeking))
    assert consumer.assigned == {TP}
    assert kafka.calls == ["pause", "seek", "seek", "resume"]
    assert [(e["event"], e["log_level"]) for e in logs] == [("assignment_retry", "warning")]


async def test_a_revocation_cancels_the_background_seek(monkeypatch: pytest.MonkeyPatch) -> None:
    consumer, kafka = _consumer(monkeypatch)

    async def seek(assigned: set[TopicPartition]) -> None:
        kafka.calls.append("seek")
        await asyncio.sleep(0)
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(consumer, "_seek_to_stored", seek)
    with capture_logs():
        await consumer.seek_assigned({TP})
        await asyncio.sleep(0.05)
        (task,) = consumer._seeking
        await consumer.stop_seeking({TopicPartition("loyalty.grants.v1", 1)})  # not its own
        assert not task.done()
        await consumer.stop_seeking({TP})
        assert task.cancelled()
        seeks = kafka.calls.count("seek")
        await asyncio.sleep(0.05)
    assert kafka.calls.count("seek") == seeks
    assert "resume" not in kafka.calls
    assert consumer._seeking == {}
    assert consumer.assigned == set()


async def test_a_seek_that_succeeds_at_once_leaves_nothing_behind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    consumer, kafka = _consumer(monkeypatch)

    async def seek(assigned: set[TopicPartition]) -> None:
        kafka.calls.append("seek")
        consumer.assigned |= assigned

    monkeypatch.setattr(consumer, "_seek_to_stored", seek)
    await consumer.seek_assigned({TP})
    assert kafka.calls == ["pause", "seek", "resume"]
    assert consumer._seeking == {}
    assert consumer.assigned == {TP}
