"""Records deleted from a log (retention, DeleteRecords) before the consumer read them are
said and counted, and a log whose start passed the record last consumed is not taken for
a recreated one (fakes of test_consumer_fingerprint.py). Before, aiokafka moved the
position to the log start, said so at INFO (which the services' logging leaves out), and
the batch there skipped the deleted records silently; and on assignment the record last
consumed, deleted, was 'log_recreated_record_missing', even with nothing unread lost."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from services.common.log_end import fingerprint
from tests.unit.test_consumer_fingerprint import (
    TOPIC,
    FakeDB,
    FakeKafka,
    P,
    Q,
    log_of,
    make,
    patch_log,
)


def skipped_total(consumer: str) -> float:
    value = REGISTRY.get_sample_value("loyalty_records_skipped_total", {"consumer": consumer})
    return value or 0.0


def _running(start: int) -> tuple[FakeDB, FakeKafka, list[tuple[int, int]]]:
    """P consumed to 10 of 100 records, Q to 5 of 10; P's log now starts at `start`."""
    logs = {P: log_of(P, 100, b"p"), Q: log_of(Q, 10, b"q")}
    kafka = FakeKafka(logs)
    kafka.owned = {P, Q}
    kafka.starts[P] = start
    db = FakeDB()
    db.rows[(TOPIC, 0)] = {"next_offset": 10, "last_record": fingerprint(logs[P][9])}
    db.rows[(TOPIC, 1)] = {"next_offset": 5, "last_record": fingerprint(logs[Q][4])}
    return db, kafka, []


async def test_a_batch_past_a_moved_log_start_says_and_counts_what_was_skipped() -> None:
    db, kafka, applied = _running(start=40)
    c = make(db, kafka, applied)
    before = skipped_total("rules")
    with capture_logs() as logs:
        # aiokafka's fetch from 10 was out of range; it went on from the log start, 40.
        await c.process(kafka.logs[P][40:50] + kafka.logs[Q][5:8])
    assert applied == [(0, o) for o in range(40, 50)] + [(1, o) for o in range(5, 8)]
    warnings = [e for e in logs if e["event"] == "records_skipped_log_start_moved"]
    assert [(e["partition"], e["from_offset"], e["to_offset"], e["count"]) for e in warnings] == [
        (0, 10, 40, 30)
    ]
    assert skipped_total("rules") - before == 30
    assert kafka.asked_starts == [[P]]  # only the partition with a gap
    assert db.rows[(TOPIC, 0)]["next_offset"] == 50


async def test_a_gap_the_log_start_does_not_explain_is_not_reported() -> None:
    """A transaction's commit marker (or compaction) takes offsets that hold no record:
    the log still starts below the stored offset."""
    db, kafka, applied = _running(start=0)
    c = make(db, kafka, applied)
    before = skipped_total("rules")
    with capture_logs() as logs:
        await c.process(kafka.logs[P][11:20])
    assert not [e for e in logs if e["level"] == "warning"]
    assert skipped_total("rules") == before
    assert applied == [(0, o) for o in range(11, 20)]


async def test_a_batch_at_the_stored_offset_asks_nothing() -> None:
    db, kafka, applied = _running(start=40)
    c = make(db, kafka, applied)
    with capture_logs() as logs:
        await c.process(kafka.logs[P][10:20] + kafka.logs[Q][5:8])
    assert kafka.asked_starts == []
    assert logs == []


async def test_a_log_started_at_the_stored_offset_is_resumed_not_reread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Everything applied of P was deleted (DeleteRecords up to the stored offset, or
    retention of a consumer caught up): the record last consumed is not in the log, and
    nothing unread was lost."""
    db, kafka, _ = _running(start=10)
    calls = patch_log(monkeypatch, kafka)
    c = make(db, kafka, [])
    with capture_logs() as logs:
        await c._seek_to_stored({P, Q})
    assert calls == [{Q: 4}]  # P's fingerprint, below the log start, is not looked for
    assert not any(e["event"].startswith("log_recreated") for e in logs)
    assert [e["event"] for e in logs if e.get("partition") == 0] == ["log_start_at_stored_offset"]
    assert kafka.seeks[P] == 10
    assert db.rows[(TOPIC, 0)]["next_offset"] == 10


async def test_a_log_started_past_the_stored_offset_is_not_taken_for_recreated(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    db, kafka, applied = _running(start=40)
    patch_log(monkeypatch, kafka)
    c = make(db, kafka, applied)
    before = skipped_total("rules")
    with capture_logs() as logs:
        await c._seek_to_stored({P, Q})
        await c.process(kafka.logs[P][40:45])  # the fetch resumed at the log start
    assert [e["event"] for e in logs if e.get("partition") == 0] == [
        "stored_offset_before_log_start",
        "records_skipped_log_start_moved",
    ]
    assert skipped_total("rules") - before == 30
    assert applied == [(0, o) for o in range(40, 45)]
