"""A reset to a recreated log's start is not undone by a batch fetched before it, and no
background seek outlives the consumer (found by a review; fakes of
test_consumer_fingerprint.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from structlog.testing import capture_logs

from services.common import consumer as consumer_module
from services.common.log_end import fingerprint
from tests.unit.test_consumer_fingerprint import (
    TOPIC,
    FakeDB,
    FakeKafka,
    P,
    log_of,
    make,
    patch_log,
)


async def test_a_batch_fetched_before_a_reset_does_not_undo_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A consumed the old log to 50. Tansu restarts; before the group notices, A's fetcher
    reads the new log at its old position (new[50:60], README: 'one order effect'). That
    batch's first attempt fails transiently (or waits for a pooled connection); meanwhile
    the group rebalances, the listener finds the log recreated, resets the row to 0 and
    seeks 0. The batch's retry then reads stored=0, applies 50..59 and the upsert's
    GREATEST lifted the row to 60 with a fingerprint of the *new* log; the re-read from 0
    went below 60, was looked for once, the log held new[59]: 'found', and new[0..49]
    were dropped as redeliveries, never applied. Now the retry drops the stale batch."""
    monkeypatch.setattr(consumer_module, "RETRY_BACKOFF_S", (0.05,))
    old = log_of(P, 50, b"old")
    new = {P: log_of(P, 400, b"new", ts=1_800_000_000_000)}
    kafka = FakeKafka(new)
    kafka.owned = {P}
    db = FakeDB()
    db.rows[(TOPIC, 0)] = {"next_offset": 50, "last_record": fingerprint(old[49])}
    patch_log(monkeypatch, kafka)
    applied: list[tuple[int, int]] = []
    a = make(db, kafka, applied)
    a._watch.anchors[(TOPIC, 0)] = fingerprint(old[49])
    inner = a._handler
    failed = []

    async def handler(conn: Any, records: Any, work: Any) -> None:
        if not failed:
            failed.append(1)
            raise ConnectionResetError("connection to Postgres lost")
        await inner(conn, records, work)

    a._handler = handler
    with capture_logs() as logs:
        batch = asyncio.ensure_future(a.process(new[P][50:60]))
        await asyncio.sleep(0.01)  # first attempt failed, backing off
        await a.seek_assigned({P})  # the rebalance: revoked and assigned again
        assert kafka.seeks[P] == 0
        assert db.rows[(TOPIC, 0)]["next_offset"] == 0
        await batch
        assert db.rows[(TOPIC, 0)]["next_offset"] == 0  # the reset stands
        for start in range(0, 100, 10):  # the fetcher now reads the new log from 0
            await a.process(new[P][start : start + 10])
    assert "stale_records_dropped" in [e["event"] for e in logs]
    missing = sorted(set(range(100)) - {o for _, o in applied})
    assert missing == [], f"new log's records never applied: {missing[:5]}..{missing[-1:]}"


async def test_a_batch_of_a_revoked_partition_does_not_undo_its_new_owners_reset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Same, across instances: Z fetched new[50:60] at its old position; the rebalance
    gives P to A, which finds the log recreated and resets the row to 0. Z's batch (a
    zombie: P is not Z's) is then applied, since it is not below the stored offset (0),
    and lifts the row to 60 with a fingerprint the new log holds. A's re-read from 0 is
    taken for redeliveries."""
    old = log_of(P, 50, b"old")
    new = {P: log_of(P, 400, b"new", ts=1_800_000_000_000)}
    db = FakeDB()
    db.rows[(TOPIC, 0)] = {"next_offset": 50, "last_record": fingerprint(old[49])}
    ka, kz = FakeKafka(new), FakeKafka(new)
    ka.owned, kz.owned = {P}, set()
    patch_log(monkeypatch, ka)
    applied_a: list[tuple[int, int]] = []
    applied_z: list[tuple[int, int]] = []
    a, z = make(db, ka, applied_a), make(db, kz, applied_z)
    with capture_logs():
        await a.seek_assigned({P})
        assert ka.seeks[P] == 0
        await z.process(new[P][50:60])  # the zombie's batch lands
        for start in range(0, 100, 10):
            await a.process(new[P][start : start + 10])
    applied = {o for _, o in applied_a + applied_z}
    missing = sorted(set(range(100)) - applied)
    assert missing == [], f"never applied: {missing[:3]}..{missing[-1:]} ({len(missing)})"


async def test_no_background_seek_outlives_the_consumer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """aiokafka's consumer.stop() leaves the group without calling on_partitions_revoked,
    and FastStream then sets subscriber.consumer = None: a seek pending at shutdown
    (Postgres down during the last rebalance) kept retrying, on a closed pool or a
    consumer that is None, until the loop died. The services call `stop()`; and a task
    that finds the subscriber's consumer gone ends by itself."""
    monkeypatch.setattr(consumer_module, "RETRY_BACKOFF_S", (0.01,))
    kafka = FakeKafka({P: log_of(P, 10, b"p")})
    db = FakeDB()

    def refused() -> Any:
        raise ConnectionRefusedError(111, "Connection refused")

    db.acquire = refused  # type: ignore[method-assign]
    patch_log(monkeypatch, kafka)
    stopped = make(db, kafka, [])
    with capture_logs():
        await stopped.seek_assigned({P})
        assert len(stopped._seeking) == 1
        await stopped.stop()
    assert stopped._seeking == {}
    dropped = make(db, FakeKafka({P: log_of(P, 10, b"p")}), [])
    with capture_logs():
        await dropped.seek_assigned({P})
        task = next(iter(dropped._seeking))
        dropped.subscriber.consumer = None  # FastStream's subscriber stopped
        await asyncio.wait_for(task, 1.0)
    assert task.done()
    assert not task.cancelled()
