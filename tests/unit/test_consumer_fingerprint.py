"""The fingerprint of the last record consumed (migration 0021) against what other
instances do meanwhile, driven with fakes: an in-memory consumer_offsets table and a fake
`records_at_of` reading a list as the log. Each was a reviewer's reproduction of a bug:
a zombie batch that spun in `process` while the partition's new owner committed, an
anchor of an old log that re-read a partition another instance had already reset, and a
plain dead letter whose stored fingerprint was of a keyless copy of the record."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord
from structlog.testing import capture_logs

from services.common import recreated_log
from services.common.consumer import BatchConsumer
from services.common.log_end import fingerprint

TOPIC = "loyalty.activity.v1"
P = TopicPartition(TOPIC, 0)
Q = TopicPartition(TOPIC, 1)


def rec(
    tp: TopicPartition, offset: int, value: bytes, ts: int = 1_700_000_000_000
) -> ConsumerRecord:
    return ConsumerRecord(tp.topic, tp.partition, offset, ts + offset, 0, b"m-1", value,
                          None, 3, len(value), ())  # fmt: skip


def log_of(
    tp: TopicPartition, n: int, tag: bytes, ts: int = 1_700_000_000_000
) -> list[ConsumerRecord]:
    return [rec(tp, i, b"%s-%d" % (tag, i), ts) for i in range(n)]


class FakeDB:
    """consumer_offsets only, with the upsert's GREATEST/CASE semantics."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, int], dict[str, Any]] = {}
        self.on_dead_letters: Callable[[list[Any]], None] = lambda rows: None

    def acquire(self) -> Any:
        return _Conn(self)


class _Ctx:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


class _Conn:
    def __init__(self, db: FakeDB) -> None:
        self.db = db

    async def __aenter__(self) -> _Conn:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def transaction(self) -> _Ctx:
        return _Ctx()

    def _row(self, key: tuple[str, int]) -> dict[str, Any]:
        r = self.db.rows[key]
        return {"topic": key[0], "partition": key[1], **r}

    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        if "ANY($2::text[])" in sql:
            return [self._row(k) for k in sorted(self.db.rows) if k[0] in args[1]]
        wanted = set(zip(args[1], args[2], strict=True))
        return [self._row(k) for k in sorted(self.db.rows) if k in wanted]

    async def execute(self, sql: str, *args: Any) -> None:
        if "ON CONFLICT DO NOTHING" in sql:
            for t, p in zip(args[1], args[2], strict=True):
                self.db.rows.setdefault((t, p), {"next_offset": 0, "last_record": None})
        elif sql.startswith("UPDATE consumer_offsets"):
            self.db.rows[(args[1], args[2])] = {"next_offset": args[3], "last_record": None}
        elif "INSERT INTO consumer_offsets AS o" in sql:
            for t, p, n, f in zip(args[1], args[2], args[3], args[4], strict=True):
                old = self.db.rows.get((t, p))
                if old is None or n >= old["next_offset"]:
                    self.db.rows[(t, p)] = {"next_offset": n, "last_record": f}
        else:
            raise AssertionError(sql)

    async def copy_records_to_table(self, *args: Any, **kw: Any) -> None:
        return None

    async def executemany(self, sql: str, rows: list[Any]) -> None:
        self.db.on_dead_letters(rows)


class FakeKafka:
    def __init__(self, logs: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        self.logs = logs
        self.seeks: dict[TopicPartition, int] = {}
        self.owned: set[TopicPartition] = set()
        # Where each log starts (retention or DeleteRecords moved it), and who asked.
        self.starts: dict[TopicPartition, int] = {}
        self.asked_starts: list[list[TopicPartition]] = []

    async def beginning_offsets(self, tps: Any) -> dict[TopicPartition, int]:
        self.asked_starts.append(list(tps))
        return {tp: self.starts.get(tp, 0) for tp in tps}

    async def end_offsets(self, tps: Any) -> dict[TopicPartition, int]:
        return {tp: len(self.logs[tp]) for tp in tps}

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks[tp] = offset

    def assignment(self) -> set[TopicPartition]:
        return self.owned

    def pause(self, *tps: TopicPartition) -> None: ...

    def resume(self, *tps: TopicPartition) -> None: ...


def make(db: FakeDB, kafka: FakeKafka, applied: list[tuple[int, int]]) -> BatchConsumer:
    async def handler(conn: Any, records: Any, work: Any) -> None:
        applied.extend((r.partition, r.offset) for r in records)

    c = BatchConsumer(name="rules", service="rules", topic=TOPIC, dlq_topic="dlq",
                      pool=db, handler=handler)  # fmt: skip
    c.subscriber = type("Subscriber", (), {"consumer": kafka})()
    return c


def patch_log(
    monkeypatch: pytest.MonkeyPatch, kafka: FakeKafka, after: Callable[[], None] = lambda: None
) -> list[dict[TopicPartition, int]]:
    calls: list[dict[TopicPartition, int]] = []

    async def records_at_of(access: Any, wanted: Any) -> Any:
        calls.append(dict(wanted))
        await asyncio.sleep(0)  # a round trip to the broker
        out = {tp: (kafka.logs[tp][o] if kafka.starts.get(tp, 0) <= o < len(kafka.logs[tp])
                    else None) for tp, o in wanted.items()}  # fmt: skip
        after()
        return out

    monkeypatch.setattr(recreated_log, "records_at_of", records_at_of)
    return calls


async def test_a_zombie_batch_returns_while_the_new_owner_commits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Instance A still applies a batch of P after P moved to instance B (a rebalance
    during A's batch). B keeps committing P (steady traffic). A's batch is below the stored
    offset without the record at stored-1: `_check_went_back` finds B's record in the log,
    marks (offset, mark) verified and `continue`s; by then B has committed again, so the
    re-apply sees a new (offset, mark), holds again, asks the broker again... A never left
    `process`, and its own partition Q got no further batch for as long as B was busy."""
    healthy = {P: log_of(P, 100_000, b"p"), Q: log_of(Q, 10, b"q")}
    kafka = FakeKafka(healthy)
    kafka.owned = {Q}  # P was revoked from A
    db = FakeDB()
    db.rows[(TOPIC, 0)] = {"next_offset": 150, "last_record": fingerprint(healthy[P][149])}
    db.rows[(TOPIC, 1)] = {"next_offset": 0, "last_record": None}

    def b_commits() -> None:  # instance B applies a batch of P during A's round trip
        row = db.rows[(TOPIC, 0)]
        n = row["next_offset"] + 20
        db.rows[(TOPIC, 0)] = {"next_offset": n, "last_record": fingerprint(healthy[P][n - 1])}

    calls = patch_log(monkeypatch, kafka, after=b_commits)
    applied: list[tuple[int, int]] = []
    a = make(db, kafka, applied)
    zombie = healthy[P][100:110] + healthy[Q][0:5]
    with capture_logs():
        # It spun (thousands of look-ups) while B kept committing; now it returns at once.
        await asyncio.wait_for(a.process(zombie), 5)
    # P is not A's: its records below the stored offset are dropped, nothing asked.
    assert calls == []
    assert applied == [(1, o) for o in range(5)]


async def test_a_partition_still_owned_is_looked_for_once_per_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same race with P still in A's assignment (the broker evicted A, which has not
    heard yet): the log is asked once; found holding B's record, the batch's records below
    every later stored offset are redeliveries."""
    healthy = {P: log_of(P, 100_000, b"p"), Q: log_of(Q, 10, b"q")}
    kafka = FakeKafka(healthy)
    kafka.owned = {P, Q}
    db = FakeDB()
    db.rows[(TOPIC, 0)] = {"next_offset": 150, "last_record": fingerprint(healthy[P][149])}
    db.rows[(TOPIC, 1)] = {"next_offset": 0, "last_record": None}

    def b_commits() -> None:
        n = db.rows[(TOPIC, 0)]["next_offset"] + 20
        db.rows[(TOPIC, 0)] = {"next_offset": n, "last_record": fingerprint(healthy[P][n - 1])}

    calls = patch_log(monkeypatch, kafka, after=b_commits)
    applied: list[tuple[int, int]] = []
    a = make(db, kafka, applied)
    with capture_logs() as logs:
        await asyncio.wait_for(a.process(healthy[P][100:110] + healthy[Q][0:5]), 1)
    assert calls == [{P: 149}]
    assert [e["event"] for e in logs] == ["position_went_back"]
    assert applied == [(1, o) for o in range(5)]
    assert a._watch.looked == set()  # per call


async def test_a_stale_anchor_does_not_reread_a_partition_another_instance_reset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A consumed P of the old log (anchor at offset 49). Tansu restarts; the new group
    gives P to B, which finds the log recreated, reads it from 0 and is now at 300, its
    fingerprint of the new log stored. Later P comes back to A (a deploy): the log holds
    the stored fingerprint (healthy), yet A's anchor from the *old* log was looked for at
    49, differed, and P was read again from 0. The row holds another writer's fingerprint
    now, so the anchor is dropped."""
    new = {P: log_of(P, 400, b"new", ts=1_800_000_000_000)}
    kafka = FakeKafka(new)
    db = FakeDB()
    db.rows[(TOPIC, 0)] = {"next_offset": 300, "last_record": fingerprint(new[P][299])}
    calls = patch_log(monkeypatch, kafka)
    a = make(db, kafka, [])
    a._watch.anchors[(TOPIC, 0)] = fingerprint(log_of(P, 50, b"old")[49])  # from before the restart
    with capture_logs() as logs:
        await a._seek_to_stored({P})
    assert kafka.seeks[P] == 300, f"healthy log re-read from {kafka.seeks[P]}"
    assert {P: 49} not in calls  # the old log's anchor is not looked for
    assert not any(e["event"].startswith("log_recreated") for e in logs)


async def test_an_anchor_is_looked_for_while_the_row_holds_what_this_process_wrote(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The case anchors are for: A consumed the old log, Tansu restarted under it and A
    fetched the new log at its old position, storing a fingerprint of the new log. At the
    next assignment the row holds what A wrote last: the anchor of the old log is looked
    for, missing, and P is read again from 0."""
    old = log_of(P, 50, b"old")
    new = {P: log_of(P, 400, b"new", ts=1_800_000_000_000)}
    kafka = FakeKafka(new)
    kafka.owned = {P}
    db = FakeDB()
    db.rows[(TOPIC, 0)] = {"next_offset": 50, "last_record": fingerprint(old[49])}
    calls = patch_log(monkeypatch, kafka)
    a = make(db, kafka, [])
    a._watch.anchors[(TOPIC, 0)] = fingerprint(old[49])  # found in the log at the last seek
    with capture_logs():
        await a.process(new[P][50:60])  # the new log, fetched at the old position
        assert db.rows[(TOPIC, 0)]["next_offset"] == 60
        await a._seek_to_stored({P})
    assert calls[-1] == {P: 49}
    assert kafka.seeks[P] == 0
    assert db.rows[(TOPIC, 0)] == {"next_offset": 0, "last_record": None}


async def test_a_plain_dead_letter_leaves_the_fingerprint_of_the_record_in_the_log(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The last record of P is poison and its first dead letter is refused by the tables
    (`dead_letter_unwritable`): the plain letter was applied with key=None, so the offsets
    row kept the fingerprint of a record with no key, which the log (with its key) never
    matched: 'recreated', P read again from 0 at the next assignment."""
    log = {P: log_of(P, 50, b"p")}
    kafka = FakeKafka(log)
    kafka.owned = {P}
    db = FakeDB()
    db.rows[(TOPIC, 0)] = {"next_offset": 49, "last_record": fingerprint(log[P][48])}

    def refuse_first(rows: list[Any]) -> None:
        if "could not be stored" not in str(rows[0][5]):
            raise ValueError("check constraint")  # stands for CheckViolationError

    db.on_dead_letters = refuse_first

    async def poison(conn: Any, records: Any, work: Any) -> None:
        raise ValueError("forbidden words")

    patch_log(monkeypatch, kafka)
    c = make(db, kafka, [])
    c._handler = poison
    with capture_logs():
        await c.process([log[P][49]])
    assert db.rows[(TOPIC, 0)]["next_offset"] == 50
    restarted = make(db, kafka, [])  # a restart (or a rebalance to another instance)
    with capture_logs() as logs:
        await restarted._seek_to_stored({P})
    assert not any(e["event"].startswith("log_recreated") for e in logs)
    assert kafka.seeks[P] == 50, f"healthy log re-read from {kafka.seeks[P]}"
