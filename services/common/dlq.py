"""Bad input is data: a message we cannot use becomes a dead letter, counted and kept.

Dead letters travel through the outbox in the same transaction that records the consumed
offset, so a bad message is never lost and never dead-lettered twice.
"""

from __future__ import annotations

import base64
import hashlib
import uuid
from datetime import UTC, datetime
from typing import Final

import asyncpg
import orjson
from aiokafka.structs import ConsumerRecord
from prometheus_client import Counter
from pydantic import ValidationError
from pydantic_core import to_json

from schemas.ledger import DeadLetter
from services.common.outbox import OutboxRow

DEAD_LETTERS = Counter(
    "loyalty_dlq_messages_total", "Messages sent to the dead-letter topic", ["consumer", "reason"]
)

_DLQ_NAMESPACE = uuid.UUID("0d7f6a5e-2b8c-4a1e-9f3d-6c5b4a392817")
# Apache Kafka refuses a record over `message.max.bytes` (~1 MB by default) and the relay's
# `send_batch` does not check the producer's `max_request_size`: one bigger letter (a
# 700 KB message of quotes is 1.4 MB once JSON-escaped) failed the relay's batch for ever,
# holding every outbox row behind it. Half that leaves room for the key and the framing.
MAX_LETTER_BYTES: Final = 512 * 1024
# In a letter cut to size, the reason and the key keep this many characters at most.
MAX_REASON_CHARS: Final = 8192
MAX_KEY_CHARS: Final = 1024
# An id in a log line: the contract's bound on every id (README, Bad input).
MAX_LOGGED_ID_CHARS: Final = 200


class Refused(ValueError):
    """A message that parses but that a consumer must not use: its own label and reason."""

    def __init__(self, label: str, reason: str) -> None:
        super().__init__(reason)
        self.label = label


def logged_ids(record: ConsumerRecord) -> dict[str, str | None]:
    """The event and member ids a refused record's JSON names (the member: else its key),
    for the log lines of its dead letter, which had no event id to find it by. Parsed
    again, as those lines are rare; cut, as a refused record's id may be of any length."""
    try:
        doc = orjson.loads(record.value or b"")
    except orjson.JSONDecodeError:
        doc = None
    fields = doc if isinstance(doc, dict) else {}
    key = record.key.decode("utf-8", "replace") if record.key else None

    def cut(value: object) -> str | None:
        return value[:MAX_LOGGED_ID_CHARS] if isinstance(value, str) else None

    return {
        "event_id": cut(fields.get("event_id")),
        "member_id": cut(fields.get("member_id")) or cut(key),
    }


# The labels `classify` gives; a consumer's own refusals (`Refused`) bring theirs.
REASONS: Final = ("invalid_json", "unknown_type", "schema_violation", "processing_error")


def classify(exc: Exception) -> tuple[str, str]:
    """(metric label, human reason) for why a message could not be used."""
    if isinstance(exc, Refused):
        return exc.label, str(exc)
    if isinstance(exc, ValidationError):
        errors = exc.errors(include_url=False)
        kinds = {e["type"] for e in errors}
        detail = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in errors[:5]
        )
        if "json_invalid" in kinds or "json_type" in kinds:
            return "invalid_json", f"malformed JSON: {detail}"
        if "union_tag_invalid" in kinds:
            return "unknown_type", f"unknown event type: {detail}"
        return "schema_violation", f"schema violation: {detail}"
    return "processing_error", f"{type(exc).__name__}: {exc}"


def writable(text: str) -> str:
    """`text` as a Postgres `text` column takes it: no NUL, no lone surrogate."""
    return text.encode("utf-8", "backslashreplace").decode().replace("\x00", "\\x00")


def letter_id(consumer: str, record: ConsumerRecord) -> str:
    """The same message read again gets the same id (one `dead_letters` row); a different
    one at the same coordinates, a topic recreated after a broker restart reusing its
    offsets, gets its own: with the coordinates alone the second was dropped as a repeat."""
    digest = hashlib.blake2b(record.value or b"", digest_size=8).hexdigest()
    coordinates = f"{consumer}|{record.topic}|{record.partition}|{record.offset}"
    return str(uuid.uuid5(_DLQ_NAMESPACE, f"{coordinates}|{digest}"))


def dead_letter(
    record: ConsumerRecord, consumer: str, label: str, reason: str, dlq_topic: str
) -> tuple[OutboxRow, tuple[object, ...]]:
    """The outbox row for the DLQ topic and the `dead_letters` row, with a stable id."""
    source = (record.topic, record.partition, record.offset)
    return _letter(letter_id(consumer, record), consumer, source, record.key,
                   record.value or b"", reason, dlq_topic)  # fmt: skip


# The offset of a letter of a row the outbox relay could not publish: it has none.
NEVER_ON_THE_TOPIC: Final = -1


def unsent_letter(
    consumer: str, topic: str, partition: int, key: bytes | None, raw: bytes, reason: str,
    dlq_topic: str,
) -> tuple[OutboxRow, tuple[object, ...]]:  # fmt: skip
    """As `dead_letter`, for a row on its way to `topic` that the broker refused."""
    digest = hashlib.blake2b(raw, digest_size=8).hexdigest()
    dlq_id = str(uuid.uuid5(_DLQ_NAMESPACE, f"{consumer}|{topic}|{partition}|unsent|{digest}"))
    source = (topic, partition, NEVER_ON_THE_TOPIC)
    return _letter(dlq_id, consumer, source, key, raw, reason, dlq_topic)


def _letter(
    dlq_id: str, consumer: str, source: tuple[str, int, int], raw_key: bytes | None,
    raw: bytes, reason: str, dlq_topic: str,
) -> tuple[OutboxRow, tuple[object, ...]]:  # fmt: skip
    topic, partition, offset = source
    # An exception's text may quote the input, and a NUL or a lone surrogate would fail
    # the `text` column: a dead letter must always be writable, or the consumer retries it.
    reason = writable(reason)
    try:
        original, encoding = raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        original, encoding = base64.b64encode(raw).decode(), "base64"
    key = writable(raw_key.decode("utf-8", "replace")) if raw_key else None
    letter = DeadLetter(
        dlq_id=dlq_id,
        consumer=consumer,
        source_topic=topic,
        source_partition=partition,
        source_offset=offset,
        reason=reason,
        original=original,
        original_encoding=encoding,
        original_key=key,
        received_at=datetime.now(UTC),
        original_size=len(raw),
    )
    payload = letter.model_dump_json().encode()
    if len(payload) > MAX_LETTER_BYTES:
        letter = cut_to_size(letter)
        key = letter.original_key
        payload = letter.model_dump_json().encode()
    row = (dlq_id, consumer, topic, partition, offset, reason, raw)
    return OutboxRow(dlq_topic, key, payload), row


def cut_to_size(letter: DeadLetter, limit: int = MAX_LETTER_BYTES) -> DeadLetter:
    """`letter` with as much of the original's start as keeps its JSON within `limit` bytes
    (the reason, ids and coordinates whole, bar a reason or key of a silly length)."""
    reason, key = letter.reason, letter.original_key
    smaller = letter.model_copy(
        update={
            "reason": reason[:MAX_REASON_CHARS] + ("…" if len(reason) > MAX_REASON_CHARS else ""),
            "original_key": key[:MAX_KEY_CHARS] if key is not None else None,
            "original": "",
            "original_truncated": True,
        }
    )
    budget = limit - len(smaller.model_dump_json().encode())
    text = letter.original
    # The longest start whose JSON string fits: escaping makes a character cost 1 to 6 bytes.
    low, high = 0, len(text)
    while low < high:
        mid = (low + high + 1) // 2
        if len(to_json(text[:mid])) - 2 <= budget:
            low = mid
        else:
            high = mid - 1
    if letter.original_encoding == "base64":
        low -= low % 4  # whole quanta, so what is kept still decodes
    return smaller.model_copy(update={"original": text[:low]})


# One row per message: the same id, or (a letter written before ids hashed the bytes, met
# again in a replay) the same bytes at the same coordinates (migration 0022's index).
_RECORD: Final = """
INSERT INTO dead_letters (dlq_id, consumer, topic, partition, "offset", reason, original)
SELECT $1, $2, $3, $4, $5, $6, $7
WHERE NOT EXISTS (
    SELECT 1 FROM dead_letters
    WHERE topic = $3 AND partition = $4 AND "offset" = $5 AND consumer = $2 AND original = $7)
ON CONFLICT DO NOTHING
"""


async def record_dead_letters(conn: asyncpg.Connection, rows: list[tuple[object, ...]]) -> None:
    if rows:
        await conn.executemany(_RECORD, rows)
