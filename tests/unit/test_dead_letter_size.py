"""A dead letter stays small enough for any broker; the table keeps the whole original."""

from __future__ import annotations

import base64
import json

import pytest
from aiokafka.structs import ConsumerRecord

from schemas.ledger import DeadLetter
from services.common.dlq import MAX_KEY_CHARS, MAX_LETTER_BYTES, dead_letter

REASON = "invalid_json: malformed JSON: <root>: Invalid JSON"


def record(value: bytes, key: bytes | None = b"m-1") -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(
        topic="loyalty.activity.v1", partition=3, offset=42, timestamp=0, timestamp_type=0,
        key=key, value=value, checksum=None, serialized_key_size=0,
        serialized_value_size=len(value), headers=(),
    )  # fmt: skip


def letter_of(value: bytes, key: bytes | None = b"m-1") -> tuple[DeadLetter, bytes, tuple]:
    row, dead = dead_letter(record(value, key), "rules", "invalid_json", REASON, "loyalty.dlq.v1")
    return DeadLetter.model_validate_json(row.payload), row.payload, dead


@pytest.mark.parametrize(
    "value",
    [
        b'"' * 700_000,  # each escaped to \": a 1.4 MB letter Apache Kafka refused for ever
        b"\x01" * 300_000,  # each escaped to \u0001: six bytes a byte
        "点".encode() * 300_000,  # three bytes a character
        b"\xff" * 700_000,  # not UTF-8: base64, four characters for three bytes
    ],
    ids=["quotes", "controls", "cjk", "binary"],
)
def test_an_oversized_letter_keeps_the_start_of_the_original_within_the_cap(value: bytes) -> None:
    letter, payload, dead = letter_of(value)
    assert MAX_LETTER_BYTES - 16 <= len(payload) <= MAX_LETTER_BYTES  # cut, not emptied
    assert letter.original_truncated
    assert letter.original_size == len(value)
    assert (letter.reason, letter.original_key) == (REASON, "m-1")
    assert (letter.source_topic, letter.source_partition, letter.source_offset) == (
        "loyalty.activity.v1", 3, 42,
    )  # fmt: skip
    if letter.original_encoding == "base64":
        assert value.startswith(base64.b64decode(letter.original, validate=True))
    else:
        assert value.startswith(letter.original.encode())
    assert dead[-1] == value  # the `dead_letters` row: every byte


def test_a_letter_under_the_cap_is_whole() -> None:
    value = b'{"type": "purchase", "note": "' + b'"' * 1000 + b'"}'
    letter, payload, _dead = letter_of(value)
    assert (letter.original, letter.original_truncated, letter.original_size) == (
        value.decode(), False, len(value),
    )  # fmt: skip
    assert json.loads(payload)["original_truncated"] is False


def test_a_huge_key_is_cut_too() -> None:
    row, _dead = dead_letter(
        record(b"{}", key=b"k" * 900_000), "rules", "invalid_json", REASON, "loyalty.dlq.v1"
    )
    assert len(row.payload) <= MAX_LETTER_BYTES
    assert row.key == "k" * MAX_KEY_CHARS


def test_a_letter_id_follows_the_message_not_only_its_coordinates() -> None:
    """A topic recreated after a broker restart reuses offsets: a different bad message at
    offset 42 was given the first one's id, and `dead_letters` kept only the first."""
    first, _, row_first = letter_of(b"first bad message")
    again, _, _ = letter_of(b"first bad message")
    other, _, row_other = letter_of(b"another bad message")
    assert first.dlq_id == again.dlq_id  # the same message read twice: one row
    assert other.dlq_id != first.dlq_id
    assert (row_first[0], row_other[0]) == (first.dlq_id, other.dlq_id)
