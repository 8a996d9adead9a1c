"""Bad input is data: a message we cannot use becomes a dead letter, counted and kept.

Dead letters travel through the outbox in the same transaction that records the consumed
offset, so a bad message is never lost and never dead-lettered twice.
"""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime

import asyncpg
from aiokafka.structs import ConsumerRecord
from prometheus_client import Counter
from pydantic import ValidationError

from schemas.ledger import DeadLetter
from services.common.outbox import OutboxRow

DEAD_LETTERS = Counter(
    "loyalty_dlq_messages_total", "Messages sent to the dead-letter topic", ["consumer", "reason"]
)

_DLQ_NAMESPACE = uuid.UUID("0d7f6a5e-2b8c-4a1e-9f3d-6c5b4a392817")


def classify(exc: Exception) -> tuple[str, str]:
    """(metric label, human reason) for why a message could not be used."""
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


def dead_letter(
    record: ConsumerRecord, consumer: str, label: str, reason: str, dlq_topic: str
) -> tuple[OutboxRow, tuple[object, ...]]:
    """The outbox row for the DLQ topic and the `dead_letters` row, with a stable id."""
    raw: bytes = record.value or b""
    # An exception's text may quote the input, and a NUL or a lone surrogate would fail
    # the `text` column: a dead letter must always be writable, or the consumer retries it.
    reason = writable(reason)
    try:
        original, encoding = raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        original, encoding = base64.b64encode(raw).decode(), "base64"
    dlq_id = str(
        uuid.uuid5(_DLQ_NAMESPACE, f"{consumer}|{record.topic}|{record.partition}|{record.offset}")
    )
    key = writable(record.key.decode("utf-8", "replace")) if record.key else None
    letter = DeadLetter(
        dlq_id=dlq_id,
        consumer=consumer,
        source_topic=record.topic,
        source_partition=record.partition,
        source_offset=record.offset,
        reason=reason,
        original=original,
        original_encoding=encoding,
        original_key=key,
        received_at=datetime.now(UTC),
    )
    row = (dlq_id, consumer, record.topic, record.partition, record.offset, reason, raw)
    return OutboxRow(dlq_topic, key, letter.model_dump_json().encode()), row


async def record_dead_letters(conn: asyncpg.Connection, rows: list[tuple[object, ...]]) -> None:
    if rows:
        await conn.executemany(
            'INSERT INTO dead_letters (dlq_id, consumer, topic, partition, "offset", reason,'
            " original) VALUES ($1,$2,$3,$4,$5,$6,$7) ON CONFLICT DO NOTHING",
            rows,
        )
