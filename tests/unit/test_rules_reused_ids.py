"""A later copy of an event id in one batch: a redelivery (dropped) or another event
under a reused id (dead-lettered, `reused_event_id`)."""

from __future__ import annotations

import json

from aiokafka.structs import ConsumerRecord

from schemas.activity import parse_activity
from services.common.dlq import classify
from services.rules.reused_ids import refusal, split_in_batch

PURCHASE = {
    "event_id": "pos-17", "type": "purchase", "occurred_at": "2026-11-29T10:00:00+08:00",
    "member_id": "m-1", "data": {"order_id": "o-1", "amount": "800.00"},
}  # fmt: skip


def _arrived(doc: dict[str, object], offset: int) -> tuple[ConsumerRecord[bytes, bytes], object]:
    raw = json.dumps(doc).encode()
    record = ConsumerRecord(
        topic="loyalty.activity.v1", partition=2, offset=offset, timestamp=0, timestamp_type=0,
        key=b"m-1", value=raw, checksum=None, serialized_key_size=3,
        serialized_value_size=len(raw), headers=(),
    )  # fmt: skip
    return record, parse_activity(raw)


def test_the_same_event_again_is_a_redelivery_however_it_is_written() -> None:
    rewritten = dict(reversed(list(PURCHASE.items())))
    rewritten["data"] = {"amount": "800.0", "order_id": "o-1"}
    rewritten["occurred_at"] = "2026-11-29T02:00:00Z"  # the same moment
    batch = [_arrived(PURCHASE, 5), _arrived(PURCHASE, 6), _arrived(rewritten, 7)]
    first, reused = split_in_batch(batch)  # type: ignore[arg-type]
    assert reused == []
    assert first == {"pos-17": batch[0]}


def test_another_event_under_the_same_id_is_refused_naming_the_first() -> None:
    other = {**PURCHASE, "data": {"order_id": "o-2", "amount": "5000.00"}}
    batch = [_arrived(PURCHASE, 5), _arrived(other, 6)]
    first, reused = split_in_batch(batch)  # type: ignore[arg-type]
    assert first == {"pos-17": batch[0]}
    assert reused == [(batch[1], ("loyalty.activity.v1", 2, 5))]
    label, reason = classify(refusal("pos-17", reused[0][1]))
    assert label == "reused_event_id"
    assert "'pos-17' was used before by another event" in reason
    assert "loyalty.activity.v1 partition 2 offset 5" in reason
