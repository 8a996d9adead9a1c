"""On a real Postgres: a batch of a revoked partition (a zombie's), fetched from a
recreated log at the old position, lands after the new owner reset the partition to the
log's start. It used to lift the row back (GREATEST), and the new log's records below the
old position were then dropped as redeliveries; it is dropped instead."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest
from aiokafka import TopicPartition
from structlog.testing import capture_logs

from tests.integration.direct import consumer_of, migrated_pool
from tests.integration.test_fingerprint_pg import serve
from tests.unit.test_consumer_fingerprint import FakeKafka, log_of

pytestmark = pytest.mark.integration
TOPIC = "loyalty.activity.v1"
P = TopicPartition(TOPIC, 0)


async def test_a_zombie_batch_does_not_undo_a_reset_on_real_postgres(
    fresh_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = {P: log_of(P, 50, b"old")}
    new = {P: log_of(P, 400, b"new", ts=1_800_000_000_000)}
    applied: list[tuple[str, int]] = []

    def handler(who: str) -> Any:
        async def h(conn: asyncpg.Connection, records: Any, work: Any) -> None:
            applied.extend((who, r.offset) for r in records)

        return h

    async with migrated_pool(fresh_database) as pool:
        a = consumer_of(pool, "rules", TOPIC, handler("A"))
        z = consumer_of(pool, "rules", TOPIC, handler("Z"))
        ka, kz = FakeKafka(new), FakeKafka(new)
        ka.owned, kz.owned = set(), {P}
        a.subscriber = type("S", (), {"consumer": ka})()
        z.subscriber = type("S", (), {"consumer": kz})()
        await z.process(old[P][0:50])  # Z consumed the old log to 50
        ka.owned, kz.owned = {P}, set()  # the rebalance after the restart: P is A's
        serve(monkeypatch, ka)
        with capture_logs() as logs:
            await a.seek_assigned({P})  # Tansu restarted; P is A's now: recreated, reset
            assert ka.seeks[P] == 0
            await z.process(new[P][50:60])  # Z's in-flight batch of the new log lands
            for start in range(0, 100, 10):  # A reads the new log from its start
                await a.process(new[P][start : start + 10])
        row = await pool.fetchrow("SELECT next_offset FROM consumer_offsets WHERE"
                                  " consumer = 'rules' AND partition = 0")  # fmt: skip
    events = [e["event"] for e in logs]
    assert "log_recreated_record_differs" in events
    assert "stale_records_dropped" in events  # Z's batch, not applied
    assert row["next_offset"] == 100
    got = {o for who, o in applied[50:]}
    missing = sorted(set(range(100)) - got)
    assert missing == [], f"new log never applied: {missing[:3]}..{missing[-1:]} ({len(missing)})"
