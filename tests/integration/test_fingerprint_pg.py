"""Reproductions on a real Postgres (the broker's log stands in as a list): a
zombie batch spinning while the partition's new owner commits, and a plain dead letter's
fingerprint that the log does not hold."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest
from aiokafka import TopicPartition
from structlog.testing import capture_logs

from services.common import recreated_log
from tests.integration.direct import consumer_of, migrated_pool
from tests.unit.test_consumer_fingerprint import FakeKafka, log_of

pytestmark = pytest.mark.integration
TOPIC = "loyalty.activity.v1"
P = TopicPartition(TOPIC, 0)
Q = TopicPartition(TOPIC, 1)


def serve(monkeypatch: pytest.MonkeyPatch, kafka: FakeKafka, during: Any = None) -> list[Any]:
    calls: list[Any] = []

    async def records_at_of(access: Any, wanted: Any) -> Any:
        calls.append(dict(wanted))
        if during is not None:
            await during()  # what happens elsewhere during the round trip to the broker
        return {tp: kafka.logs[tp][o] if o < len(kafka.logs[tp]) else None
                for tp, o in wanted.items()}  # fmt: skip

    monkeypatch.setattr(recreated_log, "records_at_of", records_at_of)
    return calls


async def test_a_zombie_batch_returns_on_real_postgres(
    fresh_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = {P: log_of(P, 10_000, b"p"), Q: log_of(Q, 10, b"q")}
    kafka = FakeKafka(log)
    applied: list[tuple[str, int, int]] = []

    def handler(who: str) -> Any:
        async def h(conn: asyncpg.Connection, records: Any, work: Any) -> None:
            applied.extend((who, r.partition, r.offset) for r in records)

        return h

    async with migrated_pool(fresh_database) as pool:
        a = consumer_of(pool, "rules", TOPIC, handler("A"))
        b = consumer_of(pool, "rules", TOPIC, handler("B"))
        a.subscriber = type("S", (), {"consumer": kafka})()
        kafka.owned = {Q}
        await b.process(log[P][0:150])  # B, P's new owner, is ahead of A's zombie batch
        position = [150]

        async def b_commits() -> None:  # B applies its next batch of P meanwhile
            await b.process(log[P][position[0] : position[0] + 20])
            position[0] += 20

        calls = serve(monkeypatch, kafka, during=b_commits)
        with capture_logs() as logs:
            # Before the fix A left `process` only when B ran out of records to commit
            # (494 broker look-ups in 3 s, run once); now at once.
            await asyncio.wait_for(a.process(log[P][100:110] + log[Q][0:5]), 10)
        assert not any(e["event"] == "position_went_back" for e in logs)
        assert calls == []  # P is not A's: its records below the stored offset dropped


async def test_plain_dead_letter_fingerprint_on_real_postgres(
    fresh_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def refuse(conn: asyncpg.Connection, records: object, work: object) -> None:
        raise ValueError("forbidden words")

    log = {P: log_of(P, 5, b"not json")}
    kafka = FakeKafka(log)
    serve(monkeypatch, kafka)
    async with migrated_pool(fresh_database) as pool:
        await pool.execute("ALTER TABLE dead_letters ADD CONSTRAINT no_forbidden"
                           " CHECK (reason NOT LIKE '%forbidden%')")  # fmt: skip
        c = consumer_of(pool, "rules", TOPIC, refuse)
        with capture_logs():
            await c.process(log[P])
        assert await pool.fetchval("SELECT next_offset FROM consumer_offsets") == 5
        again = consumer_of(pool, "rules", TOPIC, refuse)
        again.subscriber = type("S", (), {"consumer": kafka})()
        with capture_logs() as logs:
            await again._seek_to_stored({P})
        assert not any(e["event"].startswith("log_recreated") for e in logs)
        assert kafka.seeks[P] == 5, f"re-read from {kafka.seeks[P]}"
