"""`dead_letters` keeps one row per message, across the change of how letter ids are made."""

from __future__ import annotations

import uuid

import asyncpg
import pytest
from aiokafka.structs import ConsumerRecord

from services.common.dlq import _DLQ_NAMESPACE, dead_letter, record_dead_letters
from services.common.migrations import apply_migrations

pytestmark = pytest.mark.integration


def _record(value: bytes, offset: int = 42) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(
        topic="loyalty.activity.v1", partition=3, offset=offset, timestamp=0, timestamp_type=0,
        key=b"m-1", value=value, checksum=None, serialized_key_size=3,
        serialized_value_size=len(value), headers=(),
    )  # fmt: skip


def _row(value: bytes, offset: int = 42) -> tuple[object, ...]:
    _, row = dead_letter(_record(value, offset), "rules", "invalid_json", "bad", "loyalty.dlq.v1")
    return row


async def test_one_row_per_message_whatever_id_an_older_version_gave_it(
    fresh_database: str,
) -> None:
    apply_migrations(fresh_database)
    conn = await asyncpg.connect(fresh_database)
    try:
        # Dead-lettered before ids hashed the bytes: the coordinates alone made the id.
        old_id = str(uuid.uuid5(_DLQ_NAMESPACE, "rules|loyalty.activity.v1|3|42"))
        first = _row(b"first bad message")
        await record_dead_letters(conn, [(old_id, *first[1:])])
        # A replay meets it again: its new id differs, the row does not repeat.
        assert first[0] != old_id
        await record_dead_letters(conn, [first])
        await record_dead_letters(conn, [first])  # and again, under the new id
        # A different message at the same offset (a recreated topic): a row of its own.
        await record_dead_letters(conn, [_row(b"another bad message")])
        rows = await conn.fetch("SELECT dlq_id, original FROM dead_letters ORDER BY original")
        assert [(r["dlq_id"], bytes(r["original"])) for r in rows] == [
            (_row(b"another bad message")[0], b"another bad message"),
            (old_id, b"first bad message"),
        ]
        # The look-up by coordinates has its index (a flood of bad messages would scan).
        indexed = await conn.fetchval(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'dead_letters_coordinates'"
        )
        assert indexed is not None
        assert '(topic, partition, "offset")' in indexed
    finally:
        await conn.close()
