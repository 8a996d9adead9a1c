"""The log lines of a dead letter name the event and the member its record's JSON names
(README, Logs: `event_id` / `member_id` on per-event lines): `dead_letter` had the key as
member_id and no event_id, `poison_record` neither, so a refused event could not be found
in the logs by the id upstream knows it by."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiokafka.structs import ConsumerRecord
from structlog.testing import capture_logs

from schemas.activity import parse_activity
from services.common.consumer import BatchConsumer, BatchWork, validate_records

EVENT = {
    "event_id": "ev-42",
    "type": "purchase",
    "occurred_at": "2026-11-20T10:00:00+08:00",
    "member_id": "m-7",
    "store_id": "s",
    "source": "pos",
    "data": {"order_id": "o1", "amount": "-5", "items": []},  # a negative amount: refused
}


def record(value: bytes, key: bytes | None = b"m-7") -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord("loyalty.activity.v1", 0, 17, 0, 0, key, value, None, 0, 0, [])


def dead_letter_lines(value: bytes, key: bytes | None = b"m-7") -> list[dict[str, Any]]:
    with capture_logs() as logs:
        validate_records([record(value, key)], parse_activity, BatchWork(), "rules", "dlq")
    return [line for line in logs if line["event"] == "dead_letter"]


def test_the_dead_letter_line_names_the_event_and_member_of_the_record() -> None:
    [line] = dead_letter_lines(json.dumps(EVENT).encode())
    assert (line["event_id"], line["member_id"]) == ("ev-42", "m-7")


def test_a_record_that_is_no_json_object_is_named_by_its_key() -> None:
    for value in (b"\xff not json", b"[1, 2]", json.dumps({**EVENT, "event_id": 7}).encode()):
        [line] = dead_letter_lines(value)
        assert (line["event_id"], line["member_id"]) == (None, "m-7")
    [line] = dead_letter_lines(b"{", key=None)
    assert (line["event_id"], line["member_id"]) == (None, None)


def test_an_overlong_id_is_cut_in_the_line() -> None:
    [line] = dead_letter_lines(json.dumps({**EVENT, "event_id": "e" * 10_000}).encode())
    assert line["event_id"] == "e" * 200


def test_the_poison_record_line_names_the_event_and_member_too() -> None:
    consumer = BatchConsumer(name="rules", service="rules", topic="t", dlq_topic="dlq")

    async def written(*_: object) -> None:  # the letter itself goes to Postgres
        return None

    consumer._write_dead_letter = written  # type: ignore[method-assign]
    with capture_logs() as logs:
        asyncio.run(consumer._dead_letter_poison(record(json.dumps(EVENT).encode()), KeyError("x")))
    [line] = [line for line in logs if line["event"] == "poison_record"]
    assert (line["event_id"], line["member_id"]) == ("ev-42", "m-7")
