"""A later copy of an event id: a redelivery (dropped) or another event under a reused id
(dead-lettered, `reused_event_id`), judged against the copy that stands: the held one if
the id is held, else the batch's first."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiokafka.structs import ConsumerRecord

from schemas.activity import parse_activity
from services.common.dlq import classify
from services.rules.reused_ids import SELECT_RECORDED, digest, refusal, sort_out

PURCHASE = {
    "event_id": "pos-17", "type": "purchase", "occurred_at": "2026-11-29T10:00:00+08:00",
    "member_id": "m-1", "data": {"order_id": "o-1", "amount": "800.00"},
}  # fmt: skip
OTHER = {**PURCHASE, "data": {"order_id": "o-2", "amount": "5000.00"}}


def _arrived(doc: dict[str, Any], offset: int) -> tuple[ConsumerRecord[bytes, bytes], Any]:
    raw = json.dumps(doc).encode()
    record = ConsumerRecord(
        topic="loyalty.activity.v1", partition=2, offset=offset, timestamp=0, timestamp_type=0,
        key=b"m-1", value=raw, checksum=None, serialized_key_size=3,
        serialized_value_size=len(raw), headers=(),
    )  # fmt: skip
    return record, parse_activity(raw)


class _Held:
    """The `rules_activity` rows of the held events, as the two statements read them."""

    def __init__(self, *held: tuple[dict[str, Any], int]) -> None:
        self.rows = {doc["event_id"]: (json.dumps(doc).encode(), offset) for doc, offset in held}

    async def fetch(self, sql: str, ids: list[str]) -> list[dict[str, Any]]:
        found = [(i, *self.rows[i]) for i in ids if i in self.rows]
        if sql == SELECT_RECORDED:
            return [{"event_id": i, "digest": digest(raw), "topic": "loyalty.activity.v1",
                     "partition": 2, "offset": offset} for i, raw, offset in found]  # fmt: skip
        return [{"event_id": i, "payload": raw} for i, raw, _ in found]


def _sort_out(held: _Held, *batch: Any) -> Any:
    return asyncio.run(sort_out(held, batch))  # type: ignore[arg-type]


def test_the_same_event_again_is_a_redelivery_however_it_is_written() -> None:
    rewritten: dict[str, Any] = dict(reversed(list(PURCHASE.items())))
    rewritten["data"] = {"amount": "800.0", "order_id": "o-1", "sent_at": "10:00:03"}
    rewritten["occurred_at"] = "2026-11-29T02:00:00Z"  # the same moment
    rewritten["trace_id"] = "a7f3"  # a producer's own field: the contract lets it add them
    batch = [_arrived(PURCHASE, 5), _arrived(PURCHASE, 6), _arrived(rewritten, 7)]
    first, held, reused = _sort_out(_Held(), *batch)
    assert (first, held, reused) == ({"pos-17": batch[0]}, set(), [])
    # Held already: every copy, rewritten or not, is a redelivery of the held one.
    assert _sort_out(_Held((PURCHASE, 1)), *batch)[1:] == ({"pos-17"}, [])


def test_another_event_under_the_same_id_is_refused_naming_the_copy_that_stands() -> None:
    batch = [_arrived(PURCHASE, 5), _arrived(OTHER, 6)]
    first, _, reused = _sort_out(_Held(), *batch)
    assert first == {"pos-17": batch[0]}
    assert reused == [(batch[1], ("loyalty.activity.v1", 2, 5))]
    label, reason = classify(refusal("pos-17", reused[0][1]))
    assert label == "reused_event_id"
    assert "'pos-17' was used before by another event" in reason
    assert "loyalty.activity.v1 partition 2 offset 5" in reason


def test_a_held_ids_copies_are_judged_against_the_held_one_not_the_batchs_first() -> None:
    # The batch's first copy reuses the held id; the next is the held event again, byte for
    # byte: only the reuse is refused (the redelivery was refused against the reuse).
    batch = [_arrived(OTHER, 6), _arrived(PURCHASE, 7)]
    _, held, reused = _sort_out(_Held((PURCHASE, 1)), *batch)
    assert held == {"pos-17"}
    assert reused == [(batch[0], ("loyalty.activity.v1", 2, 1))]
